"""``torch.compile(model, backend="mmcompile")``: TorchDynamo hands us each captured graph; we run
capture -> the pass pipeline -> a backend on it.

Registered through the ``torch_dynamo_backends`` entry point, so ``backend="mmcompile"`` works once the
package is installed. Options go through ``torch.compile(..., options={...})``:

- ``passes``: pipeline (default ``"default"``);
- ``backend``: ``"inductor"`` (default) or ``"eager"``;
- ``verify``: run the Program verifier between passes;
- ``pass_options``: dict of per-pass options; ``backend_options``: dict for the backend.

Each Dynamo graph is re-captured with ``torch.export`` (non-strict) on real tensors shaped like Dynamo's
example inputs; dimensions Dynamo marked dynamic stay dynamic (``Dim.AUTO``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mmcompile.errors import BackendError

__all__ = ["mmcompile_backend"]

log = logging.getLogger(__name__)

_OPTIONS = {"passes", "backend", "verify", "pass_options", "backend_options"}


def _hint(s: Any) -> int:
    if not isinstance(s, torch.SymInt):
        return int(s)
    hint = getattr(s.node, "hint", None)
    return int(hint) if hint is not None else int(s.node.shape_env.size_hint(s.node.expr))


def _concrete(x: Any) -> Any:
    """A real tensor with the example's size and stride hints (Dynamo may hand us fake tensors).

    Export only reads shapes, dtypes and strides, so the values are zeros."""
    if not isinstance(x, torch.Tensor):
        return x
    shape = [_hint(s) for s in x.shape]
    stride = [_hint(s) for s in x.stride()]
    numel = 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if all(shape) else 0
    return torch.zeros(numel, dtype=x.dtype, device=x.device).as_strided(shape, stride)


def mmcompile_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **kwargs):
    """A TorchDynamo backend: returns a callable taking the graph's flat inputs."""
    from mmcompile.backends import get as get_backend
    from mmcompile.capture import capture
    from mmcompile.pipeline import optimize

    options = dict(options or {}, **kwargs)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise BackendError(f"torch.compile(backend='mmcompile'): unknown option(s) {sorted(unknown)}; "
                           f"known: {sorted(_OPTIONS)}")
    backend_name = options.get("backend", "inductor")
    backend = get_backend(backend_name)
    device = next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), None)
    if device is not None:
        backend.warm_up(device)
    real = [_concrete(x) for x in example_inputs]
    dynamic = None
    if any(isinstance(s, torch.SymInt) for x in example_inputs if isinstance(x, torch.Tensor) for s in x.shape):
        dynamic = tuple(
            {i: torch.export.Dim.AUTO for i, s in enumerate(x.shape) if isinstance(s, torch.SymInt)}
            if isinstance(x, torch.Tensor) else None
            for x in example_inputs
        )
    program = capture(gm, tuple(real), dynamic_shapes=dynamic, name="dynamo_graph")
    result = optimize(program, options.get("passes", "default"), verify=options.get("verify"),
                      **options.get("pass_options", {}))
    compiled = backend.lower(result.program, dict(options.get("backend_options", {})))
    compiled.check_inputs = False
    log.info("mmcompile: %s", "; ".join(str(r) for r in result.reports))

    def run(*args):
        return compiled.run_flat(list(args))

    run.mmcompile_reports = result.reports  # type: ignore[attr-defined]
    run.mmcompile_program = result.program  # type: ignore[attr-defined]
    return run
