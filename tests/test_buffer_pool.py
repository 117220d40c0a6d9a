"""The CPU ops' reused buffers (csrc/cpu/buffer_pool.h): a call reuses the memory of the previous call's
freed buffers, never reads what that call left in them, and the cache obeys its size setting."""
import pytest
import torch

import hyperfused
from conftest import requires_extension
from helpers import assert_same_run, make_pair, random_state, randomize_

pytestmark = requires_extension

# Sizes whose buffers reach the pool's 1 MB minimum: g, ws, dg and dws hold T·B = 800 rows of 500-1000 floats.
T, B, X, H, Hh, Nz = 40, 20, 16, 64, 32, 8
F32 = dict(rtol=2e-4, atol=2e-5)


def _forward(m, x, save=True):
    h0 = torch.zeros(B, H)
    hh0 = torch.zeros(B, Hh)
    params = [p.detach() for p in m.cells[0].flat_params()]
    return torch.ops.hyperfused.hyper_lstm_forward(x, h0, h0, hh0, hh0, params, None, None, True, 1.0,
                                                   save_for_backward=save)


@pytest.fixture
def cache_mb(monkeypatch):
    def set_to(mb):
        monkeypatch.setenv("HYPERFUSED_CPU_BUFFER_CACHE_MB", str(mb))
    hyperfused.empty_cpu_buffer_cache()
    yield set_to
    monkeypatch.delenv("HYPERFUSED_CPU_BUFFER_CACHE_MB", raising=False)
    hyperfused.empty_cpu_buffer_cache()


def test_freed_buffers_are_reused(cache_mb):
    m = hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, backend="cpu")
    x = torch.randn(T, B, X)
    outs = _forward(m, x)
    g, ws = outs[4], outs[5]
    pointers = {g.data_ptr(), ws.data_ptr()}
    sizes = g.numel() * 4 + ws.numel() * 4
    del outs, g, ws
    assert hyperfused.cpu_buffer_cache_bytes() >= sizes
    again = _forward(m, x)
    assert {again[4].data_ptr(), again[5].data_ptr()} == pointers


def test_a_shorter_sequence_reuses_a_larger_block(cache_mb):
    """A block serves a request up to a quarter smaller: ws at T = 160 (7.5 MB) reuses the 8 MB block that g
    had at T = 200 rather than taking new memory."""
    m = hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, backend="cpu")
    outs = _forward(m, torch.randn(200, B, X))
    pointers = {t.data_ptr() for t in outs}
    del outs
    again = _forward(m, torch.randn(160, B, X))
    assert again[5].data_ptr() in pointers


def test_threads_share_the_cache(cache_mb):
    """Two threads running forward+backward at once, each many times: every result matches the reference."""
    import threading
    ref, fast = make_pair("cpu", X, H, hyper_size=Hh, hyper_embed=Nz, dtype=torch.float32)
    xs = [torch.randn(T, B, X) for _ in range(2)]
    expected = [ref(x)[0].detach() for x in xs]
    failures = []

    def work(i):
        for _ in range(5):
            x = xs[i].clone().requires_grad_()
            out, _ = fast(x)
            out.sum().backward()
            if not torch.allclose(out, expected[i], rtol=2e-4, atol=2e-5) or not x.grad.isfinite().all():
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_cache_size_setting(cache_mb):
    m = hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, backend="cpu")
    x = torch.randn(T, B, X)
    cache_mb(0)  # reuse off: nothing is kept
    del_outs = _forward(m, x)
    del del_outs
    assert hyperfused.cpu_buffer_cache_bytes() == 0
    cache_mb(3)  # room for one 2 MB block (g), not for ws as well
    outs = _forward(m, x)
    del outs
    assert 0 < hyperfused.cpu_buffer_cache_bytes() <= 3 * 2**20
    cache_mb(1024)
    outs = _forward(m, x)
    del outs
    held = hyperfused.cpu_buffer_cache_bytes()
    assert held > 3 * 2**20
    assert hyperfused.empty_cpu_buffer_cache() == held
    assert hyperfused.cpu_buffer_cache_bytes() == 0


