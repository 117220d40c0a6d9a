"""The fused HyperLSTM backends (C++ on the CPU, CUDA, Triton) against the reference: outputs, final main and
hyper states, and the gradients of the input, the initial states and every parameter."""
import pytest
import torch

import hyperfused
from hyperfused.train.determinism import deterministic_algorithms
from conftest import (HAS_GPU, HAS_MKL_BATCH, HAS_MKL_CBLAS, backend_cases, backend_params, device_for,
                      own_kernel_for, requires_extension, requires_gpu, size_id)
from helpers import assert_same_run, make_pair, random_state, randomize_, run_and_grad

pytestmark = requires_extension


# (T, B, X, H, Hh, Nz): unfriendly sizes (H = 37, Hh = 20, B = 1, T = 1) beside typical ones.
SIZES = [(1, 1, 3, 5, 4, 2), (5, 3, 7, 37, 20, 4), (4, 1, 5, 37, 20, 16), (6, 4, 16, 32, 16, 8)]

# float32 on the CPU: same math, different summation order; the state after T steps agrees to ~1e-5 (atol is
# scaled by each tensor's largest entry, see helpers.assert_same_run).
F32 = dict(rtol=2e-4, atol=2e-5)
F64 = dict(rtol=1e-9, atol=1e-10)


# Triton runs under the interpreter without a GPU (milliseconds per program and step): small sizes there.
TRITON_SIZES = [(3, 2, 5, 24, 12, 4), (2, 1, 3, 37, 20, 4), (1, 3, 4, 8, 6, 3)]
# The paper's sizes (N_z = 16 and 64) with a small and a large batch.
GPU_SIZES = [(20, 64, 128, 256, 128, 16), (10, 8, 64, 1000, 128, 16), (6, 8, 32, 1000, 128, 64),
             (5, 128, 128, 1000, 128, 16)]
# float32 on a GPU: TF32-free cuBLAS and other summation orders; 1e-3 relative is still far below the effect
# of a dropped forget bias or layer norm (test_half_precision_* measures those).
GPU_F32 = dict(rtol=1e-3, atol=1e-4)
RUNS = backend_cases(
    [("cpu", d, s) for d in (torch.float64, torch.float32) for s in SIZES] +
    [("cuda", d, s) for d in (torch.float64, torch.float32) for s in SIZES + GPU_SIZES] +
    [("triton", torch.float32, s) for s in TRITON_SIZES + (GPU_SIZES if HAS_GPU else [])],
    case_id=lambda v: f"{str(v[0])[6:]}-{size_id(v[1])}")


@pytest.mark.parametrize("backend, dtype, size", RUNS)
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_matches_reference(backend, dtype, size, layer_norm):
    T, B, X, H, Hh, Nz = size
    device = device_for(backend)
    ref, fast = make_pair(backend, X, H, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm, dtype=dtype)
    ref, fast = ref.to(device), fast.to(device)
    x = torch.randn(T, B, X, dtype=dtype, device=device)
    tol = F64 if dtype == torch.float64 else GPU_F32 if device == "cuda" else F32
    assert_same_run(ref, fast, x, random_state(ref, B, dtype), **tol)


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_without_bias(bias):
    ref, fast = make_pair("cpu", 4, 9, hyper_size=6, hyper_embed=3, bias=bias)
    assert_same_run(ref, fast, torch.randn(3, 2, 4, dtype=torch.float64), random_state(ref, 2), **F64)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B", [6, 7, 13, 29])
