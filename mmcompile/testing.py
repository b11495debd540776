"""Testing utilities for passes — what a user calls in their own CI, and what our tests use.

    from mmcompile import testing
    prog = mmc.capture(MyBlock(), (x,))
    after, report = testing.check_pass(
        prog, "canonicalize",
        changed=True,
        checks="CHECK: aten.permute\\nCHECK-NOT: aten.transpose",
        op_counts={"aten.transpose.int": 0},
    )

``check_pass`` runs the pass on a copy, verifies the Program's invariants, compares numerics with the
Program before the pass on its example inputs (outputs and in-place state), applies FileCheck directives
to the printed IR, checks op counts, and checks that a second run changes nothing.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree

from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program

__all__ = ["run_pass", "run_program", "assert_close", "check_numerics", "assert_op_counts", "filecheck",
           "check_pass"]


def _as_pass(p: str | Pass) -> Pass:
    from mmcompile import passes

    return passes.get(p) if isinstance(p, str) else p


def run_pass(program: Program, pass_: str | Pass, *, verify: bool = True, **options: Any) -> tuple[Program, PassReport]:
    """Run one pass on a copy of ``program`` with the contract enforced; returns (new program, report)."""
    p = _as_pass(pass_)
    out = program.clone()
    report = p(out, options, check_contract=True)
    if verify:
        out.verify()
    return out, report


def _clone_inputs(inputs):
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]


def run_program(program: Program | Any, inputs: list[Any] | None = None) -> tuple[list[Any], list[Any]]:
    """Run a Program (or Compiled) on copies of flat inputs; returns (flat outputs, inputs after the run)."""
    prog = program if isinstance(program, Program) else program.program
    flat = _clone_inputs(inputs if inputs is not None else prog.example_inputs)
    runner = program.run_flat
    outs = runner(flat)
    return list(outs), flat


def assert_close(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-5, msg: str = "") -> None:
    """``torch.testing.assert_close`` over matching pytrees, with a message naming the leaf that differs.

    NaNs in the same places are equal: a Program compared with itself must pass.
    """
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    if a_spec != e_spec:
        raise AssertionError(f"{msg}structure differs: {a_spec} vs {e_spec}")
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"{msg}leaf {i}: {m}")
        elif a != e:
            raise AssertionError(f"{msg}leaf {i}: {a!r} != {e!r}")


def check_numerics(reference: Program | Any, candidate: Program | Any, inputs: list[Any] | None = None, *,
                   rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Outputs and in-place state of ``candidate`` equal ``reference``'s on the same flat inputs."""
    ref_prog = reference if isinstance(reference, Program) else reference.program
    inputs = inputs if inputs is not None else ref_prog.example_inputs
    ref_out, ref_state = run_program(reference, inputs)
    out, state = run_program(candidate, inputs)
    assert_close(out, ref_out, rtol=rtol, atol=atol, msg="outputs: ")
    assert_close(state, ref_state, rtol=rtol, atol=atol, msg="inputs after the run (state): ")


def assert_op_counts(program: Program, expected: Mapping[str, int]) -> None:
    """Each named op appears exactly that many times (0: absent). Names as in ``Program.op_counts()``."""
    counts = program.op_counts()
    wrong = {name: (counts.get(name, 0), n) for name, n in expected.items() if counts.get(name, 0) != n}
    if wrong:
        detail = ", ".join(f"{k}: found {got}, expected {want}" for k, (got, want) in wrong.items())
        raise AssertionError(f"op counts of {program.name} differ: {detail}\n{program}")


def filecheck(program_or_text: Program | str, checks: str) -> None:
    """Apply FileCheck directives (``CHECK:``, ``CHECK-NEXT:``, ``CHECK-NOT:``, ``CHECK-COUNT-N:``) to the IR text."""
    text = str(program_or_text)
    # torch's FileCheck reads directives only after a '#' comment marker: accept bare `CHECK: ...` lines too
    checks = "\n".join(f"# {line.strip()}" if line.strip().startswith("CHECK") else line
                       for line in checks.splitlines())
    try:
        torch.testing.FileCheck().run(checks, text)
    except RuntimeError as e:
        raise AssertionError(f"FileCheck failed: {e}\n--- IR ---\n{text}") from None


def check_pass(
    program: Program,
    pass_: str | Pass,
    *,
    changed: bool | None = None,
    checks: str | None = None,
    op_counts: Mapping[str, int] | None = None,
    numerics: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    idempotent: bool = True,
    options: Mapping[str, Any] | None = None,
) -> tuple[Program, PassReport]:
    """Run ``pass_`` and check everything a pass promises. Returns (program after, report)."""
    p = _as_pass(pass_)
    after, report = run_pass(program, p, **dict(options or {}))
    if changed is not None and report.changed != changed:
        raise AssertionError(
            f"pass {p.name} reported changed={report.changed}, expected {changed}; stats={dict(report.stats)} "
            f"notes={report.notes}\n{after}"
        )
    if checks:
        filecheck(after, checks)
    if op_counts:
        assert_op_counts(after, op_counts)
    if numerics:
        tol = (p.tolerance, p.tolerance) if not p.exact and p.tolerance is not None else (rtol, atol)
        check_numerics(program, after, rtol=tol[0], atol=tol[1])
    if idempotent:
        again, second = run_pass(after, p, **dict(options or {}))
        if second.changed or str(again) != str(after):
            raise AssertionError(f"pass {p.name} is not idempotent: second run reported {dict(second.stats)}")
    return after, report
