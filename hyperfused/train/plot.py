"""Learning curves and a results table from several `charlm --log RUN.json` runs.

    python -m hyperfused.train plot runs/*.json --png curves.png --csv curves.csv --table table.md

Runs that differ only in --seed form one group; a group is named by its model and by the options it changes
from the most common value among the runs given (--scale-init, --lr, --steps, ...). The table gives each
group's mean ± sample standard deviation over its seeds and the range; the PNG draws the train bpc (moving
average over --smooth steps) and the valid bpc against the step, mean over seeds, the range shaded.
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import Counter

from .charlm import MODELS

# The options that tell one group of runs from another (the seed does not), with their names in labels.
VARIED = (("scale_init", "d₀"), ("lr", "lr"), ("recurrent_dropout", "rec. dropout"), ("dropout", "dropout"),
          ("clip", "clip"), ("hidden", "H"), ("hyper_size", "Ĥ"), ("hyper_embed", "N_z"), ("batch_size", "B"),
          ("seq_len", "T"), ("steps", "steps"))

# Options a model ignores: no scaling vectors outside the hyper models; nn.LSTM has no recurrent dropout.
UNUSED = {"scale_init": lambda model: "hyper" not in model, "recurrent_dropout": lambda model: model == "lstm"}


def load_runs(paths):
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
            result, history = data["result"], data["history"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: {path}: expected a log written by `charlm --log RUN.json` ({e})")
        runs.append(dict(path=path, result=result, history=history))
    if not runs:
        raise SystemExit("error: no runs given")
    return runs


def group_runs(runs) -> dict[str, list[dict]]:
    """label -> runs; the label names the model and each option that differs from the runs' most common."""
    common = {k: Counter(r["result"].get(k) for r in runs).most_common(1)[0][0] for k, _ in VARIED}
    groups: dict[str, list[dict]] = {}
    for r in runs:
        res = r["result"]
        extras = [f"{short}={res.get(k)}" for k, short in VARIED
                  if res.get(k) != common[k] and not UNUSED.get(k, lambda model: False)(res["model"])]
        groups.setdefault(" ".join([res["model"], *extras]), []).append(r)
    order = {m: k for k, m in enumerate(MODELS)}
    return dict(sorted(groups.items(), key=lambda g: (order.get(g[1][0]["result"]["model"], len(order)), g[0])))


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(groups) -> str:
    def cell(values):
        mean, std = _mean_std(values)
        if mean is None:
            return "–"
        return f"{mean:.3f} ± {std:.3f} ({min(values):.3f}–{max(values):.3f})"

    rows = ["| runs | seeds | parameters | steps | train bpc (last 50 steps) | valid bpc | test bpc | minutes per run |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for label, runs in groups.items():
        res = [r["result"] for r in runs]
        minutes = statistics.fmean(x.get("elapsed_s", 0.0) for x in res) / 60
        rows.append(f"| {label} | {', '.join(str(x.get('seed')) for x in res)} | {res[0]['parameters']:,} | "
                    f"{res[0]['steps']} | {cell([x['train_bpc_last50'] for x in res])} | "
                    f"{cell([x['valid_bpc'] for x in res])} | {cell([x['test_bpc'] for x in res])} | {minutes:.1f} |")
    return "\n".join(rows) + "\n\nmean ± sample standard deviation over the seeds (min–max)\n"


def smoothed(history, window: int):
    """(step, moving average of train bpc over the last `window` steps), every `window // 5` steps."""
    out, total, values = [], 0.0, [h["train_bpc"] for h in history]
    every = max(1, window // 5)
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        if (i + 1) % every == 0 and i + 1 >= window:
            out.append((history[i]["step"], total / window))
    return out


def write_csv(path, groups, window: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "seed", "step", "train_bpc_smoothed", "valid_bpc"])
        for label, runs in groups.items():
            for r in runs:
                valid = {h["step"]: h["valid_bpc"] for h in r["history"] if h.get("valid_bpc") is not None}
                rows = {s: [f"{v:.4f}", ""] for s, v in smoothed(r["history"], window)}
                for s, v in valid.items():
                    rows.setdefault(s, ["", ""])[1] = f"{v:.4f}"
                for s in sorted(rows):
                    w.writerow([label, r["result"].get("seed"), s, *rows[s]])


def _band(series_per_seed):
    """Steps present in every seed, with the mean, min and max over the seeds."""
    common = set.intersection(*(set(s) for s in series_per_seed))
    steps = sorted(common)
    vals = [[s[k] for s in series_per_seed] for k in steps]
    return steps, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot(path, groups, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_valid) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    variants = Counter()
    for label, runs in groups.items():
        model = runs[0]["result"]["model"]
        color = colors[(MODELS.index(model) if model in MODELS else len(MODELS)) % len(colors)]
        style = styles[variants[model] % len(styles)]
        variants[model] += 1
        train = [dict(smoothed(r["history"], window)) for r in runs]
        valid = [{h["step"]: h["valid_bpc"] for h in r["history"] if h.get("valid_bpc") is not None} for r in runs]
        for ax, series in ((ax_train, train), (ax_valid, valid)):
            steps, mean, lo, hi = _band(series)
            if steps:
                ax.plot(steps, mean, style, color=color, label=f"{label} (n={len(runs)})",
                        marker="o" if ax is ax_valid else None, markersize=3)
                ax.fill_between(steps, lo, hi, color=color, alpha=0.15)
    ax_train.set_title(f"train bpc (moving average over {window} steps)")
    ax_valid.set_title("valid bpc")
    for ax in (ax_train, ax_valid):
        ax.set_xlabel("step")
        ax.set_ylabel("bits per character")
        ax.grid(alpha=0.3)
    lows = [v for g in groups.values() for r in g for v in [r["result"].get("valid_bpc")] if v is not None]
    if lows:
        top = min(lows) + 1.0
        ax_train.set_ylim(min(lows) - 0.15, top)
        ax_valid.set_ylim(min(lows) - 0.05, top)
    ax_valid.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hyperfused.train plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="JSON logs written by `charlm --log RUN.json`")
    ap.add_argument("--png", default=None, help="learning curves (matplotlib)")
    ap.add_argument("--csv", default=None, help="the plotted curves, one row per run and step")
    ap.add_argument("--table", default=None, help="Markdown table (also printed)")
    ap.add_argument("--smooth", type=int, default=50, help="moving-average window of the train curve, in steps")
    args = ap.parse_args(argv)
    if args.smooth < 1:
        raise SystemExit(f"error: --smooth: expected a positive number of steps, got {args.smooth}")
    groups = group_runs(load_runs(args.logs))
    text = table(groups)
    print(text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text)
    if args.csv:
        write_csv(args.csv, groups, args.smooth)
    if args.png:
        plot(args.png, groups, args.smooth)


if __name__ == "__main__":
    main()