def test_cpu_row_chunks_and_tiles(B, threads):
    """The CPU kernels take each thread's rows in chunks of 12 and run the projections on register tiles of up
    to 6 rows (and as many columns as fit): batch sizes on and around those edges, with one thread (all rows in
    one range) and two, agree with the reference in float64, including the weight-gradient sums. H = 37 and
    N_z = 5 leave tails in every column loop."""
    T, X, H, Hh, Nz = 3, 6, 37, 20, 5
    ref, fast = make_pair("cpu", X, H, hyper_size=Hh, hyper_embed=Nz, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_same_run(ref, fast, torch.randn(T, B, X, dtype=torch.float64), random_state(ref, B), **F64)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("aten", [False, True], ids=["sums-in-kernel", "aten-reductions"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cpu_weight_gradient_sums_either_way(aten, layer_norm, dtype, monkeypatch):
    """The CPU backward kernel sums the row-reduced weight gradients itself; HYPERFUSED_ATEN_REDUCTIONS=1 leaves
    them to ATen after the loop, the path CUDA takes. Both agree with the reference."""
    T, B, X, H, Hh, Nz = 4, 5, 6, 37, 20, 4
    ref, fast = make_pair("cpu", X, H, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm, dtype=dtype)
    monkeypatch.setenv("HYPERFUSED_ATEN_REDUCTIONS", "1" if aten else "0")
    monkeypatch.setenv("HYPERFUSED_STEP_DESIGN", "fused")  # the GEMM-shaped step always leaves them to ATen
    with torch.profiler.profile() as prof:
        assert_same_run(ref, fast, torch.randn(T, B, X, dtype=dtype), random_state(ref, B, dtype),
                        **(F64 if dtype == torch.float64 else F32))
    backward_einsums = [e for e in prof.events() if e.name == "aten::einsum"]  # the reference has none
    assert bool(backward_einsums) == aten


@pytest.mark.parametrize("backend, design, dtype", backend_cases(
    [(b, design, dtype) for b in ("cpu", "cuda") for design in ("fused", "gemm")
     for dtype in (torch.float64, torch.float32)]
    + [("triton", design, torch.float32) for design in ("fused", "gemm")]))
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
@pytest.mark.parametrize("T", [4, 1])
def test_step_designs_match_the_reference(backend, design, dtype, layer_norm, T, monkeypatch):
    """The step as one kernel (the CPU's default), or GEMM-shaped (CUDA's and Triton's default: forward, the hyper cell,
    then z and the 12 scaling vectors as two GEMMs that read each weight once for all rows, then the main
    cell; backward, the main cell, then dz and dĥ as GEMMs, then the hyper cell): HYPERFUSED_STEP_DESIGN
    picks it, and both agree with the reference, zoneout included. With T = 1 the GEMM-shaped step's projections
    run on the parameters themselves (two GEMMs each); with more steps, on copies concatenated once per call."""
    B, X, H, Hh, Nz = 5, 6, 37, 20, 4
    device = device_for(backend)
    ref, fast = make_pair(backend, X, H, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm, dtype=dtype,
                          zoneout=0.2, hyper_zoneout=0.1)
    ref, fast = ref.to(device).eval(), fast.to(device).eval()  # zoneout's expectation: deterministic masks
    monkeypatch.setenv("HYPERFUSED_STEP_DESIGN", design)
    x = torch.randn(T, B, X, dtype=dtype, device=device)
    tol = F64 if dtype == torch.float64 else GPU_F32 if device == "cuda" else F32
    assert_same_run(ref, fast, x, random_state(ref, B, dtype), **tol)
    with torch.profiler.profile() as prof:
        fast(x)[0].sum().backward()
    # GEMM-shaped: one batched GEMM per forward step (d), two per backward step (d_h, dz), and the post-loop
    # reductions' einsums; the one-kernel step on the CPU sums in its kernel (elsewhere the einsums count).
    bmms = len([e for e in prof.events() if e.name == "aten::bmm"])
    if design == "gemm":
        assert bmms >= 3 * T
    elif backend == "cpu":
        assert bmms == 0


ONEDNN, MKL, ONEDNN_PACK = "mkldnn::_linear_pointwise", "hyperfused::mkl_gemm", "hyperfused::onednn_pack"
OWN = "hyperfused::few_rows_gemm"
HAS_ONEDNN_REORDER = hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
# the few-rows kernel runs where the build has AVX-512; elsewhere a forced own runs at::mm
OWN_RUNS = {OWN} if own_kernel_for(torch.float32) else set()


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and HAS_MKL_CBLAS),
                    reason="this torch has no oneDNN or exports no MKL CBLAS")
@pytest.mark.parametrize("library, mkldnn, runs, absent", [
    ("onednn", True, {ONEDNN}, {MKL, ONEDNN_PACK}), ("onednn-packed", True, {ONEDNN, ONEDNN_PACK}, {MKL}),
    ("mkl", True, {MKL}, {ONEDNN}), ("mm", True, set(), {ONEDNN, MKL}),
    ("onednn", False, set(), {ONEDNN, MKL}), ("onednn-packed", False, set(), {ONEDNN, MKL}),
    ("", False, set(), {ONEDNN}), ("", True, set(), set()), ("own", True, OWN_RUNS, {ONEDNN, MKL})],
    ids=["onednn", "onednn-packed", "mkl-packed", "mm", "onednn-but-mkldnn-disabled",
         "onednn-packed-but-mkldnn-disabled", "measured-mkldnn-disabled", "measured", "own"])
def test_cpu_float32_step_gemm_every_way(library, mkldnn, runs, absent, monkeypatch):
    """float32 recurrent GEMMs run in oneDNN (against the weight as it is, or reordered once per call into
    oneDNN's blocked layout for the batch size), at::mm, or MKL with the weight packed once per call, whichever
    measured fastest for the shape on this machine (HYPERFUSED_STEP_GEMM forces one;
    torch.backends.mkldnn.enabled=False rules oneDNN out; own forces the few-rows kernel, where the build has it,
    for the products whose width it covers, at::mm for the rest). Every way agrees with the reference."""
    T, B, X, H, Hh, Nz = 5, 17, 7, 37, 20, 4
    ref, fast = make_pair("cpu", X, H, hyper_size=Hh, hyper_embed=Nz, dtype=torch.float32)
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", library)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", mkldnn)
    with torch.profiler.profile() as prof:
        assert_same_run(ref, fast, torch.randn(T, B, X), random_state(ref, B, torch.float32), **F32)
    names = {e.name for e in prof.events()}
    if not HAS_ONEDNN_REORDER:  # a torch without the reorder runs a forced onednn-packed unpacked
        runs, absent = runs - {ONEDNN_PACK}, absent | {ONEDNN_PACK}
    assert runs <= names and not absent & names


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("w_nk", [False, True], ids=["kn-rows", "nk-rows"])
@pytest.mark.parametrize("library", ["onednn", "onednn-packed", "mkl", "own", "mm"])
def test_step_gemm_adds_its_bias_in_every_library(library, w_nk, with_bias, monkeypatch):
    """A StepGemm with a bias (the layer's time loop makes none today; a decode step on a torch without MKL's batch
    GEMM does) adds it in every library: oneDNN takes it in the call, MKL and the few-rows kernel start from it in
    out (beta = 1), at::mm through addmm. The weight as (K, N) rows and as the transposed view of (N, K) rows;
    out starts as NaN, so a library that read it without a bias (beta = 0) would show. A dropped bias is off by
    ~1, against a tolerance of 1e-5. Where the forced library cannot run (no oneDNN, no MKL CBLAS, no kernel),
    at::mm runs and the result is checked the same."""
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", library)
    m, k, n = 5, 37, 148  # n a multiple of the kernel's 4 columns
    a, w, bias = torch.randn(m, k), torch.randn(k, n), torch.randn(n) if with_bias else None
    stored = w.t().contiguous() if w_nk else w.contiguous()
    out = torch.full((m, n), float("nan"))
    with torch.profiler.profile() as prof:
        hyperfused._extension._C._step_gemm(a.data_ptr(), stored.data_ptr(), w_nk,
                                            bias.data_ptr() if with_bias else 0, out.data_ptr(), m, n, k, 0)
    expected = torch.addmm(bias, a, w) if with_bias else a @ w
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    names = {e.name for e in prof.events()}
    ran = {"onednn": ONEDNN if torch.backends.mkldnn.is_available() else None,
           "onednn-packed": ONEDNN if torch.backends.mkldnn.is_available() else None,
           "mkl": MKL if HAS_MKL_CBLAS else None, "own": OWN if own_kernel_for(torch.float32) else None,
           "mm": None}[library]
    assert ran is None or ran in names


