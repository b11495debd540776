"""Seamless's tasks end to end: mmcompile against eager and torch.compile, in one run, on one card.

    python bench/seamless.py --model large --tasks speech-to-speech,speech-to-text
    python bench/seamless.py --model tiny --device cpu --dtype float32 --systems eager,mmcompile   # a smoke run

Every system runs the same SeamlessTranslator task code (feature extraction, bucketing, the
cross-attention fill, greedy decoding, the text-to-unit model's duration read-backs, the vocoder);
what differs is how the phases run:

  eager          every phase as written; the text decoder over its static cache (Generator.from_module)
  torch.compile  gpt-fast style: the decode step under torch.compile(mode="reduce-overhead",
                 fullgraph=True), prefill eager, every other phase under torch.compile
  mmcompile      compile_seamless(backend="inductor"): every phase captured, optimized by the default
                 pipeline and compiled; decode replayed as CUDA graphs (K steps per graph when greedy)

Random weights (no checkpoint is needed to time it): the input is seeded noise of --seconds per
utterance (speech tasks) or --source-tokens random ids (text tasks); every system decodes
--new-tokens tokens (a random model almost never emits the end token). Prints per task the warm
end-to-end seconds of each system, its speed-up over eager and the split into speech encoder, text
encoder, decoder (cross-attention fill, prefill and decode), text-to-unit and vocoder; writes JSON lines
to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mmcompile.models import seamless  # noqa: E402
from mmcompile.runtime.generator import Generator  # noqa: E402
from mmcompile.runtime.seamless import TASKS, _METHODS, SeamlessTranslator, compile_seamless  # noqa: E402
from tables import print_speedups  # noqa: E402

GROUPS = {"features": ("features",), "speech encoder": ("speech_encoder",), "text encoder": ("text_encoder",),
          "text decoder": ("cross", "decode"), "text-to-unit": ("decoder_hidden", "t2u_characters", "t2u_units"),
          "vocoder": ("unit_durations", "vocode")}


def torch_compile_translator(model, batch: int, max_seq_len: int) -> SeamlessTranslator:
    lm = seamless.TextDecoderLM(model)
    param = model.lm_head.weight
    cache = lm.empty_cache(batch, max_seq_len, device=param.device, dtype=param.dtype)
    for layer in cache:  # static addresses, as gpt-fast's buffers, so CUDA graphs can replay
        for t in layer:
            torch._dynamo.mark_static_address(t)
    step = torch.compile(lm, mode="reduce-overhead", fullgraph=True)
    gen = Generator(lm, step, cache, max_batch=batch, max_seq_len=max_seq_len, device=param.device,
                    backend="torch.compile")
    phases = {name: torch.compile(getattr(model, method)) for name, method in _METHODS.items()}
    phases["cross"] = torch.compile(seamless.CrossAttentionState(model))
    phases["decoder_hidden"] = torch.compile(seamless.TextDecoderLM(model, output="hidden"))
    return SeamlessTranslator(model.config, phases, gen, dtype=param.dtype)


def make_translator(system: str, model, args):
    t0 = time.perf_counter()
    if system == "eager":
        tr = SeamlessTranslator.from_module(model, max_batch=args.batch, max_seq_len=args.max_seq_len)
    elif system == "torch.compile":
        tr = torch_compile_translator(model, args.batch, args.max_seq_len)
    elif system == "mmcompile":
        tr = compile_seamless(model, backend="inductor", max_batch=args.batch, max_seq_len=args.max_seq_len)
    else:
        raise SystemExit(f"unknown system {system!r}; choose from eager, torch.compile, mmcompile")
    return tr, time.perf_counter() - t0


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="large", help="seamless config: tiny, large (default)")
    p.add_argument("--systems", default="eager,torch.compile,mmcompile")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=1, help="utterances per request (default: 1)")
    p.add_argument("--seconds", type=float, default=10.0, help="speech input length (default: 10 s)")
    p.add_argument("--source-tokens", type=int, default=48, help="text input length (default: 48)")
    p.add_argument("--new-tokens", type=int, default=64, help="translated tokens (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per task; the best is reported")
    p.add_argument("--json", default=None, help="append one JSON line per (system, task)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = seamless.build(args.model, dtype=dtype, device=args.device, seed=0)
    c = model.config
    args.max_seq_len = args.new_tokens + 2
    g = torch.Generator().manual_seed(0)
    speech = [torch.randn(int(args.seconds * c.sample_rate), generator=g) * 0.1 for _ in range(args.batch)]
    text = [torch.randint(4, c.vocab_size - 8, (args.source_tokens,), generator=g) for _ in range(args.batch)]
    tasks = args.tasks.split(",")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"# seamless:{args.model} on {name}, {args.dtype}, batch {args.batch}, speech {args.seconds} s, text "
          f"{args.source_tokens} tokens, {args.new_tokens} new tokens (greedy), torch {torch.__version__}", flush=True)
    results: dict[tuple[str, str], dict] = {}
    for system in args.systems.split(","):
        tr, build_s = make_translator(system, model, args)
        t0 = time.perf_counter()
        for task in tasks:  # warm-up: what compiles lazily compiles now
            tr.translate(speech if task.startswith("speech") else text, task, max_new_tokens=args.new_tokens)
        warm_s = time.perf_counter() - t0
        for task in tasks:
            inputs = speech if task.startswith("speech") else text
            best = None
            for _ in range(args.repeats):
                sync()
                t0 = time.perf_counter()
                out = tr.translate(inputs, task, max_new_tokens=args.new_tokens)
                sync()
                total = time.perf_counter() - t0
                if best is None or total < best[0]:
                    best = (total, dict(tr.timings), out)
            total, timings, out = best
            groups = {k: sum(timings.get(p, 0.0) for p in v) for k, v in GROUPS.items()}
            stats = tr.generator.stats
            row = dict(system=system, task=task, seconds=total, phases=timings, groups=groups,
                       tokens=[int(t.numel()) for t in out.tokens],
                       units=[int(u.numel()) for u in out.units] if out.units else None,
                       audio_s=[w.numel() / c.sample_rate for w in out.waveforms] if out.waveforms else None,
                       decode_tok_s=stats.decode_tokens_per_second, prefill_ms=stats.prefill_seconds * 1e3,
                       cuda_graphs=getattr(tr.generator, "cuda_graphs", "off"),
                       compile_s=getattr(tr, "compile_seconds", 0.0) or build_s, warmup_s=warm_s,
                       peak_gb=torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0,
                       model=f"seamless:{args.model}", device=name, dtype=args.dtype, batch=args.batch)
            results[(system, task)] = row
            print(f"  {system:14s} {task:17s} {total:8.3f} s  " + " ".join(f"{k} {v:.3f}" for k, v in groups.items())
                  + f"  tokens {row['tokens']} units {row['units']}  decode {row['decode_tok_s']:.0f} tok/s, prefill "
                  f"{row['prefill_ms']:.1f} ms, graphs: {row['cuda_graphs']}", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        del tr
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    systems = args.systems.split(",")
    print_speedups(results, systems, tasks, digits=3)
    print("\n| system | task | " + " | ".join(f"{g} (s)" for g in GROUPS) + " | compile + warm-up (s) |")
    print("|---" * (3 + len(GROUPS)) + "|")
    for (s, task), r in results.items():
        print(f"| {s} | {task} | " + " | ".join(f"{r['groups'][g]:.3f}" for g in GROUPS)
              + f" | {r['compile_s'] + r['warmup_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
