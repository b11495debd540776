"""The HSTU attention kernel alone, at a model's shape: time per call of each way to run it.

    python bench/hstu_kernel.py --batch 32 --history 1024            # ml20m: 8 heads of 32
    python bench/hstu_kernel.py --batch 128 --history 200 --variants rule,mask

The inputs are what ``fuse_attention`` hands the kernel for ``hstu:ml20m``'s ranking step: q, k and v as
head views of one projection ([B, N, H, D] memory), positions, timestamps and the two bias tables, the
rows' lengths and histories of a jagged batch (half to all of the history, then the candidates).
Variants:

- ``rule``: the visibility rule from the rows' lengths (what the pipeline passes; the default);
- ``mask``: the same visibility as a ``[B, 1, N, N]`` boolean tensor (``fuse_attention``'s
  ``visibility_rule=False``);
- ``warps8``: ``rule`` at 8 warps per program; ``heads2``, ``heads4``: that many heads per program;
- ``nobias``: ``rule`` without the relative position and time bias (what the bias costs).

Each row is the median of ``triton.testing.do_bench`` and the largest difference from the ``rule`` output
(``nobias`` computes something else and is not compared).
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

VARIANTS = ("rule", "mask", "warps8", "heads2", "heads4", "nobias")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hstu:ml20m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--history", type=int, default=1024, help="longest history; 16 candidates follow it")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/hstu_kernel.py measures on a CUDA device; none is available")
    import triton

    import mmcompile as mmc
    from mmcompile import hstu_attention as op
    from mmcompile.models import hstu

    family, name = mmc.models.parse_spec(args.model)
    if family != "hstu":
        raise SystemExit(f"error: --model must be an hstu spec, got {args.model}")
    c = hstu.CONFIGS[name]
    B, N, H, D = args.batch, args.history + args.candidates, c.n_heads, c.qk_dim
    dev, dtype = "cuda", getattr(torch, args.dtype)
    data = hstu.example_batch(c, B, N, num_candidates=args.candidates, min_len=args.history // 2, device=dev)
    lengths, timestamps = data["lengths"], data["timestamps"]
    history = lengths - data["num_targets"]
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, N, 3, H, D, device=dev, dtype=dtype, generator=g)
    q, k, v = (x[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    positions = torch.arange(N, device=dev)[None].expand(B, N).clamp(max=lengths[:, None] - 1).contiguous()
    rel = (positions, torch.randn(2 * N - 1, device=dev), timestamps, torch.randn(c.time_buckets + 1, device=dev))
    mask = op.visibility(lengths, history, N)
    op.register()
    kernel = torch.ops.mmcompile.triton_hstu_attention
    scale = 1.0 / N
    calls = {
        "rule": (lambda: kernel(q, k, v, None, None, scale, *rel, 0.301, lengths, history), {}),
        "mask": (lambda: kernel(q, k, v, None, mask, scale, *rel, 0.301), {}),
        "warps8": (lambda: kernel(q, k, v, None, None, scale, *rel, 0.301, lengths, history), {"NUM_WARPS": 8}),
        "heads2": (lambda: kernel(q, k, v, None, None, scale, *rel, 0.301, lengths, history), {"HEADS_PER_PROGRAM": 2}),
        "heads4": (lambda: kernel(q, k, v, None, None, scale, *rel, 0.301, lengths, history), {"HEADS_PER_PROGRAM": 4}),
        "nobias": (lambda: kernel(q, k, v, None, None, scale, None, None, None, None, 0.301, lengths, history), {}),
    }
    print(f"{args.model}: batch {B}, {N} positions, {H} heads of {D}, {args.dtype}; {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, triton {triton.__version__}")
    print("| variant | ms per call | max difference from rule |")
    print("|---|---|---|")
    with torch.no_grad():
        want = calls["rule"][0]().float()
        for variant in variants:
            fn, settings = calls[variant]
            with mock.patch.multiple(op, **settings):  # read at every launch
                diff = "" if variant == "nobias" else f"{(fn().float() - want).abs().max().item():.3g}"
                ms = triton.testing.do_bench(fn, warmup=50, rep=300)
            print(f"| {variant} | {ms:.3f} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
