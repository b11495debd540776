"""A K-step decode graph's greedy choice and position update in one kernel.

Between two decode steps of a ``MultiStepGraph`` the greedy path chooses each row's token (argmax over
the vocabulary), records it as the step's output, feeds it back as the next step's token and advances
the row's position. As torch ops these are five launches per step, and ATen's argmax alone took 12.6 us
per token on an H100 for a 32000-token vocabulary (one block per row reads the whole row). ``advance``
does all of it in one Triton launch of one program per row, which reads its row of logits in wide
blocks.

The choice is exactly ``torch.argmax``'s: the first index of the largest value, a NaN counting as
larger than everything (the first NaN wins), ``-0.0`` equal to ``0.0``. Each logit becomes a 32-bit key
whose integer order is the float order (sign-magnitude turned into two's complement; NaN the largest
key), so the kernel compares integers.
"""

from __future__ import annotations

import torch

from mmcompile.kernels import available, triton, tl

__all__ = ["advance", "advance_reference", "supported"]


def supported(logits: torch.Tensor) -> tuple[bool, str]:
    """Whether ``advance`` takes ``logits`` [B, V]: (ok, reason)."""
    if logits.dim() != 2:
        return False, f"logits of {logits.dim()} dimensions; the kernel takes [B, V]"
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"{logits.dtype} logits; the kernel takes float16, bfloat16 or float32"
    if logits.stride(1) != 1:
        return False, "the logits are not contiguous over the vocabulary"
    return available(logits.device)


if triton is not None:

    @triton.jit
    def _advance_kernel(logits_ptr, stride_b, V, out_ptr, stride_ob, col, tok_ptr, pos_ptr, BLOCK: tl.constexpr):
        """Row b: ``i = argmax(logits[b])``; ``out[b, col] = i``, ``tokens[b] = i``, ``pos[b] += 1``."""
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        best_key = tl.full([], -2147483648, tl.int32)
        best_idx = tl.full([], 0, tl.int32)
        for v0 in range(0, V, BLOCK):
            idx = v0 + offs
            ok = idx < V
            x = tl.load(logits_ptr + b * stride_b + idx, mask=ok, other=0.0).to(tl.float32) + 0.0  # -0.0 -> 0.0
            bits = x.to(tl.int32, bitcast=True)
            key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: magnitude bits flipped, so ints order as floats
            key = tl.where(x != x, 0x7FFFFFFF, key)  # NaN above +inf
            key = tl.where(ok, key, -2147483648)  # below every float, -inf included
            top = tl.max(key, 0)
            first = tl.min(tl.where(key == top, idx, 2147483647), 0)
            better = top > best_key  # strictly: an equal key in a later block comes later
            best_idx = tl.where(better, first, best_idx)
            best_key = tl.where(better, top, best_key)
        choice = best_idx.to(tl.int64)
        tl.store(out_ptr + b * stride_ob + col, choice)
        tl.store(tok_ptr + b, choice)
        tl.store(pos_ptr + b, tl.load(pos_ptr + b) + 1)


def advance(logits: torch.Tensor, out: torch.Tensor, col: int, tokens: torch.Tensor, pos: torch.Tensor) -> None:
    """One greedy step's bookkeeping in one launch: each row's ``argmax`` of ``logits`` [B, V] goes to
    ``out[:, col]`` (int64 [B, K]) and ``tokens`` (int64 [B, 1]), and ``pos`` (int64 [B, 1]) advances by
    one; what ``advance_reference`` does with torch ops."""
    ok, why = supported(logits)
    if not ok:
        raise ValueError(f"greedy advance kernel not applicable: {why}")
    B, V = logits.shape
    for name, t, shape in (("out", out, None), ("tokens", tokens, (B, 1)), ("pos", pos, (B, 1))):
        if t.dtype != torch.long or t.device != logits.device or (shape and tuple(t.shape) != shape) \
                or (shape and not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous int64 tensor of shape {list(shape or (B, 'K'))} on "
                             f"{logits.device}, got {t.dtype} {list(t.shape)} on {t.device}")
    if out.dim() != 2 or out.shape[0] != B or not 0 <= col < out.shape[1] or out.stride(1) != 1:
        raise ValueError(f"out {list(out.shape)} has no column {col} for {B} rows")
    block = min(8192, triton.next_power_of_2(V))
    _advance_kernel[(B,)](logits, logits.stride(0), V, out, out.stride(0), col, tokens, pos, BLOCK=block,
                          num_warps=8 if block >= 4096 else 4)


def advance_reference(logits: torch.Tensor, out: torch.Tensor, col: int, tokens: torch.Tensor,
                      pos: torch.Tensor) -> None:
    """``advance`` with torch ops (what a graph records where the kernel does not apply)."""
    nxt = logits.argmax(dim=-1)
    out[:, col].copy_(nxt)
    tokens.copy_(nxt[:, None])
    pos.add_(1)
