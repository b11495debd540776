"""A K-step decode graph's greedy choice and position update in one kernel.

Between two decode steps of a ``MultiStepGraph`` the greedy path chooses each row's token (argmax over
the vocabulary), records it as the step's output, feeds it back as the next step's token and advances
the row's position. As torch ops these are five launches per step, and ATen's argmax alone took 12.6 us
per token on an H100 for a 32000-token vocabulary (one block per row reads the whole row). ``advance``
does all of it in one Triton launch: the programs of a row each take a block of its logits, and the
last to finish writes the row's results — 3.1 us per token on an H100 (a first version, one program
per row reading the row block after block, took 10.2).

The choice is exactly ``torch.argmax``'s: the first index of the largest value, a NaN counting as
larger than everything (the first NaN wins), ``-0.0`` equal to ``0.0``. Each logit becomes a 32-bit key
whose integer order is the float order (sign-magnitude turned into two's complement; NaN the largest
key), so the kernel compares integers.
"""

from __future__ import annotations

import torch

from mmcompile.kernels import available, triton, tl

__all__ = ["advance", "advance_reference", "supported", "workspace"]


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
    def _advance_kernel(logits_ptr, stride_b, V, out_ptr, stride_ob, col, tok_ptr, pos_ptr, best_ptr, count_ptr,
                        PARTS: tl.constexpr, BLOCK: tl.constexpr):
        """Row b, block p of the vocabulary: the block's largest key and first index where it is, packed
        into one int64 (key above, ``2^31 - 1 - index`` below: the larger packs the larger key, then
        the earlier index) and merged into ``best[b]`` with an atomic max. The row's last block to
        finish (counted in ``count[b]``) takes the result, leaves ``best[b]`` and ``count[b]`` as it
        found them for the next launch, and writes ``out[b, col]``, ``tokens[b]`` and ``pos[b] + 1``."""
        b = tl.program_id(0)
        idx = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = idx < V
        x = tl.load(logits_ptr + b * stride_b + idx, mask=ok, other=0.0).to(tl.float32) + 0.0  # -0.0 -> 0.0
        bits = x.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: magnitude bits flipped, so ints order as floats
        key = tl.where(x != x, 0x7FFFFFFF, key)  # NaN above +inf
        key = tl.where(ok, key, -2147483648)  # below every float, -inf included
        top = tl.max(key, 0)
        first = tl.min(tl.where(key == top, idx, 2147483647), 0)
        tl.atomic_max(best_ptr + b, (top.to(tl.int64) << 32) | (2147483647 - first).to(tl.int64), sem="relaxed")
        if tl.atomic_add(count_ptr + b, 1, sem="acq_rel") == PARTS - 1:
            packed = tl.atomic_xchg(best_ptr + b, -9223372036854775808, sem="relaxed")  # read, and reset
            tl.store(count_ptr + b, 0)
            choice = 2147483647 - (packed & 0xFFFFFFFF)
            tl.store(out_ptr + b * stride_ob + col, choice)
            tl.store(tok_ptr + b, choice)
            tl.store(pos_ptr + b, tl.load(pos_ptr + b) + 1)


def workspace(batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``advance`` merges rows' blocks in, left as found by each launch: keep one per caller that
    launches it (a K-step graph records its launches with its own) and never share it between launches
    that may run at once."""
    return (torch.full((batch,), -(2 ** 63), dtype=torch.long, device=device),
            torch.zeros(batch, dtype=torch.int32, device=device))


def advance(logits: torch.Tensor, out: torch.Tensor, col: int, tokens: torch.Tensor, pos: torch.Tensor,
            work: tuple[torch.Tensor, torch.Tensor] | None = None, block: int = 2048) -> None:
    """One greedy step's bookkeeping in one launch: each row's ``argmax`` of ``logits`` [B, V] goes to
    ``out[:, col]`` (int64 [B, K]) and ``tokens`` (int64 [B, 1]), and ``pos`` (int64 [B, 1]) advances by
    one; what ``advance_reference`` does with torch ops. ``work``: a ``workspace`` of at least B rows
    (a new one if not given); the launch has ``cdiv(V, block)`` programs per row."""
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
    if V >= 2 ** 31:
        raise ValueError(f"a vocabulary of {V} entries; the kernel's indices are 31-bit")
    best, count = work if work is not None else workspace(B, logits.device)
    if best.shape[0] < B or count.shape[0] < B:
        raise ValueError(f"a workspace of {best.shape[0]} rows for {B} rows of logits")
    parts = triton.cdiv(V, block)
    _advance_kernel[(B, parts)](logits, logits.stride(0), V, out, out.stride(0), col, tokens, pos, best, count,
                                PARTS=parts, BLOCK=block, num_warps=4)


def advance_reference(logits: torch.Tensor, out: torch.Tensor, col: int, tokens: torch.Tensor,
                      pos: torch.Tensor) -> None:
    """``advance`` with torch ops (what a graph records where the kernel does not apply)."""
    nxt = logits.argmax(dim=-1)
    out[:, col].copy_(nxt)
    tokens.copy_(nxt[:, None])
    pos.add_(1)
