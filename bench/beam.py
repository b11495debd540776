"""Beam-search decode: transformers ``generate(num_beams=W)`` against mmcompile, in one run, on one card.

    python bench/beam.py --model hf-llama:7b --beams 4 --new-tokens 128

mmcompile reorders beams through a row table the attention reads the cache by (``rewrite_kv_cache``
with ``beam_rows``), replayed as a CUDA graph per step; the same Generator is also timed reordering
beams by copying cache rows (the ``index_select`` way) to show what the indirection saves. Prints the
decode rate in beam steps per second (each step advances every beam of the prompt by one token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import mmcompile as mmc

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from decode import build_model  # noqa: E402


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hf-llama:7b")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/beam.py needs a CUDA device", file=sys.stderr)
        return 2
    model = build_model(args.model, torch.bfloat16, "cuda")
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0))
    W, N = args.beams, args.new_tokens
    rows = []

    def record(system, seconds_n, seconds_1, compile_s=None):
        rate = (N - 1) / (seconds_n - seconds_1)
        row = dict(system=system, beam_steps_s=rate, ttft_ms=seconds_1 * 1e3, compile_s=compile_s, beams=W,
                   model=args.model, gpu=torch.cuda.get_device_name(), torch=torch.__version__)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    ids = prompt[None].cuda()
    kw = dict(num_beams=W, do_sample=False, eos_token_id=None, pad_token_id=0)
    hf = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)  # noqa: E731
    hf(4)
    record("transformers generate", timed(lambda: hf(N)), timed(lambda: hf(1)))

    t0 = time.perf_counter()
    gen = mmc.compile_generator(model, max_batch=W, max_seq_len=args.max_seq_len,
                                prefill_buckets=sorted({args.prompt_len, args.max_seq_len}))
    gen.generate([prompt], 2, num_beams=W)  # compiles the beam step and records its graph
    compile_s = time.perf_counter() - t0
    run = lambda n: gen.generate([prompt], n, num_beams=W)  # noqa: E731
    out = run(N)
    record(f"mmcompile, row table, {type(gen.beam_step).__name__}", timed(lambda: run(N)), timed(lambda: run(1)),
           compile_s)
    beam_step, gen.beam_step, gen._compile_beam_step = gen.beam_step, None, None
    record("mmcompile, cache rows copied each step", timed(lambda: run(N)), timed(lambda: run(1)), compile_s)
    gen.beam_step = beam_step
    ref = hf(N)[0]
    agree = (out[0, args.prompt_len:] == ref[args.prompt_len:]).float().mean().item()

    base = rows[0]["beam_steps_s"]
    print(f"\n{args.model} bf16, {W} beams, prompt {args.prompt_len}, {N} new tokens, {torch.cuda.get_device_name()}")
    print("| system | beam steps/s | x transformers | TTFT ms | compile s |")
    print("|---|---|---|---|---|")
    for r in rows:
        c = f"{r['compile_s']:.1f}" if r["compile_s"] else "-"
        print(f"| {r['system']} | {r['beam_steps_s']:.1f} | {r['beam_steps_s'] / base:.2f} | {r['ttft_ms']:.1f} | {c} |")
    print(f"best beam agrees with transformers on {agree:.0%} of the new tokens (bf16, random weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
