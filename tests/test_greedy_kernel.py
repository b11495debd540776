"""The K-step graph's greedy kernel (mmcompile.runtime.greedy) against torch.argmax and the ops it replaces.

On a CPU machine the kernel runs under Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mmcompile.kernels import available
from mmcompile.runtime import greedy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(DEVICE)[0], reason="triton is not installed (checked where it is)")
SPECIALS = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0]
WORK = greedy.workspace(4, DEVICE)  # shared by every call below: each launch must leave it as it found it


def _both(logits, col=1, k=3, block=2048):
    """(kernel's out, tokens, pos), (torch ops' out, tokens, pos) from the same starting state."""
    B = logits.shape[0]
    start = (torch.full((B, k), -7, dtype=torch.long), torch.full((B, 1), -7, dtype=torch.long),
             torch.arange(B)[:, None] * 10)
    mine = [t.clone().to(DEVICE) for t in start]
    ref = [t.clone().to(DEVICE) for t in start]
    greedy.advance(logits, mine[0], col, mine[1], mine[2], WORK, block=block)
    assert (WORK[0] == -(2 ** 63)).all() and (WORK[1] == 0).all()
    greedy.advance_reference(logits, ref[0], col, ref[1], ref[2])
    return mine, ref


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 4), V=st.sampled_from([1, 5, 127, 4096, 8193]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), levels=st.sampled_from([0, 3]),
       specials=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 20000), st.sampled_from(SPECIALS)), max_size=6),
       block=st.sampled_from([16, 2048]), seed=st.integers(0, 1000))
def test_advance_chooses_what_argmax_chooses(B, V, dtype, levels, specials, block, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g)
    if levels:  # few distinct values: ties everywhere, across the kernel's blocks too, of -0.0 mostly
        logits = -torch.randint(0, levels, (B, V), generator=g).float()
    for row, col, value in specials:
        logits[row % B, col % V] = value
    logits = logits.to(DEVICE, dtype)
    mine, ref = _both(logits, block=block)
    for a, b in zip(mine, ref):
        assert torch.equal(a, b), (a, b)


def test_advance_reads_a_strided_row_view_and_rejects_what_it_cannot_take():
    full = torch.randn(2, 3, 300).to(DEVICE)
    mine, ref = _both(full[:, -1])  # a decode step's logits [B, 1, V] as [B, V]: row stride 900
    assert all(torch.equal(a, b) for a, b in zip(mine, ref))
    out, tok, pos = (torch.zeros(2, 3, dtype=torch.long, device=DEVICE), torch.zeros(2, 1, dtype=torch.long, device=DEVICE),
                     torch.zeros(2, 1, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="not contiguous over the vocabulary"):
        greedy.advance(full[:, :, 0], out, 0, tok, pos)
    with pytest.raises(ValueError, match="int64"):
        greedy.advance(full[:, -1], out, 0, tok.int(), pos)
    with pytest.raises(ValueError, match="no column 3"):
        greedy.advance(full[:, -1], out, 3, tok, pos)
