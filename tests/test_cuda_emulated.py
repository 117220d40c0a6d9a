"""The CUDA kernels' code (the HyperLSTM step kernels, the static hypernetwork's generation and gather), run on
the CPU under the SIMT emulator (HYPERFUSED_EMULATE_CUDA, see csrc/cpu/simt_emulator.cpp), against the
reference: every output, final state and gradient. These run on any machine, so the kernels' indexing,
barriers, shared memory and thread-group reductions are checked where there is no GPU.

The emulated GPU's multiprocessor count picks the launch as on a real one (an sm_90, with thread-block
clusters): with 132 multiprocessors these batches get four thread groups (the gate layer norms side by side,
1024 threads per block), and the GEMM-shaped step's main cell a cluster of blocks per row at H = 300 and 1000
(2 and 4 blocks of 1024 threads); with one multiprocessor they get one group of 256 threads (the gates in
turn); "sm80" emulates a GPU without clusters (one block per row). "reverse" runs the blocks of a cluster,
the warps of a block and the threads of a warp in descending order, so that a read which needs a barrier before it sees stale data whichever thread wrote it (a missing
barrier after the pre-activations, or after the generation kernel loads z, was checked to fail here; so was
removing any of the sums' barriers in csrc/simt_sum.h, or summing a cluster's blocks from the wrong rank). Threads that
pass different numbers of barriers are an error of the emulator's own (a group that skips a gate's layer norm
was checked to raise it)."""
import pytest
import torch

import hyperfused
from conftest import requires_extension
from helpers import assert_same_run, make_pair, random_state, randomize_, run_and_grad

pytestmark = requires_extension

# float64 runs the same sums in another order than the reference; float32 as in test_hyper_lstm_fused.
F64 = dict(rtol=1e-9, atol=1e-10)
F32 = dict(rtol=2e-4, atol=2e-5)
GPUS = ["132", "132,reverse", "1", "1,reverse", "108,sm80,reverse"]
# H = 300 makes the 256-thread groups stride; H = 37, Ĥ = 20 and N_z = 5 leave partly idle warps; the paper's
# H = 1000, Ĥ = 128, N_z = 16 at a short T.
SIZES = [(3, 3, 6, 300, 20, 5), (2, 2, 5, 37, 40, 4), (1, 1, 3, 37, 20, 5), (2, 2, 16, 1000, 128, 16)]


@pytest.fixture
def emulated(monkeypatch):
    def use(gpu, design=None):
        monkeypatch.setenv("HYPERFUSED_EMULATE_CUDA", gpu)
        if design:
            monkeypatch.setenv("HYPERFUSED_STEP_DESIGN", design)
    return use


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "T{}-B{}-X{}-H{}-Hh{}-Nz{}".format(*s))
@pytest.mark.parametrize("design", ["gemm", "fused"])
@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_emulated_cuda_kernels_match_the_reference(gpu, design, size, layer_norm, emulated):
    T, B, X, H, Hh, Nz = size
    ref, fast = make_pair("cpu", X, H, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm, zoneout=0.2,
                          hyper_zoneout=0.1)
    ref, fast = ref.eval(), fast.eval()  # zoneout's expectation: the masks are deterministic
    emulated(gpu, design)
    assert_same_run(ref, fast, torch.randn(T, B, X, dtype=torch.float64), random_state(ref, B), **F64)


@pytest.mark.parametrize("gpu", ["132", "1"])
def test_emulated_cuda_float32(gpu, emulated):
    T, B, X, H, Hh, Nz = 4, 3, 6, 300, 20, 5
    ref, fast = make_pair("cpu", X, H, hyper_size=Hh, hyper_embed=Nz, dtype=torch.float32)
    emulated(gpu)
    assert_same_run(ref, fast, torch.randn(T, B, X), random_state(ref, B, torch.float32), **F32)


