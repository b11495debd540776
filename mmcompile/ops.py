"""``mmcompile::`` custom ops: computations ATen lacks, as ``torch.library`` ops.

Each op has a fake (meta) implementation for tracing, a reference implementation in plain torch, and a
lowering per backend: the Inductor backend decomposes them (``inductor_decompositions``) into ops it
fuses into one kernel, instead of calling them as opaque functions.

- ``mmcompile::linear_int8(x [..., K], weight int8 [N, K], scales [N], bias [N]?) -> [..., N]``:
  int8 weight-only linear, per-output-channel scales in the activation dtype. On the CPU it runs
  ``aten._weight_int8pack_mm`` (when K is a multiple of 32); elsewhere dequantize-then-matmul.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["linear_int8", "inductor_decompositions"]

aten = torch.ops.aten


@torch.library.custom_op("mmcompile::linear_int8", mutates_args=())
def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    # aten's CPU kernel; it crashes on bf16 inputs of several rows when K is not a multiple of 16, so it
    # is used only where K is a multiple of 32 (every real model's hidden size)
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.shape[-1] % 32 == 0:
        y = torch._weight_int8pack_mm(x2, weight, scales.to(x.dtype))
    else:
        y = (x2 @ weight.to(x.dtype).t()) * scales.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


@linear_int8.register_fake
def _(x, weight, scales, bias=None):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _linear_int8_decomposed(x, weight, scales, bias=None):
    """For Inductor: few rows -> one fused reduction that reads the int8 weight once (dequantization in
    the load, fp32 accumulation); more rows -> dequantize and matmul."""
    K, N = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.shape[0] <= 4:
        y = (x2[:, None, :].float() * weight[None].float()).sum(-1) * scales.float()
    else:
        y = (x2 @ weight.to(x.dtype).t()).float() * scales.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], N)


def inductor_decompositions() -> dict:
    return {torch.ops.mmcompile.linear_int8.default: _linear_int8_decomposed}
