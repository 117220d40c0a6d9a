"""Every GPU kernel the backends launch, compiled for real targets on a machine without a GPU, with its
resource figures: registers, spills, shared memory, threads per block, and the occupancy that follows.

    python -m benchmarks.gpu_resources [--json FILE] [--arch sm_80 sm_90] [--jobs N] [--quick]
                                       [--backends triton cuda]

Triton kernels: triton.compile for GPUTarget("cuda", 80|90), with the exact constexprs and num_warps the
launchers choose (hyperfused.triton_kernels.*: forward_config, backward_config, generate_blocks), then ptxas -v from
Triton's NVIDIA backend. CUDA kernels: nvcc -cubin -Xptxas -v on each .cu (they include no torch headers).
A configuration fails when it does not compile or when it cannot launch on its GPU (threads per block,
registers per block, shared memory per block); spills are reported, not failed. Exit status 1 on a failure.
Occupancy is computed for an H100/H200 (sm_90: 132 SMs, 64K registers, 228 KB shared memory per SM) and an
A100 (sm_80: 108 SMs, 64K registers, 164 KB).
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per-SM and per-block limits of the GPUs each arch stands for.
LIMITS = {
    "sm_80": dict(gpu="A100", sms=108, regs_per_sm=65536, max_threads_sm=2048, max_blocks_sm=32,
                  smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "sm_90": dict(gpu="H100/H200", sms=132, regs_per_sm=65536, max_threads_sm=2048, max_blocks_sm=32,
                  smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}
REGS_PER_BLOCK = 65536
MAX_THREADS_PER_BLOCK = 1024

# HyperLSTM sizes (H, Ĥ, N_z): the paper's (H=1000, Ĥ=128, N_z=4/16/64), a wide layer, and odd sizes.
LSTM_SIZES = [(1000, 128, 16), (1000, 128, 4), (1000, 128, 64), (2048, 128, 16), (37, 20, 4), (256, 128, 16)]
# Static hypernetwork sizes (z_dim, hidden, in_tile, out_tile, k): the paper's MNIST and WRN layers.
GEN_SIZES = [(4, 4, 16, 16, 7), (64, 64, 16, 16, 3)]


@dataclass
class Record:
    kernel: str
    backend: str
    arch: str
    H: Optional[int] = None
    Hh: Optional[int] = None
    Nz: Optional[int] = None
    sizes: str = ""
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    threads: Optional[int] = None
    blocks_per_sm: Optional[int] = None
    occupancy: Optional[float] = None
    problems: list = field(default_factory=list)


def ptxas_path() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def parse_ptxas(text: str) -> dict:
    """Per entry function: registers, spill bytes (stores + loads), static shared bytes."""
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line) or re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
            out.setdefault(name, dict(registers=0, spill_bytes=0, shared_bytes=0))
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[name]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[name]["registers"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            out[name]["shared_bytes"] = int(m2.group(1)) if m2 else 0
    return out


def occupancy(rec: Record) -> None:
    """Blocks per SM and the fraction of the SM's warp slots they fill; notes what cannot launch."""
    lim = LIMITS[rec.arch]
    threads, regs, smem = rec.threads, rec.registers, rec.shared_bytes or 0
    if threads > MAX_THREADS_PER_BLOCK:
        rec.problems.append(f"{threads} threads per block > {MAX_THREADS_PER_BLOCK}")
    if regs * threads > REGS_PER_BLOCK:
        rec.problems.append(f"{regs} registers x {threads} threads > {REGS_PER_BLOCK} per block")
    if smem > lim["smem_per_block"]:
        rec.problems.append(f"{smem} bytes of shared memory > {lim['smem_per_block']} per block on {lim['gpu']}")
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = (lim["regs_per_sm"] // regs_per_warp) // warps if regs else lim["max_blocks_sm"]
    by_smem = lim["smem_per_sm"] // (smem + 1024) if smem else lim["max_blocks_sm"]  # 1 KB reserved per block
    blocks = min(by_regs, by_smem, lim["max_threads_sm"] // threads, lim["max_blocks_sm"])
    rec.blocks_per_sm = blocks
    rec.occupancy = round(blocks * warps / (lim["max_threads_sm"] // 32), 3)


# -- Triton ------------------------------------------------------------------------------------------------

def triton_jobs(archs, quick):
    """(kernel name, size label, arch, builder args) for every Triton launch configuration."""
    sizes = LSTM_SIZES[:1] + LSTM_SIZES[4:5] if quick else LSTM_SIZES
    jobs = []
    for arch in archs:
        for H, Hh, Nz in sizes:
            for kernel in ("hyper_lstm_fwd_step", "hyper_lstm_bwd_step"):
                # phase 0: the one-program-per-row step; 1 and 2: the GEMM-shaped step's hyper and main cells
                for phase in (0, 1, 2):
                    jobs.append((kernel, arch, dict(H=H, Hh=Hh, Nz=Nz, phase=phase)))
                # the main cell at a small batch (B = 8 on 132 multiprocessors): up to 32 warps
                jobs.append((kernel, arch, dict(H=H, Hh=Hh, Nz=Nz, phase=2, rows=8, multiprocessors=132)))
        for z_dim, hidden, in_tile, out_tile, k in GEN_SIZES[: 1 if quick else None]:
            for kernel in ("generate_tiles_kernel", "gather_tiles_kernel"):
                jobs.append((kernel, arch, dict(z_dim=z_dim, hidden=hidden, in_tile=in_tile, out_tile=out_tile, k=k)))
    return jobs


def _signature(fn, constexprs):
    """Triton's argument types: constexprs, float scalars, int64 tile metadata, int sizes, fp32 pointers."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "meta_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in ("numel", "n_rows"):
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


def _triton_launch(kernel, size):
    """The kernel object, its constexprs and num_warps, exactly as the launchers choose them."""
    from hyperfused._triton_kernels import load
    load()
    from hyperfused.triton_kernels import hyper_lstm, static_hypernet
    if kernel == "hyper_lstm_fwd_step":
        consts, warps = hyper_lstm.forward_config(size["H"], size["Hh"], size["Nz"], layer_norm=True,
                                                  phase=size.get("phase", 0), rows=size.get("rows"),
                                                  multiprocessors=size.get("multiprocessors"))
        return hyper_lstm.hyper_lstm_fwd_step, consts, warps
    if kernel == "hyper_lstm_bwd_step":
        consts, warps = hyper_lstm.backward_config(size["H"], size["Hh"], size["Nz"], layer_norm=True,
                                                   phase=size.get("phase", 0), rows=size.get("rows"),
                                                   multiprocessors=size.get("multiprocessors"))
        return hyper_lstm.hyper_lstm_bwd_step, consts, warps
    kk, out_kk = size["k"] ** 2, size["out_tile"] * size["k"] ** 2
    if kernel == "generate_tiles_kernel":
        consts = dict(ZD=size["z_dim"], HID=size["hidden"], IN_TILE=size["in_tile"], OUT_KK=out_kk, KK=kk,
                      **static_hypernet.generate_blocks(size["z_dim"], size["hidden"], out_kk))
        return static_hypernet.generate_tiles_kernel, consts, 4  # Triton's default num_warps
    consts = dict(IN_TILE=size["in_tile"], OUT_KK=out_kk, KK=kk, BLOCK_O=static_hypernet.next_pow2(out_kk, 4))
    return static_hypernet.gather_tiles_kernel, consts, 4


def compile_triton(job) -> Record:
    kernel, arch, size = job
    os.environ.pop("TRITON_INTERPRET", None)  # a real compile, not the interpreter
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label = ", ".join(f"{k}={v}" for k, v in size.items())
    rec = Record(kernel, "triton", arch, size.get("H"), size.get("Hh"), size.get("Nz"), sizes=label)
    try:
        fn, consts, warps = _triton_launch(kernel, size)
        pointers = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
        src = ASTSource(fn=fn, signature=_signature(fn, consts), constexprs=consts, attrs=pointers)
        cc = int(arch.split("_")[1])
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
        with tempfile.TemporaryDirectory() as d:
            ptx = os.path.join(d, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            gpu = arch + ("a" if cc == 90 else "")
            run = subprocess.run([ptxas_path(), "-v", f"--gpu-name={gpu}", ptx, "-o", os.path.join(d, "k.cubin")],
                                 capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(run.stderr[-2000:])
        info = next(iter(parse_ptxas(run.stderr).values()))
        rec.registers, rec.spill_bytes = info["registers"], info["spill_bytes"]
        rec.shared_bytes = int(compiled.metadata.shared)
        rec.threads = 32 * warps
        occupancy(rec)
    except Exception as e:  # a compile error is a result to report, not a crash of the whole table
        rec.problems.append(f"compile failed: {type(e).__name__}: {str(e)[-1500:]}")
    return rec


# -- CUDA -------------------------------------------------------------------------------------------------

CUDA_THREADS = 256  # kThreads in csrc/cuda/*.cu, simt::kGroupThreads in csrc/hyper_lstm_simt.h


def cuda_threads(kernel: str) -> int:
    """Threads per block: the step kernels run kGroupThreads per thread group, their last template argument
    ('forward_kernel<float, 4>': 1024); the others CUDA_THREADS."""
    m = re.search(r"_kernel<\w+, (\d+)>", kernel)
    return CUDA_THREADS * int(m.group(1)) if m and ("forward_kernel" in kernel or "backward_kernel" in kernel) \
        else CUDA_THREADS


def nvcc_path() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu13")
    for candidate in (os.path.join(home, "bin", "nvcc"), shutil.which("nvcc")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def _short(name: str) -> str:
    """'void hyperfused::(anonymous namespace)::forward_kernel<float>(hyperfused::ForwardStep)' -> 'forward_kernel<float>'."""
    m = re.search(r"::(\w+<[^>]*>)\(", name) or re.search(r"(\w+)\(", name)
    return m.group(1) if m else name


def compile_cuda(arch: str) -> list[Record]:
    """Every kernel of every .cu for one arch; the sizes only change the generation kernel's dynamic shared
    memory, which is added per size."""
    nvcc = nvcc_path()
    if nvcc is None:
        return [Record("*.cu", "cuda", arch, problems=["nvcc not found (set CUDA_HOME)"])]
    records = []
    for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        with tempfile.TemporaryDirectory() as d:
            run = subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-Xptxas", "-v", "-std=c++17", cu,
                                  "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
        if run.returncode:
            records.append(Record(os.path.basename(cu), "cuda", arch, problems=[run.stderr[-2000:]]))
            continue
        info = parse_ptxas(run.stderr)
        names = demangle(list(info))
        for mangled, figures in info.items():
            kernel = _short(names[mangled])
            if kernel.startswith("cluster_") and arch < "sm_90":
                continue  # a stub there: clusters launch only on sm_90+
            if "forward_kernel" in kernel or "backward_kernel" in kernel:
                for H, Hh, Nz in LSTM_SIZES:
                    records.append(Record(kernel, "cuda", arch, H, Hh, Nz, sizes=f"H={H}, Hh={Hh}, Nz={Nz}",
                                          threads=cuda_threads(kernel), **figures))
            else:
                for z_dim, hidden, in_tile, out_tile, k in GEN_SIZES:
                    shared = figures["shared_bytes"]
                    if "generate_kernel" in kernel:  # + one tile's z and hidden layer (generate_shared_bytes)
                        shared += (z_dim + in_tile * hidden) * (8 if "double" in kernel else 4)
                    records.append(Record(kernel, "cuda", arch, sizes=f"z_dim={z_dim}, hidden={hidden}, "
                                          f"in_tile={in_tile}, out_tile={out_tile}, k={k}", threads=CUDA_THREADS,
                                          registers=figures["registers"], spill_bytes=figures["spill_bytes"],
                                          shared_bytes=shared))
    for rec in records:
        if rec.registers is not None:
            occupancy(rec)
    return records


# -- report -------------------------------------------------------------------------------------------------

def table(records) -> str:
    lines = ["| kernel | backend | arch | sizes | registers | spill bytes | shared bytes | threads | blocks/SM | "
             "occupancy | problems |", "|" + "---|" * 11]
    for r in records:
        lines.append(f"| {r.kernel} | {r.backend} | {r.arch} | {r.sizes} | {r.registers} | {r.spill_bytes} | "
                     f"{r.shared_bytes} | {r.threads} | {r.blocks_per_sm} | {r.occupancy} | "
                     f"{'; '.join(p.splitlines()[0] if p else p for p in r.problems)} |")
    return "\n".join(lines)


def collect(archs, quick=False, jobs=2, backends=("triton", "cuda")) -> list[Record]:
    records = []
    if "triton" in backends:
        with futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            records += list(pool.map(compile_triton, triton_jobs(archs, quick)))
    if "cuda" in backends:
        records += [r for arch in archs for r in compile_cuda(arch)]
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE", help="also write the records as a JSON list")
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], choices=sorted(LIMITS))
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel Triton compiles")
    ap.add_argument("--quick", action="store_true", help="only the paper size and the odd size")
    ap.add_argument("--backends", nargs="+", default=["triton", "cuda"], choices=("triton", "cuda"))
    args = ap.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    records = collect(args.arch, args.quick, args.jobs, args.backends)
    print(table(records))
    if args.json:
        keys = ("kernel", "backend", "arch", "H", "Hh", "Nz", "registers", "spill_bytes", "shared_bytes", "threads")
        with open(args.json, "w") as f:
            json.dump([{**{k: asdict(r)[k] for k in keys}, **{k: v for k, v in asdict(r).items() if k not in keys}}
                       for r in records], f, indent=1)
    failed = [r for r in records if r.problems]
    if failed:
        print(f"\n{len(failed)} configuration(s) failed to compile or cannot launch", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
