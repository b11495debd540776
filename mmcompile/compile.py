"""lower and compile: the one-call entry points from a Program or a model to a Compiled callable."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mmcompile import backends
from mmcompile.capture import capture
from mmcompile.pipeline import Pass, optimize, resolve
from mmcompile.program import Program
from mmcompile.backends import Compiled, DEFAULT_BACKEND

__all__ = ["lower", "compile", "check_against", "CHECK_BUDGETS"]


def lower(program: Program, backend: str = DEFAULT_BACKEND, **options: Any) -> Compiled:
    """Lower ``program`` with a registered backend (``mmc.backends.names()``)."""
    return backends.get(backend).lower(program, options)


def compile(  # noqa: A001 - mirrors torch.compile
    model: torch.nn.Module,
    args: tuple | Any,
    kwargs: dict | None = None,
    *,
    passes: str | Sequence[str | Pass] = "default",
    backend: str = DEFAULT_BACKEND,
    dynamic_shapes: Any = None,
    pass_options: dict | None = None,
    backend_options: dict | None = None,
    check: bool | float = False,
) -> Compiled:
    """capture + optimize + lower in one call. ``compiled.program`` is the optimized Program and
    ``compiled.reports`` the pass reports.

    ``check``: run the compiled program and the captured one (the model's own ops, interpreted) on copies
    of the example inputs and raise ``VerificationError`` when an output or a state buffer they update
    differs by more than a budget — the largest difference relative to the reference's largest
    magnitude. ``True`` takes the budget of the inputs' floating dtype (``CHECK_BUDGETS``); a number is
    the budget itself, and is required when a lossy pass (``quantize_linear``) is in the pipeline.
    ``compiled.check_error`` keeps the largest relative difference found."""
    impl = backends.get(backend)  # fail before the expensive capture if the backend cannot run
    lossy = ", ".join(p.name for p in resolve(passes) if not p.exact) if check is True else ""
    if lossy:
        raise ValueError(f"check=True with a lossy pass ({lossy}): say how far the outputs may move, as a fraction "
                         "of their largest magnitude, e.g. check=0.1")
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    if param is not None:
        impl.warm_up(param.device)
    program = capture(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    result = optimize(program, passes, **(pass_options or {}))
    compiled = lower(result.program, backend, **(backend_options or {}))
    compiled.reports = result.reports
    if check is not False:
        compiled.check_error = check_against(program, compiled, None if check is True else float(check))
    return compiled


# the largest difference from the captured program, relative to its outputs' largest magnitude, that
# arithmetic in another order (fused kernels, reassociated sums) explains, by the inputs' floating dtype
CHECK_BUDGETS = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def check_against(reference: Program, compiled: Compiled, budget: float | None = None) -> float:
    """Run ``compiled`` and ``reference`` on copies of the reference's example inputs; raise
    ``VerificationError`` naming the first output (or updated input) whose largest difference, relative
    to the reference's largest magnitude there, exceeds ``budget`` (default: ``CHECK_BUDGETS`` for the
    least precise floating dtype among the inputs). Returns the largest relative difference."""
    from mmcompile.errors import VerificationError
    from mmcompile.testing import relative_error, run_program

    inputs = reference.example_inputs
    if budget is None:
        dtypes = {x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()}
        budget = max((CHECK_BUDGETS.get(d, 1e-2) for d in dtypes), default=CHECK_BUDGETS[torch.float32])
    want, want_state = run_program(reference, inputs)
    got, got_state = run_program(compiled, inputs)
    worst = 0.0
    for kind, gs, ws in (("output", got, want), ("input after the run", got_state, want_state)):
        for i, (g, w) in enumerate(zip(gs, ws)):
            if not isinstance(w, torch.Tensor):
                if g != w:
                    raise VerificationError(f"{reference.name}: compiled {kind} {i} is {g!r}, the captured "
                                            f"program's {w!r}")
                continue
            if w.is_complex():
                g, w = torch.view_as_real(torch.as_tensor(g)), torch.view_as_real(w)
            if not w.is_floating_point() or w.numel() == 0:  # integers, booleans: exactly equal
                if not torch.equal(torch.as_tensor(g).cpu(), w.cpu()):
                    raise VerificationError(f"{reference.name}: compiled {kind} {i} ({w.dtype} {list(w.shape)}) "
                                            "differs from the captured program's")
                continue
            g, w = g.cpu(), w.cpu()
            if g.shape != w.shape:
                raise VerificationError(f"{reference.name}: compiled {kind} {i} has shape {list(g.shape)}, the "
                                        f"captured program's {list(w.shape)}")
            error = relative_error(g, w)
            if not error <= budget:  # NaN fails too
                raise VerificationError(
                    f"{reference.name}: compiled {kind} {i} ({list(w.shape)}) differs from the captured program's "
                    f"by {error:.2e} of its largest magnitude ({w.abs().max().item():.3g}), over the budget of "
                    f"{budget:.1e}. "
                    "Compile with backend='eager' or fewer passes to find the step that changed it "
                    "(`mmcompile explain` shows each pass's rewrite)")
            worst = max(worst, error)
    return worst
