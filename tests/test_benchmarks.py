"""The benchmark suite runs end to end at a tiny size and writes valid JSON with every available backend."""
import json
import math

import pytest
import torch

import hyperfused
from benchmarks.__main__ import main
from conftest import requires_extension


def test_benchmark_suite_smoke(tmp_path, capfd):
    """Also: nothing about CUDA is printed on a machine without a GPU."""
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    # The smallest configuration, without the torch.compile'd row (compiling alone takes a minute or more).
    main(["--config", "3,2,4,8,4,2", "--repeats", "2", "--compile", "none", "--wrn", "10,1", "--json", str(out),
          "--plot", str(png)])
    data = json.loads(out.read_text())
    rows = {r["row"] for r in data["lstm"]}
    assert {"nn.LSTM", "HyperLSTM GEMMs alone (torch.mm)", "reference"} <= rows
    assert "reference + torch.compile" not in rows
    for backend in hyperfused.ops.backends_for(__import__("torch").device("cpu")):
        if backend not in ("reference", "triton"):
            assert f"hyperfused {backend}" in rows
    for r in data["lstm"]:
        for key in ("fwd_ms", "fwd_bwd_ms", "tokens_per_s", "vs_lstm", "speedup_vs_reference"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["row"], key, r[key])
    static = {r["row"] for r in data["static"]}
    assert "per-tile loop (reference)" in static and any(r.startswith("hyperfused") for r in static)
    assert all(r["ms"] > 0 for r in data["static"])
    assert png.stat().st_size > 10_000
    decode = {r["row"] for r in data["decode"]}
    assert "nn.LSTMCell" in decode and "HyperLSTMCell reference" in decode
    assert "nn.LSTM called with T = 1" in decode and "HyperLSTM reference called with T = 1" in decode
    assert all(r["us_per_step"] > 0 for r in data["decode"])
    captured = capfd.readouterr()
    printed = captured.out
    assert "| implementation | fwd ms | fwd+bwd ms |" in printed and "time vs nn.LSTM" in printed
    if not __import__("torch").cuda.is_available():
        assert "CUDA" not in captured.err and "gpuGetDeviceCount" not in captured.err


def test_breakdown_runs_and_accounts_for_the_time(capfd):
    import torch

    from benchmarks.breakdown import PARTS, breakdown
    from benchmarks.breakdown import main as breakdown_main
    from benchmarks.hyper_lstm import Config
    breakdown_main(["--config", "3,2,4,8,4,2", "--iters", "1"])
    captured = capfd.readouterr()
    printed = captured.out
    if not torch.cuda.is_available():  # the profiler's failed GPU probe used to print an ERROR line
        assert "gpuGetDeviceCount" not in captured.err + printed
    for part in PARTS:
        assert f"| {part} |" in printed
    if "cpu" in hyperfused.available_backends():
        parts, _ = breakdown(Config.parse("3,2,4,8,4,2"), "cpu", torch.device("cpu"), iters=1)
        assert parts["fused step kernels + time loop"] > 0 and parts["GEMMs over all T·B rows"] > 0
    from benchmarks.breakdown import part_of
    assert part_of("hyperfused::mkl_gemm", [], 2) == part_of("aten::mm", [[2, 8]], 2) == "recurrent GEMMs (per step)"


def test_traffic_model_counts_the_weights_once_per_row(capsys):
    """The step kernels read every weight a row needs once per row: B times the one-row bytes, and the
    'weights read once' line removes exactly the repeats."""
    from benchmarks import traffic
    from benchmarks.breakdown import main as breakdown_main
    X, H, Hh, Nz = 16, 40, 12, 4
    one = traffic.forward_step(1, X, H, Hh, Nz)[2]
    eight = traffic.forward_step(8, X, H, Hh, Nz)[2]
    row_weights = (12 * Nz * Hh + 8 * Nz + 12 * Nz * H + 4 * H + 2 * 4 * H + 2 * H + 2 * 4 * Hh + 2 * Hh) * 4
    assert one.weights == row_weights and eight.weights == 8 * row_weights
    costs = traffic.forward_step(8, X, H, Hh, Nz)
    assert traffic.weights_once(costs, 8) == sum(c.read for c in costs) - 7 * row_weights
    assert traffic.weights_once(traffic.forward_step(1, X, H, Hh, Nz), 1) == sum(
        c.read for c in traffic.forward_step(1, X, H, Hh, Nz))
    breakdown_main(["--traffic", "--config", "10,8,16,40,12,4"])
    out = capsys.readouterr().out
    assert "fused forward step" in out and "fused backward step" in out and "weights read once" in out


