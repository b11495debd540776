"""Batch-1 linear layers (GEMV) on the GPU: how close each kernel choice comes to the copy bandwidth.

    python bench/gemv.py

Decode at batch 1 is a chain of GEMVs: y[1, N] = x[1, K] @ W[K, N], bound by reading W once. This
measures, for the Llama-2-7B shapes, cuBLAS (``torch.mm`` eagerly, and as Inductor lowers ``aten.mm``)
against a Triton reduction Inductor generates from ``(x[:, :, None] * W).sum(1)`` with and without
coordinate-descent tuning, and prints GB/s and the fraction of the measured copy bandwidth.
"""

from __future__ import annotations

import sys

import torch

SHAPES = {"qkv / o (4096 x 4096)": (4096, 4096), "gate / up (4096 x 11008)": (4096, 11008),
          "down (11008 x 4096)": (11008, 4096), "lm head (4096 x 32000)": (4096, 32000)}


def timed(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1e3


def copy_bandwidth() -> float:
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() * 2 / timed(lambda: b.copy_(a), 20)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/gemv.py needs a CUDA device", file=sys.stderr)
        return 2
    import torch._inductor.config as inductor_config

    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| layer | kernel | us | GB/s | of copy bw |")
    print("|---|---|---|---|---|")
    for label, (K, N) in SHAPES.items():
        x = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / K ** 0.5  # nn.Linear layout [N, K]
        wt = w.t()
        ref = x @ wt
        variants = {"cuBLAS (torch.mm)": lambda: x @ wt}
        torch._dynamo.reset()
        variants["inductor aten.mm"] = torch.compile(lambda x, w: x @ w.t())
        for cd in (False, True):
            inductor_config.coordinate_descent_tuning = cd
            torch._dynamo.reset()
            f = torch.compile(lambda x, w: (x[:, None, :].float() * w[None].float()).sum(-1).to(x.dtype))
            f(x, w)
            variants[f"triton reduction{' + coord. descent' if cd else ''}"] = f
        inductor_config.coordinate_descent_tuning = False
        for name, fn in variants.items():
            call = fn if name.startswith("cuBLAS") else (lambda fn=fn: fn(x, w))
            out = call()
            torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
            s = timed(call)
            gbs = w.numel() * 2 / s / 1e9
            print(f"| {label} | {name} | {s * 1e6:.1f} | {gbs:.0f} | {gbs * 1e9 / bw:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
