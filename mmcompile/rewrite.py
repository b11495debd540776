"""Small graph-rewriting helpers shared by passes: make a node with its meta, replace a node.

Passes use these instead of touching ``torch.fx`` directly so every new node carries
``meta["val"]`` (computed in the Program's fake mode) and ``meta["mmcompile.pass"]``.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from mmcompile.program import _fake_mode_of, _no_new_guards

__all__ = ["fake_value", "insert_call", "replace_node", "val", "is_call", "scalar", "linear_parts",
           "ConstantEvaluator", "depends_on_input", "rotate_halves", "rotations", "SDPA_ARGUMENTS",
           "sdpa_arguments"]


def val(node: Any) -> Any:
    """``meta["val"]`` of a node, or the value itself for literals."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def is_call(node: Any, *targets) -> bool:
    """True when ``node`` is a ``call_function`` node of one of ``targets``."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of a ``scaled_dot_product_attention`` call by name, positional or keyword (those not
    given are absent: ``.get("attn_mask")`` is None for no mask)."""
    return {**dict(zip(SDPA_ARGUMENTS, node.args)), **node.kwargs}


def scalar(node: Any) -> float | None:
    """The number a Python scalar argument or a 0-d ``full`` / ``scalar_tensor`` node (as export writes
    scalars) holds, else None."""
    if isinstance(node, (int, float)):
        return float(node)
    if is_call(node, torch.ops.aten.full.default) and not node.args[0]:
        return float(node.args[1])
    if is_call(node, torch.ops.aten.scalar_tensor.default):
        return float(node.args[0])
    return None


def rotate_halves(x: Any, node: Any) -> tuple[fx.Node, fx.Node] | None:
    """``node`` is ``cat([-x2, x1], -1)`` for the two halves of ``x``'s last dimension: returns (x1, x2)."""
    aten = torch.ops.aten
    xv = x.meta.get("val") if isinstance(x, fx.Node) else None
    if xv is None or not is_call(node, aten.cat.default) or len(node.args[0]) != 2:
        return None
    dim = node.args[1] if len(node.args) > 1 else 0
    if dim not in (-1, xv.dim() - 1):
        return None
    neg, lo = node.args[0]
    if not is_call(neg, aten.neg.default):
        return None
    hi, half = neg.args[0], xv.shape[-1] // 2

    def part(n, index):
        if is_call(n, aten.slice.Tensor) and n.args[0] is x and n.args[1] in (-1, xv.dim() - 1):
            start = n.args[2] if len(n.args) > 2 else 0
            end = n.args[3] if len(n.args) > 3 else xv.shape[-1]
            return (start, min(end, xv.shape[-1])) == ((0, half) if index == 0 else (half, xv.shape[-1]))
        if is_call(n, operator.getitem) and n.args[1] == index:
            split = n.args[0]
            if is_call(split, aten.split_with_sizes.default) and split.args[0] is x:
                return list(split.args[1]) == [half, half] and split.args[2] in (-1, xv.dim() - 1)
            if is_call(split, aten.split.Tensor) and split.args[0] is x:
                return split.args[1] == half and (len(split.args) < 3 or split.args[2] in (-1, xv.dim() - 1))
        return False

    return (lo, hi) if xv.shape[-1] % 2 == 0 and part(lo, 0) and part(hi, 1) else None


def rotations(add: Any):
    """Every way ``add`` reads as ``x * c + rotate_half(x) * s`` (the rotary embedding of transformers and
    our models), as (x, c, s) nodes; the caller checks what it needs of the factors."""
    aten = torch.ops.aten
    if not is_call(add, aten.add.Tensor) or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return
    for m1, m2 in (add.args, add.args[::-1]):
        if not (is_call(m1, aten.mul.Tensor) and is_call(m2, aten.mul.Tensor)):
            continue
        for x, c in (m1.args, m1.args[::-1]):
            for r, s in (m2.args, m2.args[::-1]):
                if all(isinstance(n, fx.Node) for n in (x, c, s)) and rotate_halves(x, r) is not None:
                    yield x, c, s


def linear_parts(node: fx.Node):
    """``(x, weight get_attr node, bias or None)`` of an ``nn.Linear`` after capture —
    ``mm(x, permute(W, [1, 0]))`` or ``addmm(bias, x, permute(W, [1, 0]))`` with ``W`` a 2-D float
    constant — else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.kwargs:
        return None
    if node.target is torch.ops.aten.mm.default:
        bias, (x, wt) = None, node.args[:2]
    elif node.target is torch.ops.aten.addmm.default and len(node.args) == 3:
        bias, x, wt = node.args
    else:
        return None
    if not (is_call(wt, torch.ops.aten.permute.default) and list(wt.args[1]) == [1, 0]):
        return None
    w = wt.args[0]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and val(w).dim() == 2 and val(w).is_floating_point()):
        return None
    return x, w, bias


def fake_value(gm: fx.GraphModule, target, args: tuple, kwargs: dict) -> Any:
    """Run ``target`` on the fake values of its inputs to get the new node's ``meta["val"]``."""
    mode = _fake_mode_of(gm)
    fargs, fkwargs = pytree.tree_map_only(fx.Node, lambda n: n.meta["val"], (args, kwargs))
    with mode, _no_new_guards(mode):
        return target(*fargs, **fkwargs)


def insert_call(pass_name: str, gm: fx.GraphModule, before: fx.Node, target, args: tuple, kwargs: dict | None = None,
                origin: fx.Node | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``before``, with its fake value and the pass tag."""
    kwargs = dict(kwargs or {})
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, tuple(args), kwargs)
    node.meta["val"] = fake_value(gm, target, tuple(args), kwargs)
    node.meta["mmcompile.pass"] = pass_name
    src = origin if origin is not None else before
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in src.meta:
            node.meta[key] = src.meta[key]
    return node


def replace_node(old: fx.Node, new: Any) -> None:
    """Point every user of ``old`` at ``new`` (a node) and erase ``old``."""
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def ancestors(node: fx.Node) -> set[fx.Node]:
    """``node`` and every node it reads, directly or through any chain of ops."""
    seen, stack = {node}, [node]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return seen


def depends_on_input(node: Any) -> bool:
    """True when ``node`` reads a graph input (directly or through any chain of ops)."""
    if not isinstance(node, fx.Node):
        return False
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        for i in n.all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return False


class ConstantEvaluator:
    """Evaluates input-independent nodes (constants, factories and ops on them) with real tensors,
    memoizing results. Call it on a node; it raises ValueError if the node reads a graph input or a
    random op."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.values: dict[fx.Node, Any] = {}

    def __call__(self, node: fx.Node):
        if node in self.values:
            return self.values[node]
        if node.op == "get_attr":
            from mmcompile.program import _getattr

            out = _getattr(self.gm, node.target)
        elif node.op == "call_function":
            t = node.target
            if isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags:
                raise ValueError(f"%{node.name} is random")
            args, kwargs = pytree.tree_map_only(fx.Node, self, (node.args, node.kwargs))
            with torch.no_grad():
                out = t(*args, **kwargs)
        else:
            raise ValueError(f"%{node.name} reads a graph input")
        self.values[node] = out
        return out

    def scalar(self, value: Any) -> float | None:
        """A Python number for a number or an input-independent one-element node; None otherwise."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, fx.Node):
            v = value.meta.get("val")
            if isinstance(v, torch.Tensor) and v.numel() == 1 and all(isinstance(d, int) for d in v.shape) \
                    and not depends_on_input(value):
                try:
                    return float(self(value).item())
                except ValueError:
                    return None
        return None
