"""Markdown tables and a bar chart from the benchmark results."""
from __future__ import annotations


def _fmt_mem(v):
    return "—" if v is None else f"{v:.0f}"


def lstm_markdown(results, configs) -> str:
    lines = []
    for cfg in configs:
        rows = [r for r in results if r["config"] == cfg.name]
        if not rows:
            continue
        lines += ["", f"### {cfg.label()}", "",
                  "| implementation | fwd ms | fwd+bwd ms | tokens/s | peak MB | time vs nn.LSTM | speed-up vs reference |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['row']} | {r['fwd_ms']:.1f} ± {r['fwd_iqr_ms']:.1f} | "
                         f"{r['fwd_bwd_ms']:.1f} ± {r['fwd_bwd_iqr_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{_fmt_mem(r['peak_mem_mb'])} | {r['vs_lstm']:.2f}× | {r['speedup_vs_reference']:.1f}× |")
        lines.append(f"\nGEMM FLOPs of a HyperLSTM / an LSTM of the same H at this size: "
                     f"{rows[0]['gemm_flop_ratio']:.2f}× (the floor for 'time vs nn.LSTM' at equal GEMM speed). "
                     "Times are medians ± IQR.")
    return "\n".join(lines)


def static_markdown(results) -> str:
    lines = ["", "### Static hypernetwork: generating every kernel of the model (forward + backward)", "",
             "| model | implementation | ms | speed-up vs per-tile loop |", "|---|---|---:|---:|"]
    for r in results:
        speedup = "—" if r["speedup"] != r["speedup"] else f"{r['speedup']:.1f}×"
        lines.append(f"| {r['model']} | {r['row']} | {r['ms']:.2f} ± {r['iqr_ms']:.2f} | {speedup} |")
        if "generation_share" in r:
            lines.append(f"\nThe fused generation is {100 * r['generation_share']:.1f}% of that training step.")
    return "\n".join(lines)


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    lstm = out["lstm"]
    configs = list(dict.fromkeys(r["config"] for r in lstm))
    names = list(dict.fromkeys(r["row"] for r in lstm))
    panels = len(configs) + (1 if out.get("static") else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5.5 * max(panels, 1), 4.2), squeeze=False)
    for ax, cfg in zip(axes[0], configs):
        rows = [r for r in lstm if r["config"] == cfg]
        labels = [r["row"] for r in rows]
        vals = [r["fwd_bwd_ms"] for r in rows]
        colors = [f"C{names.index(n)}" for n in labels]
        bars = ax.barh(labels, vals, color=colors)
        for bar, r in zip(bars, rows):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['vs_lstm']:.2f}× LSTM",
                    va="center", fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on short ranges
        ax.invert_yaxis()
        r0 = rows[0]
        ax.set_title(f"{cfg}\nT={r0['T']} B={r0['B']} X={r0['X']} H={r0['H']}", fontsize=9)
        ax.set_xlabel("forward+backward ms (log)")
    if out.get("static"):
        ax = axes[0][-1]
        rows = out["static"]
        ax.barh([f"{r['model']}\n{r['row']}" for r in rows], [r["ms"] for r in rows],
                color=[f"C{i % 2}" for i in range(len(rows))])
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_title("kernel generation fwd+bwd", fontsize=9)
        ax.set_xlabel("ms (log)")
    meta = out["meta"]
    fig.suptitle(f"hyperfused — {meta['machine']} — {meta['date']} — commit {meta['commit']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