SEQUENCE_ONEDNN = "hyperfused::onednn_sequence_gemm"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
@pytest.mark.parametrize("library, mkldnn, in_onednn", [
    ("onednn", True, True), ("onednn-packed", True, True), ("mm", True, False), ("mkl", True, False),
    ("onednn", False, False), ("own", True, False), ("", True, None)],
    ids=["onednn", "onednn-packed", "mm", "mkl", "onednn-but-mkldnn-disabled", "own", "measured"])
def test_cpu_float32_sequence_gemms_every_way(library, mkldnn, in_onednn, monkeypatch):
    """The products over the whole sequence (the input projections, the input's and the weights' gradients) run in
    at::mm or oneDNN's matmul, which reads some of them transposed ((bᵀ·aᵀ)ᵀ) and copies the weight views with
    gaps (slices of dg, narrowed parameters) that it would read through a slow reference kernel; forced, or
    measured (either may win). Every way, the outputs, final states and all gradients agree with the reference at
    odd sizes over two layers (the second reads the first's output; the hyper input projection carries its bias)."""
    T, B, X, H, Hh, Nz = 6, 5, 11, 37, 20, 4
    ref, fast = make_pair("cpu", X, H, num_layers=2, hyper_size=Hh, hyper_embed=Nz, dtype=torch.float32)
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", library)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", mkldnn)
    with torch.profiler.profile() as prof:
        assert_same_run(ref, fast, torch.randn(T, B, X), random_state(ref, B, torch.float32), **F32)
    if in_onednn is not None:
        assert (SEQUENCE_ONEDNN in {e.name for e in prof.events()}) == in_onednn


# what runs a product anywhere but in ATen's own ops
LIBRARIES = {ONEDNN, MKL, ONEDNN_PACK, OWN, SEQUENCE_ONEDNN, "hyperfused::mkl_pack", "hyperfused::mkl_batch",
             "hyperfused::mkl_bf16", "hyperfused::onednn_gemm", "hyperfused::few_rows_gemm_batch"}


