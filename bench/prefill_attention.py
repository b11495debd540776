"""Prefill attention alone, at a model's shape: the position-bounded kernel against torch's SDPA.

    python bench/prefill_attention.py --model llama:7b --seq-len 2048 --cache-len 2048,4096
    python bench/prefill_attention.py --sweep          # also every tile of the kernel

The inputs are what a compiled prefill hands attention: q as head views of the projection ([B, S, H, D]
memory), the KV cache [B, Hkv, L, D], positions ``arange(S)`` (a prompt from the first slot) and the
mask ``arange(L) <= positions``. Ways:

- ``sdpa, mask``: ``scaled_dot_product_attention`` with that boolean mask (what a compiled prefill ran
  before: torch picks cuDNN's or the memory-efficient kernel, which compute every key of the cache);
- ``sdpa, causal``: ``is_causal=True`` over the prompt's own keys — the flash kernel's causal path, which
  skips the masked blocks; it needs the positions to be known as ``arange(S)``, which a compiled step
  cannot assume (a lower bound to compare with, not an option);
- ``mmcompile``: ``mmcompile::prefill_attention`` with its default tile; with ``--sweep``, each tile.

Each row is the median of ``triton.testing.do_bench``, the useful work in TFLOP/s (the visible (query,
key) pairs only: half the square of a causal prompt) and the largest difference from ``sdpa, mask``.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

SWEEP = {"BLOCK_M": (64, 128), "BLOCK_N": (32, 64, 128), "num_warps": (4, 8), "num_stages": (2, 3, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama:7b")
    ap.add_argument("--seq-len", type=int, default=2048, help="prompt tokens (queries)")
    ap.add_argument("--cache-len", default="2048,4096", help="comma-separated KV cache lengths, each >= --seq-len")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--sweep", action="store_true", help="also time every tile of the kernel")
    ap.add_argument("--json", default=None, help="append each row to this file")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.cache_len.split(",")]
    if any(n < args.seq_len for n in lengths):
        ap.error(f"--cache-len {args.cache_len}: every cache must hold the prompt of {args.seq_len} tokens")
    if not torch.cuda.is_available():
        raise SystemExit("error: bench/prefill_attention.py measures on a CUDA device; none is available")
    import torch.nn.functional as F
    import triton

    import mmcompile as mmc
    from mmcompile import prefill_attention as pa

    from mmcompile.models import llama

    family, name = mmc.models.parse_spec(args.model)
    if family != "llama" or name not in llama.CONFIGS:
        ap.error(f"--model must be a llama spec ({', '.join('llama:' + n for n in llama.CONFIGS)}), got {args.model}")
    config = llama.CONFIGS[name]
    B, S, H, HKV, D = args.batch, args.seq_len, config.n_heads, config.kv_heads, config.head_dim
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    q = torch.randn(B, S, H, D, device="cuda", dtype=dtype).transpose(1, 2)
    positions = torch.arange(S, device="cuda")[None].expand(B, S)
    pairs = B * H * S * (S + 1) / 2  # visible (query, key) pairs
    print(f"{args.model} prefill attention, {S} queries, batch {B}, {H} heads of {D} ({HKV} kv), {args.dtype}, "
          f"{torch.cuda.get_device_name()}")
    print("| cache slots | way | ms | TFLOP/s (visible pairs) | x sdpa, mask | max diff |")
    print("|---|---|---|---|---|---|")
    for L in lengths:
        k, v = (torch.randn(B, HKV, L, D, device="cuda", dtype=dtype) for _ in range(2))
        mask = (torch.arange(L, device="cuda")[None, None, None, :] <= positions[:, None, :, None])
        ways = {
            "sdpa, mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
            "sdpa, causal": lambda: F.scaled_dot_product_attention(q, k[:, :, :S], v[:, :, :S], is_causal=True,
                                                                   enable_gqa=True),
            "mmcompile": lambda: pa.prefill_attention(q, k, v, positions),
        }
        if args.sweep:
            for values in itertools.product(*SWEEP.values()):
                cfg = dict(zip(SWEEP, values))
                name = "tile " + " ".join(f"{k_}={v_}" for k_, v_ in cfg.items())
                ways[name] = lambda cfg=cfg: pa.launch(pa._prefill_kernel, q, k, v, positions, D ** -0.5, cfg)
        want = ways["sdpa, mask"]().float()
        base = None
        for name, fn in ways.items():
            try:
                diff = (fn().float() - want).abs().max().item()
                ms = triton.testing.do_bench(fn, warmup=25, rep=200)
            except Exception as e:  # a tile that does not fit the GPU's shared memory
                print(f"| {L} | {name} | failed: {type(e).__name__}: {str(e)[:80]} | | | |", flush=True)
                continue
            base = ms if base is None else base
            tflops = 4 * pairs * D / ms / 1e9
            print(f"| {L} | {name} | {ms:.3f} | {tflops:.0f} | {base / ms:.2f} | {diff:.1e} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(dict(model=args.model, seq_len=S, cache_len=L, batch=B, way=name, ms=ms,
                                            tflops=tflops, max_diff=diff, gpu=torch.cuda.get_device_name(),
                                            torch=torch.__version__)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
