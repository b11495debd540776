"""Plot benchmark results (the JSON lines bench/decode.py and bench/prefill.py write) as PNG charts.

    python bench/plot.py bench/results/decode_llama7b_b1_h100.jsonl -o docs/img/decode_b1.png
    python bench/plot.py bench/results/prefill_llama7b_4096_h100.jsonl -o docs/img/prefill.png

Decode results become tokens/s bars with the memory-bandwidth roofline drawn across; prefill results
become latency bars. Every bar is labelled with its value and its ratio to eager.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(path: str) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path}: no results")
    return rows


def plot(rows: list[dict], out: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="a JSON-lines file written by bench/decode.py or bench/prefill.py")
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
