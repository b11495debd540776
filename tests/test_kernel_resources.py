"""bench/kernel_resources.py reads registers and spills of the Triton kernels compiled for an H100, on any machine."""

import json
import os
import subprocess
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


def _compiled_for_sm90(which: str) -> list:
    """``[(label, resources)]`` of ``kernel_resources.cases()`` whose ``label`` satisfies the expression
    ``which``, compiled for sm_90 in a process of its own, without Triton's interpreter: the interpreter
    swaps triton.language's functions while it runs kernels (and does not always swap them back), which
    Triton's compiler would then meet in the same process."""
    code = ("import json, sys\n"
            f"sys.path.insert(0, {str(Path(kernel_resources.__file__).parent)!r})\n"
            "import kernel_resources as kr\n"
            "print(json.dumps([(label, kr.resources(k, t, c, w, 90)) for label, k, t, c, w in kr.cases()\n"
            f"                  if {which}]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_the_decode_gemv_kernels_compile_for_sm90_without_spilling():
    """The one-row GEMV kernels stream every weight of a decode step: at their default tiles they must not
    spill registers to memory (a tile change that makes them spill shows here before a card run)."""
    _ptxas_or_skip()
    results = _compiled_for_sm90("label.startswith('GEMV') and 'rows' not in label")
    for label, res in results:
        assert 0 < res["registers"] <= 255 and res["programs_per_sm"] >= 1, (label, res)
        assert res["spill_bytes"] == 0, (label, res)
        # compiled as a launch specializes it, each reads its weights in 16-byte vectors
        assert res["widest_load_bytes"] == 16, (label, res)
    assert len(results) == 12  # bf16 plain, + residual, + norm, + norm launched dependently, + gate; int8 with
    # each conversion, launched dependently, with its norm launched dependently, and a wide tile with VEC


def test_the_decode_attention_kernels_compile_for_sm90_without_spilling():
    """The split-KV decode attention, plain and with its rotary and cache write (also launched dependently):
    compiled by Triton's own compiler for an H100 (which the CPU tests' interpreter is not: a name one
    branch defines with another type than the code after it fails only there). The two a replayed decode
    step runs do not spill; the ordinary launch with rotary and cache write spills a few bytes on Triton 3.9
    (40; it runs only where dependent launches are not available)."""
    _ptxas_or_skip()
    results = dict(_compiled_for_sm90("label.startswith('decode attention')"))
    assert len(results) == 3
    for label, res in results.items():
        assert 0 < res["registers"] <= 255 and res["spill_bytes"] <= 64, (label, res)
    assert results["decode attention (split-KV), 32 heads of 128"]["spill_bytes"] == 0
    assert results["decode attention with rotary and the cache write, launched dependently"]["spill_bytes"] == 0


def test_a_constexpr_the_kernel_does_not_take_is_refused():
    _ptxas_or_skip()
    from mmcompile import kernels

    with pytest.raises(ValueError, match=r"no argument\(s\) \['BLOCK_Q'\]"):
        kernel_resources.resources(kernels._gemv_kernel, {}, {"BLOCK_Q": 4}, 4, 90)


def test_the_prefill_attention_kernel_compiles_for_sm90_at_its_default_tile():
    """The position-bounded prefill kernel compiles with Triton's own compiler for an H100 at the tile
    ``config_for`` picks (its spills are a reading for docs/benchmarks.md, not a bound: the tile is the
    one an H100 ran fastest)."""
    _ptxas_or_skip()
    [(label, res)] = _compiled_for_sm90("label.startswith('prefill attention')")
    assert 0 < res["registers"] <= 255 and res["programs_per_sm"] >= 1, (label, res)
