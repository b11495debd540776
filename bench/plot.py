"""Plot benchmark results (the JSON lines bench/decode.py, bench/prefill.py, bench/seamless.py and
bench/chameleon.py write) as PNG charts.

    python bench/plot.py bench/results/decode_llama7b_b1_h100.jsonl -o docs/img/decode_b1.png
    python bench/plot.py bench/results/prefill_llama7b_4096_h100.jsonl -o docs/img/prefill.png
    python bench/plot.py bench/results/seamless_large_h100_d.jsonl -o docs/img/seamless_large_tasks.png

Decode results become tokens/s bars with the memory-bandwidth roofline drawn across; prefill results
become latency bars; task results (a ``task`` and its end-to-end ``seconds`` per system) become one
group of latency bars per task. Every bar is labelled with its value and its ratio to eager.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: str) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "timeline" not in r]  # bench/decode.py --timeline's profiles: not bars
    if not rows:
        raise SystemExit(f"{path}: no results")
    return rows


def plot(rows: list[dict], out: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "task" in rows[0] and "seconds" in rows[0]:
        return plot_tasks(rows, out, title, plt)

    decode = "tok_s" in rows[0]
    import textwrap

    names = [textwrap.fill(r["system"], 34) for r in rows]  # long system names wrap instead of squeezing the bars
    values = [r["tok_s"] if decode else r["ms"] for r in rows]
    base = next((v for r, v in zip(rows, values) if r["system"] == "eager"), values[0])
    fig, ax = plt.subplots(figsize=(8, 0.6 * sum(n.count("\n") + 1 for n in names) + 1.6))
    peers = ("eager", "torch.compile", "transformers")  # everything else is an mmcompile configuration
    colors = ["#9aa5b1" if n.startswith(peers) and not n.startswith("eager backend") else "#2f6fdf" for n in names]
    bars = ax.barh(names[::-1], values[::-1], color=colors[::-1])
    for bar, v in zip(bars, values[::-1]):
        ratio = v / base if decode else base / v
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.1f} ({ratio:.2f}x)", va="center", fontsize=9)
    r0 = rows[0]
    if decode:
        roof = r0["roofline_tok_s"]
        ax.axvline(roof, color="#d64545", linestyle="--", linewidth=1)
        ax.text(roof, -0.45, f" roofline {roof:.0f}", color="#d64545", fontsize=9, va="center")
        ax.set_xlabel("decode tokens/s (higher is better)")
        default = f"{r0['model']} decode, batch {r0['batch']}, {r0['dtype']}, {r0['gpu']}"
    else:
        ax.set_xlabel("prefill latency, ms (lower is better)")
        default = f"{r0['model']} prefill of {r0['seq_len']} tokens, {r0['dtype']}, {r0['gpu']}"
    ax.set_title(title or default, fontsize=10)
    ax.set_xlim(0, max(values + ([r0["roofline_tok_s"]] if decode else [])) * 1.25)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")  # the roofline's label and a long title stay inside


def plot_tasks(rows: list[dict], out: str, title: str | None, plt) -> None:
    """End-to-end seconds per task, one group of bars per task (a bar per system), each labelled with its
    seconds and its speed-up over the same task's eager row."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    systems = list(dict.fromkeys(r["system"] for r in rows))
    seconds = {(r["system"], r["task"]): r["seconds"] for r in rows}
    palette = {"eager": "#9aa5b1", "torch.compile": "#c7cdd4"}
    height = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(tasks) * len(systems) + 1.6))
    top = max(seconds.values())
    for j, system in enumerate(systems):
        ys = [len(tasks) - 1 - i + (len(systems) - 1 - j - (len(systems) - 1) / 2) * height for i in range(len(tasks))]
        vals = [seconds.get((system, t), 0.0) for t in tasks]
        bars = ax.barh(ys, vals, height=height * 0.9, label=system, color=palette.get(system, "#2f6fdf"))
        for bar, task, v in zip(bars, tasks, vals):
            eager = seconds.get(("eager", task))
            if v:
                ratio = f" ({eager / v:.2f}x)" if eager else ""
                ax.text(v + top * 0.01, bar.get_y() + bar.get_height() / 2, f"{v:.3f} s{ratio}", va="center", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks[::-1])
    ax.set_xlabel("end-to-end seconds per request (lower is better); in brackets: speed-up over eager")
    ax.set_xlim(0, top * 1.3)
    r0 = rows[0]
    ax.set_title(title or f"{r0.get('model', '')} tasks, {r0.get('dtype', '')}, {r0.get('device', '')}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a JSON-lines file written by bench/decode.py, bench/prefill.py, "
                                    "bench/seamless.py or bench/chameleon.py")
    ap.add_argument("-o", "--output", required=True, help="PNG to write")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("bench/plot.py needs matplotlib: pip install 'mmcompile[bench]'", file=sys.stderr)
        return 2
    plot(load(args.results), args.output, args.title)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
