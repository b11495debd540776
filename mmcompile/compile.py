"""lower and compile: the one-call entry points from a Program or a model to a Compiled callable."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mmcompile import backends
from mmcompile.capture import capture
from mmcompile.pipeline import Pass, optimize
from mmcompile.program import Program
from mmcompile.backends import Compiled, DEFAULT_BACKEND

__all__ = ["lower", "compile"]


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
) -> Compiled:
    """capture + optimize + lower in one call. ``compiled.program`` is the optimized Program and
    ``compiled.reports`` the pass reports."""
    impl = backends.get(backend)  # fail before the expensive capture if the backend cannot run
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    if param is not None:
        impl.warm_up(param.device)
    program = capture(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    result = optimize(program, passes, **(pass_options or {}))
    compiled = lower(result.program, backend, **(backend_options or {}))
    compiled.reports = result.reports
    return compiled
