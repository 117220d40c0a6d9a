"""`python -m hyperfused.train plot`: groups runs by what they vary, tabulates mean ± spread, draws curves."""
import csv
import json
import statistics

import pytest

from hyperfused.train import plot


def _log(path, model, seed, valid, test, **result):
    history = [dict(step=s, train_bpc=4.0 - 0.01 * s + 0.001 * seed) for s in range(1, 101)]
    for s, v in zip((50, 100), valid, strict=True):
        history[s - 1]["valid_bpc"] = v
    res = dict(model=model, seed=seed, steps=100, parameters=1000, train_bpc_last50=3.5 + 0.01 * seed,
               valid_bpc=valid[-1], test_bpc=test, scale_init=0.1, lr=1e-3, hidden=32, hyper_size=8,
               hyper_embed=4, batch_size=4, seq_len=10, elapsed_s=60.0)
    res.update(result)
    path.write_text(json.dumps(dict(result=res, history=history)))
    return str(path)


def test_plot_groups_seeds_and_names_what_a_group_changes(tmp_path):
    logs = [_log(tmp_path / "a0.json", "lstm", 0, (2.5, 2.0), 1.9),
            _log(tmp_path / "a1.json", "lstm", 1, (2.6, 2.2), 2.1),
            _log(tmp_path / "b0.json", "hyperlstm", 0, (2.4, 1.9), 1.8),
            _log(tmp_path / "c0.json", "hyperlstm", 0, (2.3, 1.7), 1.6, scale_init=1.0),
            _log(tmp_path / "d0.json", "lstm", 0, (2.3, 1.7), 1.6, scale_init=1.0)]  # no d in an LSTM
    out = tmp_path / "out"
    plot.main(logs + ["--png", f"{out}.png", "--csv", f"{out}.csv", "--table", f"{out}.md", "--smooth", "10"])
    table = (tmp_path / "out.md").read_text()
    rows = [r for r in table.splitlines() if r.startswith("| ") and "seeds" not in r]
    assert [r.split(" | ")[0] for r in rows] == ["| lstm", "| hyperlstm", "| hyperlstm d₀=1.0"]
    mean, std = statistics.fmean([2.0, 2.2, 1.7]), statistics.stdev([2.0, 2.2, 1.7])
    assert f"{mean:.3f} ± {std:.3f} (1.700–2.200)" in rows[0] and "| 0, 1, 0 |" in rows[0]
    with open(f"{out}.csv") as f:
        got = list(csv.DictReader(f))
    assert {r["run"] for r in got} == {"lstm", "hyperlstm", "hyperlstm d₀=1.0"}
    valid = [r for r in got if r["run"] == "hyperlstm d₀=1.0" and r["valid_bpc"]]
    assert [(r["step"], r["valid_bpc"]) for r in valid] == [("50", "2.3000"), ("100", "1.7000")]
    assert (tmp_path / "out.png").stat().st_size > 10_000


def test_plot_smoothing_is_a_moving_average():
    history = [dict(step=s, train_bpc=float(s)) for s in range(1, 21)]
    assert plot.smoothed(history, 10) == [(10, 5.5), (12, 7.5), (14, 9.5), (16, 11.5), (18, 13.5), (20, 15.5)]


def test_plot_refuses_files_that_are_not_charlm_logs(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match="charlm --log"):
        plot.main([str(bad)])
