"""bench/kernel_resources.py reads registers and spills of the Triton kernels compiled for an H100, on any machine."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
kernel_resources = pytest.importorskip("kernel_resources")


def _ptxas_or_skip():
    pytest.importorskip("triton")
    try:
        kernel_resources.ptxas()
    except SystemExit as e:
        pytest.skip(str(e))


def test_the_decode_gemv_kernels_compile_for_sm90_without_spilling():
    """The one-row GEMV kernels stream every weight of a decode step: at their default tiles they must not
    spill registers to memory (a tile change that makes them spill shows here before a card run)."""
    _ptxas_or_skip()
    seen = 0
    for label, kernel, types, constexprs, warps in kernel_resources.cases():
        if not label.startswith("GEMV") or "rows" in label:
            continue
        r = kernel_resources.resources(kernel, types, constexprs, warps, 90)
        assert 0 < r["registers"] <= 255 and r["programs_per_sm"] >= 1, (label, r)
        assert r["spill_bytes"] == 0, (label, r)
        seen += 1
    assert seen == 8  # bf16 plain, + residual, + norm, + gate; int8 with each of its three conversions


def test_a_constexpr_the_kernel_does_not_take_is_refused():
    _ptxas_or_skip()
    from mmcompile import kernels

    with pytest.raises(ValueError, match=r"no argument\(s\) \['BLOCK_Q'\]"):
        kernel_resources.resources(kernels._gemv_kernel, {}, {"BLOCK_Q": 4}, 4, 90)