@pytest.mark.parametrize("gpu", ["132", "1"])
def test_emulated_cuda_recurrent_dropout(gpu, emulated):
    """Training-mode recurrent dropout: the same seed draws the same masks for both modules."""
    T, B, X, H, Hh, Nz = 3, 2, 6, 300, 20, 5
    ref, fast = make_pair("cpu", X, H, hyper_size=Hh, hyper_embed=Nz, recurrent_dropout=0.3)
    emulated(gpu)
    x, state = torch.randn(T, B, X, dtype=torch.float64), random_state(ref, B)
    runs = []
    for m in (ref, fast):
        torch.manual_seed(5)
        runs.append(run_and_grad(m, x, state))
    (outs_r, grads_r), (outs_f, grads_f) = runs
    for a, b in zip(outs_f, outs_r, strict=True):
        torch.testing.assert_close(a, b, **F64)
    for name in grads_r:
        torch.testing.assert_close(grads_f[name], grads_r[name], **F64, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("proj_size", [0, 70], ids=["plain", "projected"])
def test_emulated_cuda_decode_step(emulated, monkeypatch, proj_size):
    """The decode op (hyperfused::hyper_lstm_step: a cell stepped from its own state under no_grad) runs the same
    kernels; a projected cell's op reads its P-wide h as it is."""
    kw = dict(hyper_size=20, hyper_embed=5, dtype=torch.float64, proj_size=proj_size)
    ref = randomize_(hyperfused.HyperLSTMCell(5, 300, backend="reference", **kw))
    cell = hyperfused.HyperLSTMCell(5, 300, backend="cpu", **kw)
    cell.load_state_dict(ref.state_dict())
    calls = []
    real = hyperfused.HyperLSTMCell._decode_step
    monkeypatch.setattr(hyperfused.HyperLSTMCell, "_decode_step", lambda self, *a: calls.append(self) or real(self, *a))
    emulated("132")
    xs = torch.randn(3, 2, 5, dtype=torch.float64)
    with torch.no_grad():
        s, s_ref = cell(xs[0]), ref(xs[0])
        for x in xs[1:]:
            s, s_ref = cell(x, s), ref(x, s_ref)
            for a, b in zip(s.tensors(), s_ref.tensors(), strict=True):
                torch.testing.assert_close(a, b, **F64)
    assert [c for c in calls if c is cell] == [cell] * (len(xs) - 1)  # the steps from a given state


def test_emulation_runs_the_cuda_configuration(emulated):
    """Under emulation the CPU op takes the CUDA backend's driver path: the GEMM-shaped step (the CPU's own
    default is the one-kernel step, which runs no batched GEMMs)."""
    ref, fast = make_pair("cpu", 4, 9, hyper_size=6, hyper_embed=3)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    with torch.profiler.profile() as plain:
        fast(x)
    emulated("132")
    with torch.profiler.profile() as prof:
        fast(x)
    assert not [e for e in plain.events() if e.name == "aten::bmm"]
    assert len([e for e in prof.events() if e.name == "aten::bmm"]) == 3  # d, one per step


@pytest.mark.parametrize("masks", [False, True], ids=["plain", "masks"])
def test_emulated_cuda_inference_saves_nothing_and_computes_the_same(masks, emulated):
    """save_for_backward=False in the CUDA configuration: one step's scratch reused, the same outputs to float32
    rounding (the GPU test of test_hyper_lstm_fused, on the emulator)."""
    from test_hyper_lstm_fused import test_inference_forward_saves_nothing_and_computes_the_same as check

    emulated("132")
    check("cpu", (5, 3, 7, 37, 20, 4), masks)


@pytest.mark.parametrize("gpu, groups", [("132", "1"), ("1", "4")])
def test_forced_thread_groups_match_the_reference(gpu, groups, emulated, monkeypatch):
    """HYPERFUSED_CUDA_THREAD_GROUPS fixes the launch shape against the batch rule (to time both on a GPU)."""
    ref, fast = make_pair("cpu", 6, 300, hyper_size=20, hyper_embed=5)
    emulated(gpu)
    monkeypatch.setenv("HYPERFUSED_CUDA_THREAD_GROUPS", groups)
    assert_same_run(ref, fast, torch.randn(3, 3, 6, dtype=torch.float64), random_state(ref, 3), **F64)
    monkeypatch.setenv("HYPERFUSED_CUDA_THREAD_GROUPS", "2")
    with pytest.raises(RuntimeError, match="HYPERFUSED_CUDA_THREAD_GROUPS must be '1', '4' or unset, got '2'"):
        fast(torch.randn(2, 1, 6, dtype=torch.float64))


# -- the emulator itself ----------------------------------------------------------------------------------

def _probe(kind, blocks, threads, groups=1, reverse=False):
    from hyperfused import _C

    return _C._emulator_probe(kind, blocks, threads, groups, reverse)


@pytest.mark.parametrize("reverse", [False, True], ids=["ascending", "reverse"])
@pytest.mark.parametrize("blocks, threads, groups", [(1, 256, 1), (1, 1024, 4), (2, 1024, 4), (4, 256, 4), (8, 256, 4),
                                                     (8, 1024, 1)])
def test_emulated_sums_over_a_cluster_and_its_groups(blocks, threads, groups, reverse):
    """simt_sum (the GPU's code) of tid + 1 over a cluster of blocks and over each thread group: within a block
    (groups of 1024 / 4 threads), one block each, or across blocks; every thread gets its group's exact sum."""
    n = blocks * threads
    assert _probe("sum", blocks, threads, groups, reverse) == [n * (n + 1) / 2] * n
    per = n // groups
    want = [sum(range(g * per + 1, (g + 1) * per + 1)) for g in range(groups) for _ in range(per)]
    assert _probe("group_sum", blocks, threads, groups, reverse) == want


@pytest.mark.parametrize("kind, blocks, threads, groups, message", [
    ("no_such_probe", 1, 256, 1, "unknown kind 'no_such_probe'"), ("sum", 9, 256, 1, "bad launch shape")],
    ids=["kind", "shape"])
def test_emulator_probe_refuses_what_it_cannot_run(kind, blocks, threads, groups, message):
    """The probe checks its arguments before it launches: an error raised on an emulated thread would end the
    process (the unknown kind did, before)."""
    with pytest.raises(RuntimeError, match=message):
        _probe(kind, blocks, threads, groups)


@pytest.mark.parametrize("reverse, stale", [(False, [0.0, -1.0]), (True, [1.0, -1.0])], ids=["ascending", "reverse"])
def test_emulator_exposes_a_read_of_another_block_without_the_cluster_barrier(reverse, stale):
    """Block r writes r, then reads block r+1's value: after __syncthreads alone the block that runs first reads
    a value not yet written (-1), in either order; after the cluster's barrier every read is fresh."""
    got = _probe("read_next_block", 2, 64, 1, reverse)
    assert sorted(set(got)) == sorted(stale)
    assert _probe("read_next_block_after_cluster_barrier", 2, 64, 1, reverse) == [1.0] * 64 + [0.0] * 64


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("kind, barrier", [("skip_block_barrier", "__syncthreads"),
                                           ("skip_cluster_barrier", "the cluster barrier")])
def test_emulator_refuses_a_barrier_that_a_thread_skips(kind, barrier, blocks):
    with pytest.raises(RuntimeError, match=f"thread 0 is at {barrier}.* while thread 3 is finished "
                                           r"\(a barrier not every thread reaches\)"):
        _probe(kind, blocks, 64)


def _launch_widths(fast, x):
    """Threads per row of each step launch of one forward+backward, forward's first."""
    from hyperfused import _C

    _C._take_emulated_step_widths()
    out, state = fast(x)
    (out.sum() + state.hyper_c.sum()).backward()
    return _C._take_emulated_step_widths()


# (multiprocessors, B, H, design, HYPERFUSED_CUDA_CLUSTER) -> threads per row of the hyper cell's launches and
# of the main cell's. Four 256-thread groups per row while B < 2 x multiprocessors; then, for the GEMM-shaped
# step's main cell, a cluster of c blocks, c the largest power of two <= 8 with c <= ceil(H / 256) and
# c * B <= multiprocessors.
CLUSTER_RULE = [
    (("132", 2, 1000, "gemm", None), (1024, 4096)),
    (("132", 2, 300, "gemm", None), (1024, 2048)),
    (("132", 2, 37, "gemm", None), (1024, 1024)),
    (("8", 3, 1000, "gemm", None), (1024, 2048)),  # 4 blocks x 3 rows would take 12 of 8 multiprocessors
    (("1", 2, 1000, "gemm", None), (256, 256)),  # a batch that fills the GPU: one group, one block
    (("132", 2, 1000, "gemm", "1"), (1024, 1024)),
    (("132", 1, 37, "gemm", "8"), (8192, 8192)),  # the setting holds for every launch, whatever the sizes
    # a GPU without clusters (an A100): one block per row, whatever the rule or the setting would give
    (("108,sm80", 2, 1000, "gemm", None), (1024, 1024)),
    (("108,sm80", 1, 37, "gemm", "8"), (1024, 1024)),
]


@pytest.mark.parametrize("case, widths", CLUSTER_RULE, ids=lambda c: "-".join(map(str, c)))
def test_emulated_launch_takes_the_cluster_rule(case, widths, emulated, monkeypatch):
    gpu, B, H, design, cluster = case
    fast = make_pair("cpu", 5, H, hyper_size=20, hyper_embed=4)[1]
    emulated(gpu, design)
    if cluster:
        monkeypatch.setenv("HYPERFUSED_CUDA_CLUSTER", cluster)
    hyper, main = widths
    T = 2
    # forward: hyper, main per step; backward: main, hyper per step
    assert _launch_widths(fast, torch.randn(T, B, 5, dtype=torch.float64)) == [hyper, main] * T + [main, hyper] * T


def test_emulated_one_kernel_step_takes_no_cluster(emulated):
    """The one-kernel step (HYPERFUSED_STEP_DESIGN=fused) keeps one block per row: the rule is for the main cell
    of the GEMM-shaped step."""
    fast = make_pair("cpu", 5, 1000, hyper_size=20, hyper_embed=4)[1]
    emulated("132", "fused")
    assert _launch_widths(fast, torch.randn(2, 2, 5, dtype=torch.float64)) == [1024] * 4


@pytest.mark.parametrize("gpu", ["132", "132,reverse"])
@pytest.mark.parametrize("design", ["gemm", "fused"])
@pytest.mark.parametrize("cluster, H", [("2", 300), ("4", 37), ("8", 300)])
def test_forced_cluster_matches_the_reference(cluster, H, design, gpu, emulated, monkeypatch):
    """HYPERFUSED_CUDA_CLUSTER fixes the blocks per row for every launch, both step designs (to time the sizes
    against each other on a GPU): the kernels' loops and sums over a cluster's threads, each gate's layer norm
    over 256·c threads (with c = 8 more threads than H = 300 has features), against the reference."""
    T, B, X, Hh, Nz = 2, 2, 6, 20, 5
    ref, fast = make_pair("cpu", X, H, hyper_size=Hh, hyper_embed=Nz, zoneout=0.2, hyper_zoneout=0.1)
    ref, fast = ref.eval(), fast.eval()
    emulated(gpu, design)
    monkeypatch.setenv("HYPERFUSED_CUDA_CLUSTER", cluster)
    assert_same_run(ref, fast, torch.randn(T, B, X, dtype=torch.float64), random_state(ref, B), **F64)


def test_cluster_setting_is_checked(emulated, monkeypatch):
    fast = make_pair("cpu", 4, 9, hyper_size=6, hyper_embed=3)[1]
    emulated("132")
    monkeypatch.setenv("HYPERFUSED_CUDA_CLUSTER", "3")
    with pytest.raises(RuntimeError, match="HYPERFUSED_CUDA_CLUSTER must be '1', '2', '4', '8' or unset, got '3'"):
        fast(torch.randn(2, 1, 4, dtype=torch.float64))


@pytest.mark.parametrize("value", ["yes", "0x10", "132,backwards", "-4", "132,sm80,sm80", "132,sm90", "132,"])
def test_emulation_setting_is_checked(value, emulated):
    fast = make_pair("cpu", 4, 9, hyper_size=6, hyper_embed=3)[1]
    emulated(value)
    with pytest.raises(RuntimeError, match="HYPERFUSED_EMULATE_CUDA must be '<multiprocessors>'"):
        fast(torch.randn(2, 1, 4, dtype=torch.float64))


# -- the static hypernetwork's CUDA kernels (generation, and the backward's gather) -----------------------

from test_static_hypernet import FUSED_CASES, _generate_and_grads, _layers  # noqa: E402


@pytest.mark.parametrize("order", ["132", "132,reverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "z{}-in{}-out{}-k{}".format(*c[:4]))
def test_emulated_cuda_generation_matches_the_reference(case, dtype, order, emulated):
    z_dim, in_tile, out_tile, k, grids = case
    net = randomize_(hyperfused.StaticHyperNetwork(z_dim, in_tile, out_tile, k, dtype=dtype))
    layers = _layers(net, grids, dtype=dtype)
    ref_k, ref_g = _generate_and_grads(net, layers, "reference")
    emulated(order)
    got_k, got_g = _generate_and_grads(net, layers, "cpu")
    for a, b in zip(got_k + got_g, ref_k + ref_g, strict=True):
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-6 * b.abs().max().item())
        torch.testing.assert_close(a, b, **tol)


def test_emulated_generation_runs_the_cuda_configuration(emulated):
    """The CUDA configuration generates every tile in one kernel; the CPU's runs two GEMMs over all tiles."""
    net = hyperfused.StaticHyperNetwork(4, 3, 5, 1, backend="cpu", dtype=torch.float64)
    layers = _layers(net, [(2, 3)])
    gemms = lambda prof: [e for e in prof.events() if e.name in ("aten::bmm", "aten::baddbmm", "aten::mm")]  # noqa: E731
    with torch.no_grad(), torch.profiler.profile() as plain:
        net.generate(layers)
    emulated("132")
    with torch.no_grad(), torch.profiler.profile() as prof:
        net.generate(layers)
    assert gemms(plain) and not gemms(prof)


def test_emulated_cuda_generation_refuses_a_tile_beyond_shared_memory(emulated):
    """The CUDA kernel keeps a tile's hidden layer in shared memory; the host refuses sizes beyond the device's
    limit (the emulator stands in an H100's 227 KB) before launching."""
    net = hyperfused.StaticHyperNetwork(128, 512, 1, 1)  # (z_dim + in_tile·hidden) floats = (128 + 512·128)·4 B
    layers = _layers(net, [(1, 1)], dtype=torch.float32)
    emulated("132")
    with pytest.raises(RuntimeError, match=r"in shared memory: 262656 bytes, but this GPU allows 232448 per block"):
        _generate_and_grads(net, layers, "cpu")