def test_cpu_deterministic_algorithms_measure_no_library(monkeypatch):
    """A measured choice of library is made per process, and the libraries sum in different orders, so two
    processes could differ in the last bits. Under torch.use_deterministic_algorithms(True), with
    HYPERFUSED_STEP_GEMM unset, nothing is measured: a training call (forward and backward) runs every product in
    ATen's ops and gives the same bits as HYPERFUSED_STEP_GEMM=mm; decode steps make their products directly, in
    the few-rows kernel where the build has it, else MKL (ATen's ops took 1.8-4.9x their time), with no trial of
    another library, and give the same bits as HYPERFUSED_STEP_GEMM=own. The
    products are above the size under which at::mm runs unmeasured anyway: measured in a fresh process on an
    AVX-512 machine, oneDNN's, MKL's and the few-rows kernel's records all appear here, each at least in its
    trial."""
    monkeypatch.delenv("HYPERFUSED_STEP_GEMM", raising=False)
    T, B, X, H, Hh, Nz = 3, 32, 64, 128, 32, 4
    ref, fast = make_pair("cpu", X, H, hyper_size=Hh, hyper_embed=Nz, dtype=torch.float32)
    cell = hyperfused.HyperLSTMCell(X, H, hyper_size=Hh, hyper_embed=Nz, backend="cpu")
    x, state = torch.randn(T, B, X), random_state(ref, B, torch.float32)

    def decode():
        with torch.no_grad():
            return cell(x[1], cell(x[0])).tensors()

    with deterministic_algorithms():
        with torch.profiler.profile() as prof:
            outs, grads = run_and_grad(fast, x, state)
        assert not LIBRARIES & {e.name for e in prof.events()}
        with torch.profiler.profile() as prof:
            steps = decode()
        names = {e.name for e in prof.events()}
        direct = {"hyperfused::mkl_batch", OWN, "hyperfused::few_rows_gemm_batch"}
        assert not (LIBRARIES - direct) & names  # no oneDNN: not even a trial
        assert direct & names or not HAS_MKL_BATCH
        assert bool(OWN_RUNS) == (OWN in names)
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", "mm")
    outs_mm, grads_mm = run_and_grad(fast, x, state)
    assert all(torch.equal(a, b) for a, b in zip(outs, outs_mm, strict=True))
    assert grads.keys() == grads_mm.keys() and all(torch.equal(grads[k], grads_mm[k]) for k in grads)
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", "own")
    assert all(torch.equal(a, b) for a, b in zip(steps, decode(), strict=True))
    assert_same_run(ref, fast, x, state, **F32)


def test_products_too_small_to_time_run_mm_unmeasured(monkeypatch):
    """Below 64K multiply-adds timing cannot tell the libraries apart, so a measured choice would differ from
    process to process (and so would the last bits, say of a run resumed from a checkpoint): with
    HYPERFUSED_STEP_GEMM unset, every product of a training call at H = 16, B = 4 runs at::mm, unmeasured (no
    library's record, not even a trial's). A StepGemm just above the size (fresh, so nothing is remembered) does
    measure: the records of every library this machine has appear, so the first half can fail."""
    monkeypatch.delenv("HYPERFUSED_STEP_GEMM", raising=False)
    ref, fast = make_pair("cpu", 8, 16, hyper_size=8, hyper_embed=4, dtype=torch.float32)
    x, state = torch.randn(3, 4, 8), random_state(ref, 4, torch.float32)
    with torch.profiler.profile() as prof:
        assert_same_run(ref, fast, x, state, **F32)
    assert not LIBRARIES & {e.name for e in prof.events()}
    m, k, n = 19, 41, 88  # 68,552 multiply-adds
    a, w, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
    with torch.profiler.profile() as prof:
        hyperfused._extension._C._step_gemm(a.data_ptr(), w.data_ptr(), False, 0, out.data_ptr(), m, n, k, 0)
    torch.testing.assert_close(out, a @ w, rtol=1e-5, atol=1e-5)
    measured = ({ONEDNN} if torch.backends.mkldnn.is_available() else set()) | (
        {MKL} if HAS_MKL_CBLAS else set()) | OWN_RUNS
    assert measured <= {e.name for e in prof.events()}


@pytest.mark.skipif(not HAS_MKL_CBLAS, reason="this torch exports no MKL CBLAS")
def test_cpu_decode_in_mkl_follows_the_batch_size(monkeypatch):
    """Decode steps with MKL's GEMMs (HYPERFUSED_STEP_GEMM=mkl: the direct batch calls where torch exports them,
    else StepGemm's packed weights, each for one batch size) over batches of 2, then 3, then 2 rows: the
    per-thread scratch grows and is reused, and each step matches the reference."""
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", "mkl")
    ref = randomize_(hyperfused.HyperLSTMCell(5, 37, hyper_size=20, hyper_embed=4, backend="reference"))
    cell = hyperfused.HyperLSTMCell(5, 37, hyper_size=20, hyper_embed=4, backend="cpu")
    cell.load_state_dict(ref.state_dict())
    with torch.no_grad(), torch.profiler.profile() as prof:
        for B in (2, 3, 2):
            x = torch.randn(3, B, 5)
            s, s_ref = cell(x[0]), ref(x[0])
            for x_t in x[1:]:
                s, s_ref = cell(x_t, s), ref(x_t, s_ref)
                for a, b in zip(s.tensors(), s_ref.tensors(), strict=True):
                    torch.testing.assert_close(a, b, **F32)
    names = {e.name for e in prof.events()}
    assert ("hyperfused::mkl_batch" if HAS_MKL_BATCH else MKL) in names


