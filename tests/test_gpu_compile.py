"""Every GPU kernel compiles for sm_80 and sm_90 with the launch configurations the backends choose, and fits
its GPU's launch limits (threads, registers and shared memory per block) — on a machine without a GPU.
Runs benchmarks.gpu_resources in a subprocess: a real Triton compile needs TRITON_INTERPRET unset, which
the rest of this test run keeps set."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gpu_resources  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ toolchain")


def test_parse_ptxas_reads_registers_spills_and_shared_memory():
    text = """ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'
ptxas info    : Function properties for _Z6kernelPf
    24 bytes stack frame, 16 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]"""
    assert gpu_resources.parse_ptxas(text) == {"_Z6kernelPf": dict(registers=255, spill_bytes=24, shared_bytes=128)}


def test_occupancy_and_launch_limits():
    ok = gpu_resources.Record("k", "triton", "sm_90", registers=128, spill_bytes=0, shared_bytes=0, threads=256)
    gpu_resources.occupancy(ok)
    assert (ok.blocks_per_sm, ok.occupancy, ok.problems) == (2, 0.25, [])
    too_big = gpu_resources.Record("k", "cuda", "sm_80", registers=255, spill_bytes=0, shared_bytes=200 * 1024,
                                   threads=512)
    gpu_resources.occupancy(too_big)
    assert len(too_big.problems) == 2  # 255 x 512 registers, and 200 KB > 163 KB of shared memory


def _resources(tmp_path, *args, pythonpath=None):
    """Runs benchmarks.gpu_resources (a real compile: TRITON_INTERPRET unset) and returns its records,
    asserting that every configuration compiled and fits its launch limits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = tmp_path / "resources.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_resources", "--json", str(out), "--jobs", "2",
                          *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    records = json.loads(out.read_text()) if out.exists() else []
    failed = [(r["kernel"], r["arch"], r["sizes"], r["problems"]) for r in records if r["problems"]]
    assert run.returncode == 0 and records and not failed, (failed, run.stderr[-3000:])
    return records


def test_every_gpu_kernel_compiles_for_sm80_and_sm90_within_launch_limits(tmp_path):
    records = _resources(tmp_path)
    kernels = {(r["backend"], r["kernel"].split("<")[0], r["arch"]) for r in records}
    for arch in ("sm_80", "sm_90"):
        for name in ("hyper_lstm_fwd_step", "hyper_lstm_bwd_step", "generate_tiles_kernel", "gather_tiles_kernel"):
            assert ("triton", name, arch) in kernels
        for name in ("forward_kernel", "backward_kernel", "generate_kernel", "gather_kernel"):
            assert ("cuda", name, arch) in kernels
    # the cluster kernels launch only on sm_90+ (stubs for sm_80, left out of the table); float32 spills nothing
    assert {("cuda", f"cluster_{k}_kernel", "sm_90") for k in ("forward", "backward")} <= kernels
    assert not [k for k in kernels if k[1].startswith("cluster_") and k[2] == "sm_80"]
    clusters = [r for r in records if r["kernel"].startswith("cluster_") and "float" in r["kernel"]]
    assert clusters and all(r["spill_bytes"] == 0 and r["registers"] <= 65536 // r["threads"] for r in clusters)
    paper = [r for r in records if (r["H"], r["Hh"], r["Nz"]) == (1000, 128, 64) and r["backend"] == "triton"]
    assert paper and all(r["registers"] > 0 and r["threads"] > 0 for r in paper)


TRITON_36 = os.path.join(ROOT, ".venv", "triton-3.6")


def test_triton_kernels_compile_with_the_gpu_machines_triton(tmp_path):
    """The GPU machine runs Triton 3.6, not this venv's: the kernels must compile under both."""
    assert os.path.isdir(os.path.join(TRITON_36, "triton")), "scripts/bootstrap.sh installs triton 3.6 there"
    check = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                           env={**os.environ, "PYTHONPATH": TRITON_36}, capture_output=True, text=True)
    assert check.stdout.strip() == "3.6.0", check.stdout + check.stderr
    records = _resources(tmp_path, "--quick", "--arch", "sm_90", "--backends", "triton", pythonpath=TRITON_36)
    assert {r["kernel"] for r in records} == {"hyper_lstm_fwd_step", "hyper_lstm_bwd_step", "generate_tiles_kernel",
                                              "gather_tiles_kernel"}