def test_gpu_timings_graphed_rows_run_each_module_and_keep_going_past_a_failed_capture(monkeypatch):
    """The CUDA-graph rows of benchmarks.gpu_timings, with make_graphed_callables stood in for by the module
    itself (no GPU here) and the fused backends listed as if one were: every module's output sequence is timed
    forward and backward, its parameters get gradients, and a module whose capture raises leaves an error
    record instead of the rows of the others."""
    import torch
    from benchmarks import gpu_timings
    from benchmarks.hyper_lstm import Config

    monkeypatch.setattr(hyperfused.ops, "backends_for", lambda device: ["reference", "cpu", "cuda", "triton"])
    monkeypatch.setattr(hyperfused, "HyperLSTM", lambda *a, backend, device, **kw: hyperfused.nn.HyperLSTM(
        *a, backend="cpu", device=device, **kw))
    captured = []

    def capture(module, args):
        captured.append(module)
        if len(captured) == 2:
            raise RuntimeError("capture refused")
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    rows, errors = gpu_timings.graphed_rows(Config("tiny", 3, 2, 4, 8, 4, 2), torch.device("cpu"))
    assert [r.name for r in rows] == ["nn.LSTM (cuDNN), CUDA graph", "hyperfused triton, CUDA graph"]
    assert [e["row"] for e in errors] == ["hyperfused cuda, CUDA graph"] and "capture refused" in errors[0]["error"]
    for row, module in zip(rows, (captured[0], captured[2]), strict=True):
        row.fwd_bwd()
        assert row.fwd().shape == (3, 2, 8)
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_step_gemm_benchmark_checks_and_times_every_library(capsys):
    from benchmarks import step_gemm

    assert step_gemm.main(["--shape", "3,5,7", "--calls", "2"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("   3 x     5 x     7: at::mm")
    if step_gemm.mkl_cblas() is not None:
        assert "MKL packed, into out" in line and "MKL bf16" in line


def test_gpu_timings_times_the_other_cuda_launch_shapes_with_the_settings_restored(monkeypatch):
    """The CUDA row runs again with HYPERFUSED_CUDA_THREAD_GROUPS set to the shape its batch does not get, and at
    a small batch with HYPERFUSED_CUDA_CLUSTER at one block and at eight and with the one-kernel step, each set
    only during its calls."""
    import os

    from benchmarks import gpu_timings
    from benchmarks.hyper_lstm import Config

    seen = []
    names = ("HYPERFUSED_CUDA_THREAD_GROUPS", "HYPERFUSED_CUDA_CLUSTER", "HYPERFUSED_STEP_DESIGN")

    class Row:
        name = "hyperfused cuda"

        def fwd_bwd(self):
            seen.append(tuple(os.environ.get(n) for n in names))

    for n in names:
        monkeypatch.delenv(n, raising=False)
    small, large = (Config.parse(c) for c in ("100,8,128,1000", "100,512,128,1000"))
    rows = gpu_timings.other_launch_shapes([Row(), type("Other", (), {"name": "nn.LSTM"})()], small, 132)
    for row in rows:
        row.fwd_bwd()
    assert [r.name for r in rows] == ["hyperfused cuda, 1 thread group per row", "hyperfused cuda, 1 block per row",
                                      "hyperfused cuda, 8-block cluster per row", "hyperfused cuda, one-kernel step"]
    assert seen == [("1", None, None), (None, "1", None), (None, "8", None), (None, None, "fused")]
    assert not [n for n in names if n in os.environ]
    (row,) = gpu_timings.other_launch_shapes([Row()], large, 132)
    row.fwd_bwd()
    assert row.name == "hyperfused cuda, 4 thread groups per row" and seen[-1] == ("4", None, None)


def test_gpu_timings_keeps_the_rows_that_run_and_records_the_one_that_raises():
    from benchmarks import gpu_timings
    from benchmarks.hyper_lstm import Config

    class Row:
        def __init__(self, name, fails=False):
            self.name, self.fails, self.calls = name, fails, 0

        def fwd_bwd(self):
            self.calls += 1
            if self.fails:
                raise RuntimeError("hyperfused: the CUDA kernel 'hyper_lstm forward step' failed to launch")

    rows = [Row("nn.LSTM"), Row("hyperfused cuda, 8-block cluster per row", fails=True), Row("hyperfused cuda")]
    ok, errors = gpu_timings.warmed_up(rows, Config.parse("100,8,128,1000"))
    assert [r.name for r in ok] == ["nn.LSTM", "hyperfused cuda"] and [r.calls for r in rows] == [1, 1, 1]
    assert errors == [dict(config=Config.parse("100,8,128,1000").label(), row="hyperfused cuda, 8-block cluster per row",
                           error="RuntimeError: hyperfused: the CUDA kernel 'hyper_lstm forward step' failed to launch")]


def test_alternate_runs_each_variant_in_its_settings_and_restores_them(capsys, monkeypatch):
    import os

    import pytest

    from benchmarks import alternate
    seen = []
    real_fwd_bwd = alternate.Row.fwd_bwd
    monkeypatch.setattr(alternate.Row, "fwd_bwd",
                        lambda self: (seen.append(os.environ.get("HYPERFUSED_STEP_DESIGN")), real_fwd_bwd(self)))
    monkeypatch.delenv("HYPERFUSED_STEP_DESIGN", raising=False)
    rows = alternate.main(["--config", "3,2,4,8,4,2", "--rounds", "2", "--variant", "HYPERFUSED_STEP_DESIGN=gemm",
                           "--variant", "@bf16"])
    assert "HYPERFUSED_STEP_DESIGN" not in os.environ
    assert [len(r.ms) for r in rows] == [2] * 4
    # each row runs twice to warm up, then once per round: the gemm variant in its setting, nn.LSTM and @bf16 not
    assert seen.count("gemm") == 4 and seen.count(None) == 8
    printed = capsys.readouterr().out
    assert "| hyperfused cpu HYPERFUSED_STEP_DESIGN=gemm |" in printed and "| hyperfused cpu @bf16 |" in printed
    with pytest.raises(SystemExit, match="expected VAR=value"):
        alternate.main(["--variant", "HYPERFUSED_STEP_DESIGN"])


@requires_extension
def test_decode_ab_times_each_variant_in_its_settings_and_restores_them(capsys, monkeypatch):
    import os

    import pytest

    from benchmarks import decode_ab
    seen = []
    real = decode_ab.per_step_us
    monkeypatch.setattr(decode_ab, "per_step_us",
                        lambda *a: (seen.append(os.environ.get("HYPERFUSED_STEP_GEMM")), real(*a))[1])
    monkeypatch.delenv("HYPERFUSED_STEP_GEMM", raising=False)
    decode_ab.main(["--sizes", "1x8,2x5", "--rounds", "2", "--steps", "2", "--variant", "",
                    "--variant", "HYPERFUSED_STEP_GEMM=mm"])
    assert "HYPERFUSED_STEP_GEMM" not in os.environ
    # per size and round: the default and nn.LSTMCell outside the setting, the mm variant inside it
    assert seen.count("mm") == 4 and seen.count(None) == 8
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 1, 8 |") or
            line.startswith("| 2, 5 |")]
    assert len(rows) == 2 and all(row.count("|") == 5 and "%)" in row for row in rows)
    with pytest.raises(SystemExit, match="expected VAR=value"):
        decode_ab.main(["--variant", "HYPERFUSED_STEP_GEMM"])


@requires_extension
def test_the_recorded_copies_model_counts_what_the_ops_take_and_give():
    """The traffic model's copies per recorded call are the bytes of the ops' real inputs and outputs."""
    from benchmarks import traffic
    T, B, X, H, Hh, Nz = 3, 2, 5, 7, 6, 2
    m = hyperfused.HyperLSTM(X, H, hyper_size=Hh, hyper_embed=Nz, backend="cpu")
    params = [p.detach() for p in m.cells[0].flat_params()]
    x = torch.randn(T, B, X)
    states = [torch.zeros(B, n) for n in (H, H, Hh, Hh)]
    outs = torch.ops.hyperfused.hyper_lstm_forward(x, *states, params, None, None, True, 1.0)
    grads = torch.ops.hyperfused.hyper_lstm_backward(*[torch.ones_like(o) for o in outs[:4]], x, *states, params, None,
                                               None, *outs, True, 1.0)
    size = lambda ts: sum(t.numel() * 4 for t in ts)  # noqa: E731
    copies = traffic.recorded_copies(T, B, X, H, Hh, Nz)
    assert copies["forward"] == (size([x, *states, params[2]]), size(outs))
    assert copies["backward"] == (size([*outs[:4], x, *states, *outs, params[2]]), size(grads))


def test_each_config_given_gets_its_own_table_and_rows(tmp_path, capsys):
    """Several --config options: each table holds its own config's rows only, and each JSON row names its config
    (they were once all called 'custom', and every table listed every config's rows)."""
    out = tmp_path / "bench.json"
    main(["--config", "3,2,4,8,4,2", "--config", "2,3,4,8,4,2", "--repeats", "1", "--compile", "none",
          "--sections", "lstm", "--backends", "cpu", "--json", str(out)])
    rows = json.loads(out.read_text())["lstm"]
    by_config = {}
    for r in rows:
        by_config.setdefault(r["config"], set()).add((r["T"], r["B"]))
    assert by_config == {"custom 1": {(3, 2)}, "custom 2": {(2, 3)}}
    tables = capsys.readouterr().out.split("### ")[1:]
    assert [t.splitlines()[0] for t in tables] == [
        "custom 1 (T=3, B=2, X=4, H=8, Ĥ=4, N_z=2)", "custom 2 (T=2, B=3, X=4, H=8, Ĥ=4, N_z=2)"]
    per_config = len(rows) // 2
    assert all(t.count("| nn.LSTM |") == 1 and t.count("\n| ") == per_config + 1 for t in tables)


def test_projection_benchmark_times_every_row_and_checks_its_config(capsys):
    from benchmarks.projection import main as projection_main
    projection_main(["--config", "3,2,4,6,2", "--repeats", "1", "--warmup", "0", "--device", "cpu"])
    training, decode = capsys.readouterr().out.split("one step without gradients")
    for table, unit in ((training, "ms"), (decode, "µs per step")):
        rows = [line for line in table.splitlines() if line.startswith("| ") and unit not in line]
        names = [r.split("|")[1].strip() for r in rows]
        assert names[:2] == ["nn.LSTM, proj_size=2", "HyperLSTM reference, proj_size=2"]
        assert all(float(r.split("|")[2]) > 0 for r in rows)
    fused = [b for b in ("cpu",) if b in hyperfused.available_backends()]
    assert names[2:] == [f"HyperLSTM {b}, proj_size=2" for b in fused] + [
        f"HyperLSTM {b}, no projection" for b in fused[:1]] + [f"HyperLSTMCell {b}, proj_size=2" for b in fused]
    with pytest.raises(SystemExit):
        projection_main(["--config", "3,2,4,6,6"])  # proj_size must be below hidden_size
    assert "expected T,B,X,H,P as positive integers with P < H" in capsys.readouterr().err
