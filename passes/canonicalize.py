"""canonicalize: rewrite equivalent spellings of the same math into one normal form.

Later matchers (attention fusion, KV-cache rewrite, quantization) match the normal form only, so one
pattern covers every way a model can write the computation. Every rule is exact: the rewritten graph
computes bit-identical results.

Normal form (rule name — what it does):
- ``transpose_to_permute``  ``transpose(x, a, b)`` and ``t(x)`` become ``permute(x, dims)``;
- ``fold_permutes``         ``permute(permute(x, p), q)`` becomes one permute; identity permutes vanish;
- ``fold_views``            ``view(view(x))`` of a contiguous ``x`` becomes one view; ``_unsafe_view``
  becomes ``view``; a view to the input's own shape vanishes;
- ``remove_identity``       slices over a whole dimension, ``expand`` to the same shape, ``alias``, casts to the same dtype and
  clones that change no layout vanish (never for a graph output, nor a copy of a graph input, a constant
  or a view of one, so no aliasing appears);
- ``scalar_overloads``      ``mul.Scalar(x, c)`` and friends become ``mul.Tensor(x, c)``;
- ``scalar_on_right``       ``add``/``mul`` with a 0-d operand first get it second;
- ``div_to_mul``            ``div(x, c)`` by a power of two becomes ``mul(x, 1/c)`` (exact);
- ``sub_to_add``            ``sub(x, c)`` by a number becomes ``add(x, -c)`` (exact);
- ``positive_dims``         negative ``dim`` arguments of softmax, reductions, unsqueeze, permute and
  cat become positive;
- ``drop_proven_asserts``   export's ``_assert_tensor_metadata`` checks (left by ``.to()``/``.float()``
  calls) whose dtype, device and layout the node's static metadata already proves are removed, so
  they no longer pin weights or read as extra users of a value.
Requires: nothing. Backends: all.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program
from mmcompile.rewrite import insert_call, replace_node, val

from . import register

aten = torch.ops.aten

Rule = Callable[["Canonicalize", Program, fx.Node], bool]


def _is_output_or_input(node: fx.Node) -> bool:
    return node.op == "placeholder" or any(u.op == "output" for u in node.users)


def _aliases_input_or_constant(prog: Program, value: torch.Tensor) -> bool:
    """Whether ``value`` (a fake tensor) shares storage with a graph input or constant (a view of one)."""
    try:
        ref = StorageWeakRef(value.untyped_storage())
    except Exception:  # symbolic-size storages cannot always be referenced: assume it may alias
        return True
    for n in prog.graph.nodes:
        v = n.meta.get("val")
        if n.op in ("placeholder", "get_attr") and isinstance(v, torch.Tensor):
            try:
                if StorageWeakRef(v.untyped_storage()) == ref:
                    return True
            except Exception:
                continue
    return False


def _rank(node) -> int:
    v = val(node)
    return v.dim() if isinstance(v, torch.Tensor) else 0


def transpose_to_permute(p: "Canonicalize", prog: Program, node: fx.Node) -> bool:
    if node.target not in (aten.transpose.int, aten.t.default):
        return False
    x = node.args[0]
    rank = _rank(x)
    dims = list(range(rank))
    if node.target is aten.transpose.int:
        a, b = (d % rank for d in node.args[1:3]) if rank else (0, 0)
    else:
        a, b = (0, 1) if rank == 2 else (0, 0)
    if rank:
        dims[a], dims[b] = dims[b], dims[a]
    new = insert_call(p.name, prog.graph_module, node, aten.permute.default, (x, dims))
    replace_node(node, new)
    return True


def fold_permutes(p: "Canonicalize", prog: Program, node: fx.Node) -> bool:
    if node.target is not aten.permute.default:
        return False
    x, dims = node.args[0], [d % max(_rank(node), 1) for d in node.args[1]]
    if dims == list(range(len(dims))) and not _is_output_or_input(node):
        replace_node(node, x)
        return True
    if isinstance(x, fx.Node) and x.target is aten.permute.default:  # also an identity permute that is an output
        inner = [d % max(_rank(x), 1) for d in x.args[1]]
        new = insert_call(p.name, prog.graph_module, node, aten.permute.default, (x.args[0], [inner[d] for d in dims]))
        replace_node(node, new)
        return True
    return False


def fold_views(p: "Canonicalize", prog: Program, node: fx.Node) -> bool:
    if node.target is aten._unsafe_view.default:
        new = insert_call(p.name, prog.graph_module, node, aten.view.default, tuple(node.args))
        replace_node(node, new)
        return True
    if node.target is not aten.view.default:
        return False
    x = node.args[0]
    xv, nv = val(x), val(node)
    if list(xv.shape) == list(nv.shape) and not _is_output_or_input(node):
        replace_node(node, x)
        return True
    if isinstance(x, fx.Node) and x.target is aten.view.default and val(x.args[0]).is_contiguous():
        new = insert_call(p.name, prog.graph_module, node, aten.view.default, (x.args[0], node.args[1]))
        replace_node(node, new)
        return True
    return False


def _full_slice(node: fx.Node) -> bool:
    """slice(x, dim, 0, end, 1) covering the whole dimension (``x[:, :]``-style indexing)."""
    args = list(node.args) + [None] * (5 - len(node.args))
    x, dim, start, end, step = args[:5]
    dim = 0 if dim is None else dim
    size = val(x).shape[dim]
    whole = end is None or end >= 2**62 or (isinstance(end, int) and isinstance(size, int) and end >= size)
    return (start in (None, 0)) and (step in (None, 1)) and whole


def remove_identity(p: "Canonicalize", prog: Program, node: fx.Node) -> bool:
    t = node.target
    if t is aten.slice.Tensor and _full_slice(node) and not _is_output_or_input(node):
        replace_node(node, node.args[0])
        return True
    if t not in (aten.expand.default, aten.alias.default, aten.clone.default, aten._to_copy.default):
        return False
    x = node.args[0]
    if not isinstance(x, fx.Node) or _is_output_or_input(node):
        return False
    xv, nv = val(x), val(node)
    if not isinstance(xv, torch.Tensor) or list(xv.shape) != list(nv.shape) or xv.dtype != nv.dtype:
        return False
    if t in (aten.clone.default, aten._to_copy.default):
        # a copy of an input or weight (or of a view of one) may be there to break aliasing
        if x.op != "call_function" or _aliases_input_or_constant(prog, xv):
            return False
        if nv.device != xv.device or nv.layout != xv.layout or xv.stride() != nv.stride():
            return False
        if set(node.kwargs) - {"memory_format", "dtype", "device", "layout", "pin_memory"}:
            return False
    replace_node(node, x)
    return True


_SCALAR_TO_TENSOR = {
    aten.mul.Scalar: aten.mul.Tensor,
    aten.add.Scalar: aten.add.Tensor,
    aten.sub.Scalar: aten.sub.Tensor,
    aten.div.Scalar: aten.div.Tensor,
}


def scalar_overloads(p: "Canonicalize", prog: Program, node: fx.Node) -> bool:
    target = _SCALAR_TO_TENSOR.get(node.target)
    if target is None:
        return False
    new = insert_call(p.name, prog.graph_module, node, target, tuple(node.args), dict(node.kwargs))
    replace_node(node, new)
    return True


def scalar_on_right(p: "Canonicalize", prog: Program, node: fx.Node) -> bool:
    if node.target not in (aten.add.Tensor, aten.mul.Tensor) or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = node.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    av, bv = val(a), val(b)
    if av.dim() == 0 and bv.dim() > 0 and av.dtype == bv.dtype:
        new = insert_call(p.name, prog.graph_module, node, node.target, (b, a))
        replace_node(node, new)
        return True
    return False


def _exact_reciprocal(c) -> bool:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or c == 0 or not math.isfinite(c):
        return False
    mant, exp = math.frexp(abs(c))
    return mant == 0.5 and -13 <= exp <= 14


def div_to_mul(p: "Canonicalize", prog: Program, node: fx.Node) -> bool:
    if node.target is not aten.div.Tensor or node.kwargs:
        return False
    x, c = node.args[:2]
    if not _exact_reciprocal(c) or not val(x).dtype.is_floating_point:
        return False
    new = insert_call(p.name, prog.graph_module, node, aten.mul.Tensor, (x, 1.0 / c))
    replace_node(node, new)
    return True


def sub_to_add(p: "Canonicalize", prog: Program, node: fx.Node) -> bool:
    if node.target is not aten.sub.Tensor or node.kwargs.get("alpha", 1) != 1:
        return False
    x, c = node.args[:2]
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not val(x).dtype.is_floating_point:
        return False
    new = insert_call(p.name, prog.graph_module, node, aten.add.Tensor, (x, -c))
    replace_node(node, new)
    return True


# op -> (index of the dim argument, rank taken from the input (0) or the output (1))
_DIM_ARGS = {
    aten._softmax.default: (1, 0), aten._log_softmax.default: (1, 0),
    aten.sum.dim_IntList: (1, 0), aten.mean.dim: (1, 0), aten.amax.default: (1, 0), aten.amin.default: (1, 0),
    aten.var.correction: (1, 0), aten.unsqueeze.default: (1, 1), aten.cat.default: (1, 1),
    aten.permute.default: (1, 0), aten.squeeze.dims: (1, 0), aten.argmax.default: (1, 0),
}


def positive_dims(p: "Canonicalize", prog: Program, node: fx.Node) -> bool:
    spec = _DIM_ARGS.get(node.target)
    if spec is None or len(node.args) <= spec[0] or node.args[spec[0]] is None:
        return False
    idx, from_out = spec
    rank = _rank(node) if from_out else (_rank(node.args[0][0]) if node.target is aten.cat.default else _rank(node.args[0]))
    dims = node.args[idx]
    if rank == 0:
        return False
    if isinstance(dims, int):
        if dims >= 0:
            return False
        new_dims = dims % rank
    else:
        if all(d >= 0 for d in dims):
            return False
        new_dims = [d % rank for d in dims]
    args = list(node.args)
    args[idx] = new_dims
    new = insert_call(p.name, prog.graph_module, node, node.target, tuple(args), dict(node.kwargs))
    replace_node(node, new)
    return True


def drop_proven_asserts(p: "Canonicalize", prog: Program, node: fx.Node) -> bool:
    if node.target is not aten._assert_tensor_metadata.default or not node.args:
        return False
    x = node.args[0]
    xv = val(x)
    if not isinstance(xv, torch.Tensor):
        return False
    names = ("size", "stride", "dtype")
    given = dict(zip(names, node.args[1:]))
    given.update(node.kwargs)
    checks = {
        "size": lambda want: list(want) == list(xv.shape),
        "stride": lambda want: list(want) == list(xv.stride()),
        "dtype": lambda want: want == xv.dtype,
        "device": lambda want: torch.device(want) == xv.device,
        "layout": lambda want: want == xv.layout,
    }
    for key, want in given.items():
        if want is None:
            continue
        if key not in checks or not checks[key](want):
            return False
    prog.graph.erase_node(node)
    return True


RULES: list[Rule] = [
    transpose_to_permute, fold_permutes, fold_views, remove_identity,
    scalar_overloads, scalar_on_right, div_to_mul, sub_to_add, positive_dims, drop_proven_asserts,
]


@register
class Canonicalize(Pass):
    """Rewrite equivalent spellings (transposes, views, casts, scalar forms, dims) into one exact normal form."""

    name = "canonicalize"
    options = ()
    max_rounds = 8

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        for _ in range(self.max_rounds):
            changed = False
            for node in list(program.graph.nodes):
                if node.op != "call_function" or getattr(node, "_erased", False):
                    continue
                for rule in RULES:
                    if rule(self, program, node):
                        report.count(rule.__name__)
                        changed = True
                        break
            if not changed:
                break
        if report.changed:
            for node in reversed(list(program.graph.nodes)):  # inner permutes/views left without users
                if node.op == "call_function" and not node.users and not node.is_impure() and node.target in (
                        aten.permute.default, aten.view.default):
                    program.graph.erase_node(node)
        return report