@pytest.mark.skipif(not HAS_MKL_CBLAS, reason="this torch exports no MKL CBLAS")
def test_cpu_inference_sees_every_change_of_the_weights(monkeypatch):
    """Without gradients, as with them, the forward makes its weight copies and MKL's packed weights on every
    call: a copy kept across calls would miss an in-place change made through .data, which no version counter
    records (manual SGD, EMA and clipping code make such changes; a stale copy gave outputs 0.19 off here).
    Changed three ways, each call matches the reference at float32 tolerances."""
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", "mkl")
    ref = randomize_(hyperfused.HyperLSTM(5, 37, hyper_size=20, hyper_embed=4, backend="reference"))
    fast = hyperfused.HyperLSTM(5, 37, hyper_size=20, hyper_embed=4, backend="cpu")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5)

    def packs(fn):
        with torch.profiler.profile() as prof:
            fn()
        return sum(e.name == "hyperfused::mkl_pack" for e in prof.events())

    def same():
        torch.testing.assert_close(fast(x)[0], ref(x)[0], **F32)

    with torch.no_grad():
        assert packs(same) == 2  # [W_h; Ŵ_x,h] and Ŵ_h
        for m in (fast, ref):  # as an optimiser does
            m.weight_hh_l0.add_(0.5)
            m.hyper_weight_hh_l0.mul_(0.5)
        same()
        for m in (fast, ref):  # through .data: the same storage and version
            m.weight_hh_l0.data.mul_(-1.0)
            m.scale_weight_l0.data.mul_(2.0)
            m.z_weight_l0.data.mul_(-1.0)
            m.bias_ih_l0.data.add_(0.5)
        same()
        for m in (fast, ref):  # new storage
            m.hyper_weight_ih_l0.data = m.hyper_weight_ih_l0.data * 0.5
        same()
    assert packs(lambda: fast(x)[0].sum().backward()) == 4


@pytest.mark.parametrize("bidirectional", [False, True])
def test_cpu_multilayer_bidirectional(bidirectional):
    ref, fast = make_pair("cpu", 5, 11, num_layers=2, bidirectional=bidirectional, hyper_size=6, hyper_embed=4)
    assert_same_run(ref, fast, torch.randn(4, 3, 5, dtype=torch.float64), random_state(ref, 3), **F64)


def test_cpu_packed_sequence_bidirectional():
    from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence
    ref, fast = make_pair("cpu", 3, 7, num_layers=2, bidirectional=True, hyper_size=5, hyper_embed=2)
    seqs = [torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (2, 5, 3)]
    results = []
    for m in (ref, fast):
        m.zero_grad()
        out, (h, c) = m(pack_sequence(seqs, enforce_sorted=False))
        padded, _ = pad_packed_sequence(out)
        (padded.square().sum() + h.sum() + c.square().sum()).backward()
        results.append([padded, h, c] + [s.grad.clone() for s in seqs] + [p.grad.clone() for p in m.parameters()])
        for s in seqs:
            s.grad = None
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **F64)


def test_cpu_recurrent_dropout_same_masks_as_reference():
    ref, fast = make_pair("cpu", 4, 6, hyper_size=5, hyper_embed=2, recurrent_dropout=0.4)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    state = random_state(ref, 2)
    outs = []
    for m in (ref, fast):
        torch.manual_seed(11)
        outs.append(m(x, state)[0])
    torch.testing.assert_close(outs[1], outs[0], **F64)


def test_cpu_inter_layer_dropout_same_as_reference_under_a_seed():
    ref, fast = make_pair("cpu", 4, 6, num_layers=3, dropout=0.3, hyper_size=5, hyper_embed=2)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    outs = []
    for m in (ref, fast):
        torch.manual_seed(5)
        outs.append(m(x)[0])
    torch.testing.assert_close(outs[1], outs[0], **F64)


def _op_inputs(T=3, B=2, X=3, H=5, Hh=4, Nz=2, layer_norm=True, masks=False):
    m = randomize_(hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, layer_norm=layer_norm,
                                        dtype=torch.float64))
    params = [p.detach().clone().requires_grad_(p.requires_grad) for p in m.cells[0].flat_params()]
    x = torch.randn(T, B, X, dtype=torch.float64, requires_grad=True)
    state = [torch.randn(B, n, dtype=torch.float64, requires_grad=True) for n in (H, H, Hh, Hh)]
    mask = hyper_mask = None
    if masks:
        mask = torch.bernoulli(torch.full((T, B, H), 0.7, dtype=torch.float64)) / 0.7
        hyper_mask = torch.bernoulli(torch.full((T, B, Hh), 0.7, dtype=torch.float64)) / 0.7
    return x, state, params, mask, hyper_mask


@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("design", ["fused", "gemm"])
def test_gradcheck_cpu_op(layer_norm, masks, design, monkeypatch):
    monkeypatch.setenv("HYPERFUSED_STEP_DESIGN", design)
    x, state, params, mask, hyper_mask = _op_inputs(layer_norm=layer_norm, masks=masks)
    trainable = [p for p in params if p.requires_grad]

    def f(x, h0, c0, hh0, hc0, *ps):
        it = iter(ps)
        full = [next(it) if p.requires_grad else p for p in params]
        return tuple(torch.ops.hyperfused.hyper_lstm_forward(x, h0, c0, hh0, hc0, full, mask, hyper_mask,
                                                             layer_norm, 1.0)[:4])

    assert torch.autograd.gradcheck(f, (x, *state, *trainable))


