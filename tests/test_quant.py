"""Quantization math: round trips and error bounds as properties, over shapes, group sizes and outliers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmcompile import quant


@st.composite
def weights(draw, k_multiple: int = 1):
    n = draw(st.integers(1, 24))
    k = draw(st.integers(1, 6)) * k_multiple if k_multiple > 1 else draw(st.integers(1, 80))
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    w = w * draw(st.sampled_from([1e-4, 1.0, 300.0]))
    if draw(st.booleans()):  # an outlier
        w[draw(st.integers(0, n - 1)), draw(st.integers(0, k - 1))] *= 1000
    if draw(st.booleans()):  # an all-zero channel
        w[draw(st.integers(0, n - 1))] = 0
    return w


@settings(max_examples=60, deadline=None)
@given(weights())
def test_int8_round_trip_error_is_at_most_half_a_step_per_channel(w):
    q, scales = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (w.shape[0],)
    assert int(q.abs().max()) <= 127
    err = (quant.dequantize_int8(q, scales) - w).abs()
    assert bool((err <= scales[:, None] / 2 * (1 + 1e-5) + 1e-12).all())
    zero = (w == 0).all(dim=1)
    assert bool((quant.dequantize_int8(q, scales)[zero] == 0).all())  # a zero channel stays exactly zero


@settings(max_examples=60, deadline=None)
@given(weights(k_multiple=32), st.sampled_from(quant.INT4_GROUP_SIZES))
def test_int4_round_trip_error_is_at_most_half_a_step_per_group(w, group):
    if w.shape[1] % group:
        with pytest.raises(ValueError, match=f"multiple of it; this weight is \\[{w.shape[0]}, {w.shape[1]}\\]"):
            quant.quantize_int4(w, group)
        return
    packed, scales, zeros = quant.quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (w.shape[0], w.shape[1] // 2)
    assert scales.shape == zeros.shape == (w.shape[0], w.shape[1] // group)
    deq = quant.dequantize_int4(packed, scales, zeros)
    step = scales.repeat_interleave(group, dim=1)
    assert bool(((deq - w).abs() <= step / 2 * (1 + 1e-4) + 1e-6 * w.abs().amax()).all())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 16), st.integers(1, 20))
def test_int4_packing_is_lossless(n, half_k):
    codes = torch.randint(0, 16, (n, 2 * half_k), dtype=torch.uint8)
    assert torch.equal(quant.unpack_int4(quant.pack_int4(codes)), codes)


@settings(max_examples=60, deadline=None)
@given(weights(), st.sampled_from(["row", "tensor"]))
def test_fp8_round_trip_error_is_at_most_half_a_step_of_e4m3(w, per):
    """e4m3 keeps 3 mantissa bits: a weight comes back within 2^-4 of itself, or within half the smallest
    subnormal step (2^-10 of its scale) where it is that small; the largest magnitude maps to 448, a zero
    row stays zero."""
    q, scales = quant.quantize_fp8(w, per)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scales.shape == ((w.shape[0],) if per == "row" else ())
    s = scales[:, None] if per == "row" else scales
    deq = q.float() * s
    assert bool(((deq - w).abs() <= torch.maximum(w.abs() * 2.0 ** -4, s * 2.0 ** -10) * (1 + 1e-6)).all())
    assert float(q.float().abs().max()) <= quant.FP8_MAX
    zero = (w == 0).all(1)
    assert bool((deq[zero] == 0).all())


def test_clear_errors_for_what_cannot_be_quantized():
    with pytest.raises(ValueError, match="group_size must be one of"):
        quant.quantize_int4(torch.randn(4, 64), 48)
    with pytest.raises(ValueError, match="inf or nan"):
        quant.quantize_int8(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="floating-point \\[N, K\\]"):
        quant.quantize_int8(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="even number of columns"):
        quant.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
