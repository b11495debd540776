"""Chameleon's tasks end to end: mmcompile against eager and torch.compile, in one run, on one card.

    python bench/chameleon.py --model 7b --tasks text-to-image,image-to-text
    python bench/chameleon.py --model tiny --device cpu --systems eager,mmcompile      # a smoke run

Every system runs the same ChameleonGenerator task code (prompt assembly, classifier-free guidance over
a conditioned and an unconditioned row in one batch, image-code restriction, VQ-GAN encode/decode);
what differs is how the phases run:

  eager          the decoder as written over a static cache (Generator.from_module) and the VQ-GAN eagerly
  torch.compile  gpt-fast style: the decoder's decode step under torch.compile(mode="reduce-overhead",
                 fullgraph=True), prefill eager, VQ encode and decode under torch.compile
  mmcompile      compile_chameleon(backend="inductor"): every phase captured, optimized by the default
                 pipeline and compiled; decode replayed as CUDA graphs (K steps per graph when greedy)
  mmcompile-int8 the same with int8 weight-only linears (quantize_linear; LM head in bf16)
  mmcompile-sdpa mmcompile with decode attention on torch's SDPA kernels instead of the split-KV kernel

Random weights (no checkpoint is needed to time it); greedy decoding unless --temperature is given.
Prints per task the end-to-end seconds of each system (warm: after one untimed run), the speed-up over
eager, and the split into VQ encode / decoder / VQ decode; writes JSON lines to --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mmcompile.models import chameleon  # noqa: E402
from tables import print_speedups  # noqa: E402
from mmcompile.runtime.chameleon import TASKS, ChameleonGenerator, compile_chameleon, default_max_seq_len  # noqa: E402


def torch_compile_runner(model, vq, max_seq_len: int) -> ChameleonGenerator:
    from decode import gpt_fast_generator

    gen = gpt_fast_generator(model, 2, max_seq_len, model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype)
    return ChameleonGenerator(gen, torch.compile(vq.encode), torch.compile(vq.decode), model.config, vq.config,
                              max_batch=1, pixel_dtype=next(vq.parameters()).dtype)


def make_runner(system: str, model, vq, args) -> tuple[ChameleonGenerator, float]:
    t0 = time.perf_counter()
    if system == "eager":
        runner = ChameleonGenerator.from_modules(model, vq, max_seq_len=args.max_seq_len)
    elif system == "torch.compile":
        runner = torch_compile_runner(model, vq, args.max_seq_len)
    elif system.startswith("mmcompile"):
        variant = system.partition("-")[2]
        quantize = variant if variant in ("int8", "int4") else None
        passes = "default" if not quantize else list(__import__("mmcompile").DEFAULT_PIPELINE) + ["quantize_linear"]
        runner = compile_chameleon(model, vq, backend="inductor", max_seq_len=args.max_seq_len, passes=passes,
                                   pass_options={"quantize_linear": {"mode": quantize}} if quantize else None,
                                   backend_options={"attention": "sdpa"} if variant == "sdpa" else None,
                                   prefill_buckets=args.buckets)
    else:
        raise SystemExit(f"unknown system {system!r}; choose from eager, torch.compile, mmcompile, mmcompile-int8, "
                         "mmcompile-sdpa")
    return runner, time.perf_counter() - t0


def task_kwargs(task: str, args) -> dict:
    sampling = None if args.temperature == 0 else dict(temperature=args.temperature, top_p=args.top_p, seed=0)
    if task in ("text-to-text", "image-to-text"):
        return dict(max_new_tokens=args.text_tokens, sampling=sampling)
    return dict(guidance_scale=args.guidance_scale, sampling=sampling)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7b", help="chameleon config: tiny, 7b (default), 34b")
    p.add_argument("--systems", default="eager,torch.compile,mmcompile")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--text-tokens", type=int, default=64, help="new tokens of the text tasks (default: 64)")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--json", default=None, help="append one JSON line per (system, task)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model, vq = chameleon.build_with_tokenizer(args.model, dtype=dtype, device=args.device)
    c, R = model.config, vq.config.resolution
    args.max_seq_len = args.max_seq_len or default_max_seq_len(c, vq.config, text_room=2 * args.prompt_len + args.text_tokens)
    image_prompt = vq.config.grid ** 2 + 2 + args.prompt_len + 1
    args.buckets = sorted({16 * -(-(args.prompt_len + 1) // 16), min(args.max_seq_len, 64 * -(-image_prompt // 64))})
    low = max(max(c.image_token_table()), c.boi_token, c.eoi_token) + 1
    g = torch.Generator().manual_seed(0)
    prompt = [torch.randint(low, c.vocab_size, (args.prompt_len,), generator=g).tolist()]
    image = (torch.rand(1, 3, R, R, generator=g) * 2 - 1).to(args.device, dtype)
    tasks = args.tasks.split(",")
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"# chameleon:{args.model} on {name}, {args.dtype}, prompt {args.prompt_len} tokens, text tasks "
          f"{args.text_tokens} new tokens, images {R}x{R} = {vq.config.grid ** 2} codes, guidance "
          f"{args.guidance_scale}, {'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}, "
          f"cache {args.max_seq_len} slots x 2 rows, torch {torch.__version__}", flush=True)
    results: dict[tuple[str, str], dict] = {}
    for system in args.systems.split(","):
        runner, build_s = make_runner(system, model, vq, args)
        t0 = time.perf_counter()
        # warm-up: compiled systems run every task once (what compiles lazily compiles); eager, which
        # compiles nothing, runs a two-token text task to initialize the libraries
        warm_ups = [(t, task_kwargs(t, args)) for t in tasks] if system != "eager" else [
            ("text-to-text", dict(max_new_tokens=2))]
        for task, kwargs in warm_ups:
            runner.run(task, prompt, image if task in ("image-to-text", "text-image-to-image") else None, **kwargs)
        warm_s = time.perf_counter() - t0
        for task in tasks:
            img = image if task in ("image-to-text", "text-image-to-image") else None
            sync()
            t0 = time.perf_counter()
            runner.run(task, prompt, img, **task_kwargs(task, args))
            sync()
            total = time.perf_counter() - t0
            stats = runner.generator.stats
            row = dict(system=system, task=task, seconds=total, phases=dict(runner.timings),
                       decode_tok_s=stats.decode_tokens_per_second, steps=stats.steps,
                       compile_s=getattr(runner, "compile_seconds", 0.0) or build_s, warmup_s=warm_s,
                       peak_gb=torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0,
                       model=f"chameleon:{args.model}", device=name, dtype=args.dtype)
            results[(system, task)] = row
            print(f"  {system:16s} {task:20s} {total:8.3f} s  decode {row['decode_tok_s']:6.1f} steps/s  "
                  + " ".join(f"{k} {v:.3f}" for k, v in row["phases"].items()), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
        del runner
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    systems = args.systems.split(",")
    print_speedups(results, systems, tasks)
    print("\n| system | task | VQ encode (s) | decoder (s) | VQ decode (s) | decode steps/s | compile (s) |\n|---|---|---|---|---|---|---|")
    for (s, task), r in results.items():
        ph = r["phases"]
        print(f"| {s} | {task} | {ph.get('vq_encode', 0):.3f} | {ph.get('decoder', 0):.3f} | {ph.get('vq_decode', 0):.3f} "
              f"| {r['decode_tok_s']:.1f} | {r['compile_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
