"""bench/plot.py turns benchmark JSON lines into a chart."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plot_writes_png_for_decode_prefill_and_task_results(tmp_path):
    for name in ("decode_llama7b_b1_h100.jsonl", "prefill_llama7b_4096_h100.jsonl", "seamless_large_h100_d.jsonl",
                 "chameleon7b_tasks.jsonl"):
        out = tmp_path / (name + ".png")
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), str(ROOT / "bench" / "results" / name),
                            "-o", str(out)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_plot_rejects_an_empty_results_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "plot.py"), str(empty), "-o", str(tmp_path / "x.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "no results" in r.stderr
