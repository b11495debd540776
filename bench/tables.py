"""Markdown tables the task benchmarks print: end-to-end seconds per system and the speed-up over eager."""

from __future__ import annotations


def print_speedups(results: dict[tuple[str, str], dict], systems: list[str], tasks: list[str], digits: int = 2) -> None:
    """One row per task: each system's ``seconds`` (``results[(system, task)]``), then each non-eager
    system's speed-up over eager measured in the same run ("-" without an eager row)."""
    print("\n| task | " + " | ".join(f"{s} (s)" for s in systems) + " | " +
          " | ".join(f"{s} vs eager" for s in systems if s != "eager") + " |")
    print("|---" * (1 + 2 * len(systems) - ("eager" in systems)) + "|")
    for task in tasks:
        cells = [f"{results[(s, task)]['seconds']:.{digits}f}" for s in systems]
        base = results.get(("eager", task))
        ratios = [f"{base['seconds'] / results[(s, task)]['seconds']:.2f}x" if base else "-" for s in systems if s != "eager"]
        print(f"| {task} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
