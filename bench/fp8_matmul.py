"""The fp8 products of a prefill alone: ways to call ``torch._scaled_mm`` against the bf16 matmul.

    python bench/fp8_matmul.py --model llama:7b --tokens 2048

For each linear shape of the model (the stacked q/k/v, o, the stacked gate/up and down projections),
``tokens`` rows of random activations times random weights scaled like a trained layer's:

- ``rowwise``: e4m3 activations and weights, one scale per row of each (what ``linear_fp8`` computes);
- ``tensorwise``: one scale per tensor;
- ``+ fast accumulation``: the same with ``use_fast_accum=True`` (the tensor cores' partial sums are
  not promoted to full fp32 along K);
- ``bf16``: the unquantized product.

Each row is the median of ``triton.testing.do_bench``, the TFLOP/s and the largest difference from the
product in fp32, relative to its largest magnitude.
"""

from __future__ import annotations

import argparse
import json

import torch

E4M3_MAX = 448.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama:7b")
    ap.add_argument("--tokens", type=int, default=2048, help="rows of activations (prefill tokens)")
    ap.add_argument("--json", default=None, help="append each row to this file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("error: bench/fp8_matmul.py needs a CUDA GPU of compute capability 8.9 or newer")
    import triton

    import mmcompile as mmc
    from mmcompile.models import llama

    family, name = mmc.models.parse_spec(args.model)
    if family != "llama" or name not in llama.CONFIGS:
        ap.error(f"--model must be a llama spec ({', '.join('llama:' + n for n in llama.CONFIGS)}), got {args.model}")
    c = llama.CONFIGS[name]
    kv = c.kv_heads * c.head_dim
    shapes = {"q/k/v": (c.dim + 2 * kv, c.dim), "o": (c.dim, c.dim), "gate/up": (2 * c.ffn_dim, c.dim),
              "down": (c.dim, c.ffn_dim)}
    M = args.tokens
    torch.manual_seed(0)
    print(f"{args.model}, {M} tokens, {torch.cuda.get_device_name()}")
    print("| layer (N x K) | way | ms | TFLOP/s | x bf16 | error vs fp32 |")
    print("|---|---|---|---|---|---|")
    for layer, (N, K) in shapes.items():
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5
        want = x.float() @ w.float().t()

        def rows(t):
            s = t.float().abs().amax(1, keepdim=True) / E4M3_MAX
            return (t.float() / s).to(torch.float8_e4m3fn), s

        def whole(t):
            s = t.float().abs().amax() / E4M3_MAX
            return (t.float() / s).to(torch.float8_e4m3fn), s

        (xr, sxr), (wr, swr), (xt, sxt), (wt, swt) = rows(x), rows(w), whole(x), whole(w)
        ways = {"bf16": lambda: x @ w.t()}
        for fast in (False, True):
            tag = " + fast accumulation" if fast else ""
            ways["rowwise" + tag] = lambda fast=fast: torch._scaled_mm(
                xr, wr.t(), scale_a=sxr, scale_b=swr.t(), out_dtype=torch.bfloat16, use_fast_accum=fast)
            ways["tensorwise" + tag] = lambda fast=fast: torch._scaled_mm(
                xt, wt.t(), scale_a=sxt, scale_b=swt, out_dtype=torch.bfloat16, use_fast_accum=fast)
        base = None
        for way, fn in ways.items():
            error = ((fn().float() - want).abs().max() / want.abs().max()).item()
            ms = triton.testing.do_bench(fn, warmup=25, rep=200)
            base = ms if base is None else base
            tflops = 2 * M * N * K / ms / 1e9
            print(f"| {layer} ({N} x {K}) | {way} | {ms:.4f} | {tflops:.0f} | {base / ms:.2f} | {error:.1e} |",
                  flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(dict(model=args.model, tokens=M, layer=layer, n=N, k=K, way=way, ms=ms,
                                            tflops=tflops, error=error, gpu=torch.cuda.get_device_name(),
                                            torch=torch.__version__)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