def test_cache_setting_must_be_a_size(cache_mb, monkeypatch):
    monkeypatch.setenv("HYPERFUSED_CPU_BUFFER_CACHE_MB", "lots")
    m = hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, backend="cpu")
    with pytest.raises(RuntimeError, match="HYPERFUSED_CPU_BUFFER_CACHE_MB must be a non-negative integer"):
        _forward(m, torch.randn(T, B, X))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reused_buffers_hold_no_stale_values(dtype, cache_mb):
    """A forward+backward whose every buffer is NaN (NaN input), then one on fresh inputs in the same memory:
    it matches the reference exactly as a first call does. A value any kernel read before writing it would
    carry a NaN into some output or gradient."""
    ref, fast = make_pair("cpu", X, H, hyper_size=Hh, hyper_embed=Nz, dtype=dtype)
    state = random_state(ref, B, dtype)
    poisoned = torch.full((T, B, X), float("nan"), dtype=dtype, requires_grad=True)
    out, _ = fast(poisoned, state)
    out.sum().backward()
    assert out.isnan().all()
    del out
    assert hyperfused.cpu_buffer_cache_bytes() > 0
    tol = F32 if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    assert_same_run(ref, fast, torch.randn(T, B, X, dtype=dtype), state, **tol)


def test_reused_kernel_buffer_holds_no_stale_values(cache_mb):
    """The tile generation's output comes from the pool too (≥ 1 MB here: 60 tiles of 16 × 16 × 3 × 3 in
    float64, plus 5000 elements no tile covers). After a call with NaN weights, a call in the same memory
    gives the reference's tiles and zeros where no tile lies."""
    net = randomize_(hyperfused.StaticHyperNetwork(4, 16, 16, 3, dtype=torch.float64))
    conv = hyperfused.HyperConv2d(16 * 10, 16 * 6, 3, hypernet=net, dtype=torch.float64)
    meta, spans, numel = hyperfused.ops.tile_layout([(conv.out_channels, conv.in_channels)], 16, 16, 3)
    op = torch.ops.hyperfused.generate_kernels
    params = [p.detach() for p in (net.w_in, net.b_in, net.w_out, net.b_out)]
    z = conv.z.detach()
    first = op(z, params[0], params[1], params[2].clone().fill_(float("nan")), params[3], meta, numel + 5000, 3)
    assert first[:numel].isnan().all()
    pointer = first.data_ptr()
    del first
    flat = op(z, *params, meta, numel + 5000, 3)
    assert flat.data_ptr() == pointer
    net.backend = "reference"
    (expected,) = net.generate([conv])
    (offset, n), = spans
    torch.testing.assert_close(flat[offset:offset + n].view_as(expected), expected.detach(), rtol=1e-10, atol=1e-12)
    assert (flat[numel:] == 0).all()


def test_pooled_tensors_resize_and_serialise_like_any_tensor(cache_mb, tmp_path):
    """A pooled tensor's storage is an ordinary one with the pool as its allocator: it can grow (into a new
    block, its values kept), be saved and loaded, and shared between processes."""
    m = hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, backend="cpu")
    ws = _forward(m, torch.randn(T, B, X))[5]
    assert ws.numel() * 4 >= 2**20  # from the pool
    before = ws.clone()
    ws.resize_(2 * T, B, ws.shape[2])
    torch.testing.assert_close(ws[:T], before, rtol=0, atol=0)
    torch.save(ws, tmp_path / "ws.pt")
    torch.testing.assert_close(torch.load(tmp_path / "ws.pt")[:T], before, rtol=0, atol=0)
    assert ws.share_memory_().is_shared()
    torch.testing.assert_close(ws[:T], before, rtol=0, atol=0)


def test_a_child_forked_while_a_thread_holds_the_cache_can_use_it(cache_mb):
    """fork() while another thread is inside the cache (holding its lock): the pool holds the lock across
    fork, so the fork waits for that thread and the child finds the lock free. Without that, the child would
    inherit a lock taken by a thread it does not have, and hang at its first use of the cache."""
    import os
    import threading
    import time

    from hyperfused import _extension
    holder = threading.Thread(target=_extension._C._hold_cpu_buffer_cache_lock, args=(300,))
    holder.start()
    time.sleep(0.05)  # the holder is inside the lock now
    pid = os.fork()
    if pid == 0:  # the child: only the cache's own functions (no OpenMP after fork)
        hyperfused.cpu_buffer_cache_bytes()
        hyperfused.empty_cpu_buffer_cache()
        os._exit(0)
    holder.join()
    deadline = time.monotonic() + 10
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung on the buffer cache's lock")
        time.sleep(0.01)
