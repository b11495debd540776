"""HSTU ranking throughput: eager, torch.compile and mmcompile in the same run, over batch sizes and
history lengths (jagged: each user's history is 1/2 to all of the length).

    python bench/hstu.py --model hstu:ml20m --batches 16,64 --lengths 200,512,1024 --out results.jsonl

The model's relative-position table is extended to the longest sequence (history + candidates). Each
system compiles the ranking step once per shape; the table gives the median time of one batch, users
per second, the speed-up over eager, the peak memory of the step and the largest difference of its
target scores from eager's (relative to their largest magnitude; ``DIFFERS`` past ``ERROR_BUDGET``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from unittest import mock

import torch

import mmcompile as mmc
from mmcompile.models import hstu
from mmcompile.testing import relative_error

SYSTEMS = ("eager", "torch.compile", "torch.compile-graphs", "mmcompile", "mmcompile-graphs")
# the largest difference from eager's scores, relative to their largest magnitude, that bf16 arithmetic
# explains: on an H100 the ml20m step's 16 layers at 1040 positions differ by 0.004 through the kernel
ERROR_BUDGET = 0.02


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _median_ms(fn, inputs, repeats: int) -> float:
    with torch.no_grad():
        for _ in range(2):
            fn(*inputs)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*inputs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# variants of the mmcompile system, combined in its name (mmcompile-graphs-kernel)
VARIANTS = {
    "graphs": "the Inductor backend's mode reduce-overhead: the step replayed as a CUDA graph",
    "unfused": "the pipeline without fuse_attention: what the kernel is worth",
    "mask": "HSTU's visibility passed to the kernel as a mask tensor, not as the rows' lengths",
    "kernel": "the attention kernel at every length, also below KERNEL_MIN_LEN",
    "warps8": "the attention kernel with 8 warps per program instead of 4",
    "heads2": "the attention kernel with 2 heads per program", "heads4": "... with 4", "heads8": "... with 8",
}


def _mmcompile(step, inputs, variants: list[str]):
    from mmcompile import hstu_attention

    kwargs = {}
    if "graphs" in variants:
        kwargs["backend_options"] = {"mode": "reduce-overhead"}
    if "unfused" in variants:
        kwargs["passes"] = [p.name for p in mmc.pipeline.resolve("default") if p.name != "fuse_attention"]
    if "mask" in variants:
        kwargs["pass_options"] = {"fuse_attention": {"visibility_rule": False}}
    settings = {"NUM_WARPS": 8 if "warps8" in variants else hstu_attention.NUM_WARPS,
                "KERNEL_MIN_LEN": 0 if "kernel" in variants else hstu_attention.KERNEL_MIN_LEN,
                "HEADS_PER_PROGRAM": next((int(v[5:]) for v in variants if v.startswith("heads")),
                                          hstu_attention.HEADS_PER_PROGRAM)}
    with mock.patch.multiple(hstu_attention, **settings):  # read while the step is compiled
        fn = mmc.compile(step, inputs, **kwargs)
        if "graphs" in variants:
            with torch.no_grad():
                fn(*inputs)  # records the graph, as torch.compile's warm-up calls do
    return fn


def _targets(out, data) -> torch.Tensor:
    return torch.cat([t.float().flatten() for t in hstu.gather_targets(out, data["lengths"], data["num_targets"])])


def build_system(name: str, step, inputs):
    """(callable, compile seconds)."""
    t0 = time.perf_counter()
    if name == "eager":
        fn = step
    elif name == "torch.compile":
        fn = torch.compile(step, fullgraph=True)
        with torch.no_grad():
            fn(*inputs)
    elif name == "torch.compile-graphs":  # the same with CUDA graphs
        fn = torch.compile(step, fullgraph=True, mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(3):
                fn(*inputs)
    elif name.split("-")[0] == "mmcompile" and set(name.split("-")[1:]) <= set(VARIANTS):
        fn = _mmcompile(step, inputs, name.split("-")[1:])
    else:
        raise SystemExit(f"error: unknown system {name!r}; choose from {', '.join(SYSTEMS)}, torch.compile-graphs, or "
                         "mmcompile followed by any of " + ", ".join(f"-{k} ({v})" for k, v in VARIANTS.items()))
    torch.cuda.synchronize()
    return fn, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hstu:ml20m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", type=_ints, default=[16, 64])
    ap.add_argument("--lengths", type=_ints, default=[200, 512, 1024], help="longest history per batch")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="comma-separated; mmcompile takes variants joined by '-' (mmcompile-graphs-kernel): "
                         + "; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None, help="append one JSON row per measurement to this file")
    ap.add_argument("--profile", action="store_true",
                    help="also print each system's eight most expensive kernels (torch.profiler, 3 batches)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/hstu.py measures on a CUDA device; none is available")
    family, name = mmc.models.parse_spec(args.model)
    if family != "hstu":
        raise SystemExit(f"error: --model must be an hstu spec, got {args.model}")
    longest = max(args.lengths) + args.candidates
    model = hstu.build(name, dtype=getattr(torch, args.dtype), device="cuda", max_seq_len=longest)
    step = hstu.RankStep(model)
    systems = args.systems.split(",")
    rows = []
    print("| batch | history | system | ms per batch | users/s | x eager | peak GB | compile s | error vs eager |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        for batch in args.batches:
            data = hstu.example_batch(model.config, batch, length + args.candidates, num_candidates=args.candidates,
                                      min_len=length // 2, device="cuda")
            inputs = tuple(data.values())
            with torch.no_grad():
                want = _targets(step(*inputs), data)
            eager_ms = None
            for system in systems:
                torch._dynamo.reset()
                torch.cuda.empty_cache()
                try:
                    fn, compile_s = build_system(system, step, inputs)
                    torch.cuda.reset_peak_memory_stats()
                    ms = _median_ms(fn, inputs, args.repeats)
                    with torch.no_grad():
                        # the largest difference from eager's target scores, as a fraction of their largest
                        # magnitude: a fast system that computes something else shows here
                        error = relative_error(_targets(fn(*inputs), data), want)
                except torch.OutOfMemoryError:
                    print(f"| {batch} | {length} | {system} | out of memory | | | | |")
                    continue
                except Exception as e:  # one system failing must not hide the others' numbers
                    print(f"| {batch} | {length} | {system} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | | | |")
                    continue
                peak = torch.cuda.max_memory_allocated() / 1e9
                eager_ms = ms if system == "eager" else eager_ms
                row = dict(model=args.model, dtype=args.dtype, batch=batch, history=length, candidates=args.candidates,
                           system=system, ms=ms, users_per_s=batch / ms * 1e3, peak_gb=peak, compile_s=compile_s,
                           error=error,
                           device=torch.cuda.get_device_name(), torch=torch.__version__)
                rows.append(row)
                speedup = f"{eager_ms / ms:.2f}" if eager_ms else ""
                print(f"| {batch} | {length} | {system} | {ms:.2f} | {row['users_per_s']:.0f} | {speedup} | "
                      f"{peak:.2f} | {compile_s:.1f} | {error:.1e}{' DIFFERS' if error > ERROR_BUDGET else ''} |",
                      flush=True)
                if args.profile:
                    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                        for _ in range(3):
                            fn(*inputs)
                        torch.cuda.synchronize()
                    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
                del fn
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