def test_torch_compile_fullgraph_has_no_graph_break():
    m = randomize_(hyperfused.HyperLSTM(4, 8, num_layers=2, hyper_size=6, hyper_embed=2, backend="cpu"))
    x = torch.randn(5, 3, 4)

    def run(x):
        out, state = m(x)
        return out, state[0], state[1], state.hyper_h

    compiled = torch.compile(run, fullgraph=True)  # inductor; fullgraph makes any graph break an error
    expected = run(x)
    got = compiled(x)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    got[0].sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_op_checks_its_inputs():
    x, state, params, _, _ = _op_inputs()
    op = torch.ops.hyperfused.hyper_lstm_forward
    with pytest.raises(RuntimeError, match=r"'weight_hh' has shape \[20, 4\], expected \[20, 5\]"):
        op(x, *state, params[:1] + [params[1][:, :4].contiguous()] + params[2:], None, None, True, 1.0)
    with pytest.raises(RuntimeError, match=r"'c0' has dtype Float, expected Double"):
        op(x, state[0], state[1].float(), *state[2:], params, None, None, True, 1.0)
    with pytest.raises(RuntimeError, match=r"'x' must have shape \(T, B, input_size\)"):
        op(x[0], *state, params, None, None, True, 1.0)
    with pytest.raises(RuntimeError, match=r"'params' must hold 19 tensors, got 18"):
        op(x, *state, params[:-1], None, None, True, 1.0)
    with pytest.raises(RuntimeError, match=r"'mask' has shape \[3, 2, 4\], expected \[3, 2, 5\]"):
        op(x, *state, params, torch.ones(3, 2, 4, dtype=torch.float64), None, True, 1.0)
    with pytest.raises(RuntimeError, match=r"'x' must be contiguous"):
        op(x.detach().transpose(0, 1).contiguous().transpose(0, 1), *state, params, None, None, True, 1.0)


HALF_RUNS = backend_cases([("cpu", torch.bfloat16), ("cpu", torch.float16), ("cuda", torch.float16),
                           ("cuda", torch.bfloat16), ("triton", torch.bfloat16), ("triton", torch.float16)])
