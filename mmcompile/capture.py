"""capture: model + example inputs -> Program, through torch.export.

Non-strict export by default (it traces the Python the model really runs, the mode transformers
supports), then decomposition to ATen's core op set — except the ops we keep whole on purpose
(``aten.scaled_dot_product_attention``). When export fails, the error is re-raised as a
:class:`CaptureError` naming the likely cause and the model's source line.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any

import torch
import torch.utils._pytree as pytree

from mmcompile.errors import CaptureError
from mmcompile.program import Program

__all__ = ["capture", "decomposition_table"]

# Ops kept whole through decomposition: backends have fused kernels for them.
KEEP_OPS = (torch.ops.aten.scaled_dot_product_attention.default,)


def decomposition_table():
    table = torch.export.default_decompositions()
    for op in KEEP_OPS:
        if op in table:
            del table[op]
    # export keeps these whole though they are not in the core ATen set (F.normalize's norm): decompose them
    table.update(torch._decomp.get_decompositions([torch.ops.aten.linalg_vector_norm.default]))
    return table


class _FunctionModule(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


_LEAF_TYPES = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)


def _check_inputs(args: tuple, kwargs: dict) -> None:
    for label, tree in (("args", args), ("kwargs", kwargs)):
        for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
            if isinstance(leaf, _LEAF_TYPES):
                continue
            where = label + pytree.keystr(path)  # args[1], kwargs['y'][0]
            raise CaptureError(
                f"unsupported input type: the input at {where} is a {type(leaf).__module__}.{type(leaf).__name__}. "
                "torch.export takes tensors, numbers, strings and (nested) tuples/lists/dicts of them; pass the "
                "tensors it holds, or register the type with torch.utils._pytree.register_pytree_node."
            )


_CAUSES = [
    (r"GuardOnDataDependentSymNode|data.dependent|Could not guard on|Could not extract specialized integer",
     "data-dependent control flow: the model branches on, or sizes a tensor by, a tensor's value "
     "(`if x.sum() > 0`, `.item()`, `.tolist()`, `nonzero`). Make the decision from shapes or arguments, or use "
     "torch.cond / torch._check."),
    (r"structure of `inputs` and `dynamic_shapes`|dynamic_shapes.*(keys|match)",
     "dynamic_shapes does not mirror the inputs: give one entry per argument (None for a static one), "
     "with the same nesting as the inputs."),
    (r"Constraints violated|specializ|not in range|Dim\(",
     "a dimension marked dynamic does not vary freely: the model constrains it (a fixed-size buffer, an "
     "assertion on its value). Narrow the range in dynamic_shapes, or leave the dimension static."),
    (r"Unsupported|not supported|unsupported",
     "the model uses something torch.export cannot trace (an unsupported op, input type or Python feature)."),
    (r"has no attribute|is not defined|takes .* positional|too many positional|got an unexpected keyword|"
     r"missing .* required",
     "the model's forward rejected the example inputs: check the arguments passed to capture()."),
    (r"size mismatch|shape|Expected .* dimension|must match",
     "the example inputs do not have shapes the model accepts."),
]


def _likely_cause(message: str) -> str:
    for pattern, cause in _CAUSES:
        if re.search(pattern, message):
            return cause
    return "torch.export failed for the reason below."


def _is_user_frame(filename: str) -> bool:
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.abspath(__file__))
    return not (
        filename.startswith(torch_dir)
        or filename.startswith(here)
        or "/lib/python3" in filename and "site-packages" not in filename
        or filename.startswith("<")
    )


def _source_line(exc: BaseException) -> str | None:
    """The innermost model frame where the failure happened: 'file:line in fn\\n    code'."""
    message = str(exc)
    for m in reversed(list(re.finditer(r'File "([^"]+)", line (\d+), in (\S+)(?:\n\s+(.+))?', message))):
        if _is_user_frame(m.group(1)):
            code = (m.group(4) or "").strip()
            return f"{m.group(1)}:{m.group(2)} in {m.group(3)}" + (f"\n    {code}" if code else "")
    seen = set()
    chain = exc
    best = None
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        for frame in traceback.extract_tb(chain.__traceback__):
            if _is_user_frame(frame.filename):
                best = frame
        chain = chain.__cause__ or chain.__context__
    if best is None:
        return None
    return f"{best.filename}:{best.lineno} in {best.name}\n    {(best.line or '').strip()}"


def _export_decomposed(model, args, kwargs, dynamic_shapes, strict):
    """The core-ATen ExportedProgram of one trace, or None where this torch cannot make it that way.

    ``torch.export.export`` records torch's pre-dispatch ops and ``run_decompositions`` traces the whole
    graph a second time to reach the core ATen set; on a 7B transformers model that second trace is
    half of capture. Export's post-dispatch mode, given the same decomposition table (composite ops
    through ``_override_composite_implicit_decomp``, the rest in the tracer) reaches the same op set in
    one trace. Both are torch internals: where they are missing or refuse, the caller takes the public
    two-step path, which also gives the error message when the model itself cannot be exported."""
    try:
        import functools
        import inspect
        from unittest import mock

        from torch.export import _trace
        from torch.export.exported_program import (
            _override_composite_implicit_decomp,
            _split_decomp_table_to_cia_and_python_decomp,
        )

        to_aten = _trace._export_to_aten_ir
        if "decomp_table" not in inspect.signature(to_aten).parameters:
            return None
        composite, python = _split_decomp_table_to_cia_and_python_decomp(decomposition_table())
        with _override_composite_implicit_decomp(composite), \
                mock.patch.object(_trace, "_export_to_aten_ir", functools.partial(to_aten, decomp_table=python)):
            ep = _trace._export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict, pre_dispatch=False)
    except Exception:  # an internal that moved, or a model export rejects: the public path decides
        return None
    for node in ep.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.lift_fresh_copy.default:
            node.target = torch.ops.aten.clone.default  # the tracer keeps it; the table makes it clone
    ep.graph_module.recompile()
    return ep


def capture(
    model: torch.nn.Module | Any,
    args: tuple | Any,
    kwargs: dict | None = None,
    *,
    dynamic_shapes: Any = None,
    strict: bool = False,
    name: str | None = None,
) -> Program:
    """Capture ``model(*args, **kwargs)`` into a :class:`Program`.

    Args:
        model: an ``nn.Module`` (or a plain function) run for inference: it is captured in eval mode
            and under ``torch.no_grad()``; its training flag is restored afterwards.
        args, kwargs: example inputs. They also become the Program's example inputs for ``verify``.
        dynamic_shapes: as in ``torch.export.export`` (``torch.export.Dim`` per dimension).
        strict: use TorchDynamo-based strict export instead of non-strict tracing.
        name: the Program's name in printed IR and errors (default: the model's class name).
    """
    if not isinstance(args, tuple):
        args = (args,)
    kwargs = dict(kwargs or {})
    if "transformers" in sys.modules:  # its KV-cache objects must be pytrees before export sees them
        from mmcompile.integrations.transformers import register_cache_pytrees

        register_cache_pytrees()
    if not isinstance(model, torch.nn.Module):
        if not callable(model):
            raise CaptureError(f"capture() needs an nn.Module or a callable, got {type(model).__name__}")
        name = name or getattr(model, "__name__", None)
        model = _FunctionModule(model)
    _check_inputs(args, kwargs)
    name = name or type(model).__name__
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ep = _export_decomposed(model, args, kwargs, dynamic_shapes, strict)
            if ep is None:
                ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
                ep = ep.run_decompositions(decomposition_table())
    except CaptureError:
        raise
    except Exception as e:  # torch.export raises many types; all become one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = _source_line(e)
        msg = f"could not capture {name}: {_likely_cause(str(e))}\n  export said: {type(e).__name__}: {first}"
        if where:
            msg += f"\n  at {where}"
        raise CaptureError(msg) from e
    finally:
        model.train(was_training)
    flat = pytree.tree_leaves((args, kwargs))
    return Program.from_exported(ep, flat, name=name)