# The fused ops compute a half-precision module in float32 on its own (already rounded) parameters and
# inputs and round the outputs once: against the float32 reference on those same values the error is the
# output's rounding, half a unit in the last place for |h| < 1 (2^-9 in bfloat16, 2^-12 in float16), plus
# float32 noise. Measured over 10 seeds on the CPU: at most 1.95e-3 (bfloat16) and 2.4e-4 (float16), while
# a dropped forget bias or a missing layer norm moved the outputs by at least 0.29 (checked below each run).
HALF_TOL = {torch.bfloat16: 4e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("backend, dtype", HALF_RUNS)
def test_half_precision_module_matches_the_float32_reference_on_its_own_values(backend, dtype):
    device = device_for(backend)
    kw = dict(hyper_size=16, hyper_embed=4, device=device)
    fast = randomize_(hyperfused.HyperLSTM(8, 32, backend=backend, **kw), scale=0.3).to(dtype)
    ref = hyperfused.HyperLSTM(8, 32, backend="reference", **kw)
    ref.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    x = torch.randn(6, 4, 8, device=device).to(dtype)
    out, state = fast(x)
    assert out.dtype == dtype and state.hyper_c.dtype == dtype
    expected, _ = ref(x.float())
    err = (out.float() - expected).abs().max().item()
    assert err <= HALF_TOL[dtype], err
    # The tolerance must be far below the effect of a plausible bug, measured here on the same model:
    no_forget_bias = (_with(ref, forget_bias=0.0)(x.float())[0] - expected).abs().max().item()
    no_layer_norm = (_with(ref, layer_norm=False)(x.float())[0] - expected).abs().max().item()
    assert min(no_forget_bias, no_layer_norm) > 5 * HALF_TOL[dtype], (no_forget_bias, no_layer_norm)


def _with(m, **changes):
    """The same weights with one option changed on every cell (a plausible implementation bug)."""
    import copy
    other = copy.deepcopy(m)
    for cell in other.cells:
        for k, v in changes.items():
            setattr(cell, k, v)
    return other


# -- CUDA: what the CPU tests above check, on the GPU -------------------------------------------------------

def _cuda_pair(*args, dtype, **kwargs):
    ref, fast = make_pair("cuda", *args, dtype=dtype, **kwargs)
    return ref.cuda(), fast.cuda()


@requires_gpu
def test_cuda_multilayer_bidirectional_with_dropout():
    ref, fast = _cuda_pair(5, 11, num_layers=2, bidirectional=True, hyper_size=6, hyper_embed=4,
                           recurrent_dropout=0.2, dtype=torch.float64)
    x = torch.randn(4, 3, 5, dtype=torch.float64, device="cuda")
    outs = []
    for m in (ref, fast):
        torch.manual_seed(0)
        outs.append(m(x)[0])
    torch.testing.assert_close(outs[1], outs[0], **F64)


INFERENCE_RUNS = backend_cases([("cpu", (5, 3, 7, 37, 20, 4)), ("cuda", (5, 3, 7, 37, 20, 4)),
                                ("triton", (3, 2, 5, 24, 12, 4))], case_id=lambda v: size_id(v[0]))


def _op_for(backend):
    ops = torch.ops.hyperfused
    return ops.hyper_lstm_triton_forward if backend == "triton" else ops.hyper_lstm_forward


@pytest.mark.parametrize("backend, size", INFERENCE_RUNS)
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
def test_inference_forward_saves_nothing_and_computes_the_same(backend, size, masks):
    """save_for_backward=False: g and ws come back empty (one step's scratch is reused instead of T steps'),
    and every output equals the training forward's to float32 rounding. Not always bit for bit: in the
    GEMM-shaped step the embeddings and scaling vectors are GEMMs on the z slot of the step's workspace, which
    sits at another address in the one reused step than in the training forward's T steps, and MKL's kernels
    may round differently by operand alignment (1-2 ulp on an AMD EPYC; equal on an Intel Xeon). 1e-6 is
    allowed; dropping the forget bias moves the outputs by more than 0.01 (checked below)."""
    T, B, X, H, Hh, Nz = size
    device = device_for(backend)
    m = randomize_(hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, device=device))
    params = [p.detach() for p in m.cells[0].flat_params()]
    x = torch.randn(T, B, X, device=device)
    state = [torch.randn(B, n, device=device) for n in (H, H, Hh, Hh)]
    masks = [torch.bernoulli(torch.full((T, B, n), 0.7, device=device)) for n in (H, Hh, H, Hh)] if masks \
        else [None] * 4
    args = [x, *state, params, masks[0], masks[1], True, 1.0, masks[2], masks[3]]
    train = _op_for(backend)(*args)
    infer = _op_for(backend)(*args, save_for_backward=False)
    assert train[4].shape == (T, B, 4 * H + 4 * Hh) and infer[4].shape == (0, B, 4 * H + 4 * Hh)
    assert infer[5].shape == (0, B, train[5].shape[2])
    for a, b in zip(train[:4], infer[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    args[-3] = 0.0  # forget_bias
    wrong = _op_for(backend)(*args, save_for_backward=False)
    assert (wrong[1] - train[1]).abs().max() > 0.01


@pytest.mark.parametrize("backend", [p for p in ("cpu", "triton")])
def test_module_saves_for_backward_only_when_a_gradient_can_be_asked_for(backend, monkeypatch):
    if backend not in hyperfused.available_backends():
        pytest.skip(f"the {backend} backend is not available here")
    name = "hyper_lstm_triton_forward" if backend == "triton" else "hyper_lstm_forward"
    real, seen = getattr(torch.ops.hyperfused, name), []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("save_for_backward", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.ops.hyperfused, name, spy)
    m = hyperfused.HyperLSTM(3, 8, hyper_size=4, hyper_embed=2, backend=backend)
    x = torch.randn(2, 1, 3)
    m(x)                                   # parameters require grad: saved
    with torch.no_grad():
        m(x)                               # no_grad: nothing saved
    with torch.inference_mode():
        m(x)
    m.requires_grad_(False)
    m(x)                                   # nothing requires grad
    m(x.requires_grad_())                  # the input does
    assert seen == [True, False, False, False, True]


def test_differentiating_an_inference_forward_is_a_clear_error():
    x = torch.randn(2, 1, 3, requires_grad=True)
    m = randomize_(hyperfused.HyperLSTM(3, 8, hyper_size=4, hyper_embed=2))
    state = [torch.zeros(1, n) for n in (8, 8, 4, 4)]
    outs = torch.ops.hyperfused.hyper_lstm_forward(x, *state, m.cells[0].flat_params(), None, None, True, 1.0,
                                                   save_for_backward=False)
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        outs[0].sum().backward()


def test_the_time_loops_make_no_tensor_views_per_step(monkeypatch):
    """Per step the C++ driver calls its GEMMs and the step kernel; the kernels' pointers come by address
    arithmetic and the GEMM operands' views are made once per call (unbind). Counted as the ATen calls that a
    longer sequence adds per step, the GEMMs' own (mm and its resolve_conj) aside: the unbinds' views, 12 at
    most (6 tensors), where the loops that made a dozen views per step added 49. (The recurrent GEMMs run as
    torch.mm here, so that oneDNN's calls, which the CPU may choose instead, do not enter the count.)"""
    from collections import Counter
    monkeypatch.setenv("HYPERFUSED_STEP_GEMM", "mm")
    m = hyperfused.HyperLSTM(6, 24, hyper_size=12, hyper_embed=4, backend="cpu")

    def calls(T):
        x = torch.randn(T, 3, 6)
        m(x)[0].sum().backward()  # warm-up
        with torch.profiler.profile() as prof:
            m(x)[0].sum().backward()
        return Counter(e.name for e in prof.events() if e.name.startswith("aten::"))

    short, long = calls(10), calls(20)
    gemm = {"aten::mm", "aten::addmm", "aten::resolve_conj"}
    per_step = {k: (long[k] - short[k]) / 10 for k in set(short) | set(long) if k not in gemm}
    assert sum(per_step.values()) <= 12, per_step
    assert (long["aten::mm"] - short["aten::mm"]) / 10 == 4  # two recurrent GEMMs forward, two backward


@pytest.mark.parametrize("backend", ["auto", "reference", *backend_params("cpu", "cuda", "triton")])
def test_an_empty_batch_runs_as_on_nn_lstm(backend):
    """B = 0, which nn.LSTM and nn.LSTMCell accept (a filtered or sharded batch can be empty): the same output and
    state shapes as theirs, every parameter's gradient a zero tensor (not None, as a real batch's optimizer step
    expects), a returned state passed back, a one-step call without gradients (the decode path), the cell."""
    device = device_for(backend) if backend in ("cpu", "cuda", "triton") else "cpu"
    m = hyperfused.HyperLSTM(5, 7, num_layers=2, bidirectional=True, hyper_size=6, hyper_embed=3, backend=backend,
                             device=device)
    lstm = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True, device=device)
    x = torch.randn(4, 0, 5, device=device)
    (out, state), (want, (h, c)) = m(x), lstm(x)
    assert out.shape == want.shape and state[0].shape == h.shape and state[1].shape == c.shape
    assert state.hyper_h.shape == state.hyper_c.shape == (4, 0, 6)
    (out.sum() + state[1].sum()).backward()
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    assert m(x, state)[0].shape == want.shape
    with torch.no_grad():
        assert m(x[:1], state)[0].shape == (1, 0, 14)
    cell = hyperfused.HyperLSTMCell(5, 7, hyper_size=6, hyper_embed=3, backend=backend, device=device)
    s = cell(x[0])
    assert s[0].shape == torch.nn.LSTMCell(5, 7, device=device)(x[0])[0].shape == (0, 7)
    with torch.no_grad():
        assert cell(x[0], s)[1].shape == (0, 7)


# (T, B, X, H, P, Hh, Nz) for nn.LSTM's projection: T = 1 (the first step alone, its own call on the padded h_0),
# H = 37 with P = 11, B = 1.
PROJECTED = [(1, 2, 3, 9, 4, 5, 2), (4, 1, 5, 37, 11, 20, 4), (5, 3, 6, 16, 5, 8, 3)]
PROJECTED_RUNS = backend_cases(
    [(b, d, s) for b in ("cpu", "cuda") for d in (torch.float64, torch.float32) for s in PROJECTED] +
    [("triton", torch.float32, s) for s in PROJECTED[:2]],
    case_id=lambda v: f"{str(v[0])[6:]}-T{v[1][0]}B{v[1][1]}H{v[1][3]}P{v[1][4]}")


@pytest.mark.parametrize("backend, dtype, size", PROJECTED_RUNS)
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_a_projection_matches_the_reference(backend, dtype, size, layer_norm):
    """proj_size > 0 on a fused backend (its steps on the unprojected state, with W_h·W_hr and Ŵ_x's h columns
    times W_hr as the weights that read it; the first step a call of its own on h_0 and the weights that read
    it padded with zeros), two bidirectional layers, against the reference: every output, state and gradient,
    W_hr's included. The tolerances are the unprojected tests', but for float32 an atol of 1e-4 (of the largest
    entry): without layer norm, these random weights' float32 gradients are that ill-conditioned — measured
    against the float64 reference over six seeds at T4B1H37P11, the float32 reference itself is off by up to
    1.9e-5 of the largest entry, the fused layer by up to 3.9e-5 (3.5e-5 with the first step in the reference's
    ops), with layer norm both under 1e-6. Reading the projected h where the unprojected one belongs changes the
    outputs at the first decimal."""
    T, B, X, H, P, Hh, Nz = size
    device = device_for(backend)
    ref, fast = make_pair(backend, X, H, 2, bidirectional=True, proj_size=P, hyper_size=Hh, hyper_embed=Nz,
                          layer_norm=layer_norm, dtype=dtype)
    ref, fast = ref.to(device), fast.to(device)
    x = torch.randn(T, B, X, dtype=dtype, device=device)
    tol = F64 if dtype == torch.float64 else GPU_F32 if device == "cuda" else dict(F32, atol=1e-4)
    assert_same_run(ref, fast, x, random_state(ref, B, dtype), **tol)


@pytest.mark.parametrize("backend", backend_params("cpu", "cuda"))
@pytest.mark.parametrize("masks", [dict(recurrent_dropout=0.3, hyper_zoneout=0.2), dict(zoneout=0.25)],
                         ids=["dropout-hyper-zoneout", "zoneout"])
def test_a_projection_with_masks_matches_the_reference(backend, masks):
    """Training with recurrent dropout and zoneout on ĥ (the fused route), and with zoneout on the projected h
    (which no unprojected state gives: the reference's ops run that layer): the same masks drawn from the same
    seed, float64."""
    device = device_for(backend)
    ref, fast = make_pair(backend, 5, 12, proj_size=4, hyper_size=6, hyper_embed=3, **masks)
    ref, fast = ref.to(device), fast.to(device)
    x, state = torch.randn(6, 3, 5, dtype=torch.float64, device=device), random_state(ref, 3)
    assert_same_run(ref, fast, x, state, **F64, seed=11, scaled=False)
