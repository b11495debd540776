"""What a decode step over a static KV cache looks like, recognised by the backends' fusions (the ONNX
Runtime backend's ``GroupQueryAttention`` rewrite, the Inductor backend's attention with its cache
writes) and by the decode-attention routing.

The shapes matched: a cache write ``index_put(cache, [arange(B), arange(H), positions], new)`` of one
slot per row into a state input (``match_write``); the visibility mask ``arange(L) <= positions``,
boolean or additive as transformers writes it (``visible_mask``, ``boolean_source``); q, k and v as
head views of rows (``projection_rows``) that are consecutive slices of one fused projection
(``packed_rows``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import Node

from mmcompile.rewrite import is_call, scalar

__all__ = ["SHAPE_OPS", "strip", "is_arange", "positions_of", "CacheWrite", "match_write", "visible_mask",
           "visible_positions", "boolean_source", "projection_rows", "packed_rows"]

aten = torch.ops.aten
SHAPE_OPS = {aten.view.default, aten.unsqueeze.default, aten.reshape.default, aten.squeeze.dim,
             aten.expand.default, aten.clone.default, aten._unsafe_view.default, aten.alias.default}


def _val(n) -> Optional[torch.Tensor]:
    return n.meta.get("val") if isinstance(n, Node) else None


def strip(n, *, casts: bool = False):
    """The node under a chain of views (and, with ``casts``, dtype conversions)."""
    while isinstance(n, Node) and n.op == "call_function":
        if n.target in SHAPE_OPS or (casts and n.target in (aten._to_copy.default, aten.to.dtype)):
            n = n.args[0]
        else:
            break
    return n


def is_arange(n, length: int) -> bool:
    """``n`` is ``arange(length)`` (start 0, step 1) under views."""
    n = strip(n)
    if is_call(n, aten.arange.default):
        return n.args[0] == length
    if is_call(n, aten.arange.start):
        return n.args[0] == 0 and n.args[1] == length
    if is_call(n, aten.arange.start_step):
        return n.args[0] == 0 and n.args[1] == length and (len(n.args) < 3 or n.args[2] == 1)
    return False


def positions_of(n):
    """The integer tensor of positions under views, or None."""
    n = strip(n)
    v = _val(n)
    return n if v is not None and not v.dtype.is_floating_point and v.dtype != torch.bool else None


class CacheWrite:
    """``index_put(cache, [rows, heads, positions], value)`` of one new slot per row into a state input
    (and ``copy``, the ``copy_(cache, index_put)`` that updates the state, where the graph has one)."""

    def __init__(self, cache, value, positions, copy=None):
        self.cache, self.value, self.positions, self.copy = cache, value, positions, copy


def match_write(n, state: set, *, written_back: bool = False) -> Optional[CacheWrite]:
    """The write ``n`` is, when its cache is read by nothing else. With ``written_back`` the graph updates
    its state with ``copy_(cache, n)`` (the Inductor backend's graphs) rather than returning ``n``."""
    if not is_call(n, aten.index_put.default) or (len(n.args) > 3 and n.args[3]):
        return None
    cache, indices, value = n.args[:3]
    cv, vv = _val(cache), _val(value)
    if not (isinstance(cache, Node) and cache.op == "placeholder" and cache.name in state) or cv is None or vv is None:
        return None
    copy = None
    if written_back:
        copies = [u for u in cache.users if is_call(u, aten.copy_.default) and u.args[:2] == (cache, n)]
        if len(copies) != 1 or set(cache.users) != {n, copies[0]}:
            return None
        copy = copies[0]
    elif len(cache.users) != 1:
        return None
    if cv.dim() != 4 or len(indices) != 3 or any(i is None for i in indices):
        return None
    B, H, L, D = cv.shape
    rows, heads, pos = indices
    shapes = [tuple(_val(i).shape) if _val(i) is not None else None for i in indices]
    if shapes != [(B, 1, 1), (1, H, 1), (B, 1, 1)] or tuple(vv.shape) != (B, H, 1, D):
        return None
    positions = positions_of(pos)
    if not (is_arange(rows, B) and is_arange(heads, H)) or positions is None:
        return None
    return CacheWrite(cache, value, positions, copy)


def visible_mask(mask, positions: Node, length: int) -> bool:
    """``mask`` is ``arange(length) <= positions`` per row (bool, or additive from it)."""
    found = visible_positions(mask, length)
    return found is not None and positions_of(found) is positions


def visible_positions(mask, length: int) -> Optional[Node]:
    """The positions side ``p`` (the node as the comparison reads it, under no views) when ``mask`` is
    ``arange(length) <= p`` (bool, negated or not, or additive from it, see ``boolean_source``), with ``p`` integer and
    the keys on the last axis of both; None for any other mask."""
    if not isinstance(mask, Node) or _val(mask) is None:
        return None
    negate = False
    if _val(mask).dtype != torch.bool:
        found = boolean_source(mask)
        if found is None:
            return None
        mask, negate = found
    core = strip(mask)
    while is_call(core, aten.bitwise_not.default, aten.logical_not.default):  # where(~visible, m, 0)
        core, negate = strip(core.args[0]), not negate
    if negate:  # hidden = arange > positions
        pairs = {aten.gt.Tensor: (0, 1), aten.lt.Tensor: (1, 0)}
    else:  # visible = arange <= positions
        pairs = {aten.le.Tensor: (0, 1), aten.ge.Tensor: (1, 0)}
    if not isinstance(core, Node) or core.op != "call_function" or core.target not in pairs:
        return None
    i, j = pairs[core.target]
    keys, p = core.args[i], core.args[j]
    kv, pv = _val(keys), _val(p)
    if not is_arange(keys, length) or positions_of(p) is None or kv is None or pv is None:
        return None
    if kv.dim() < 1 or kv.shape[-1] != length or any(n != 1 for n in kv.shape[:-1]):
        return None  # the keys along the last axis only
    return p if pv.dim() >= 1 and pv.shape[-1] == 1 else None  # positions broadcast along the keys


_LOWEST = float(torch.finfo(torch.float16).min)


def boolean_source(mask: torch.fx.Node):
    """``(cond, negate)``: the boolean an additive mask ``where(visible, 0, m)`` (negate False) or
    ``where(hidden, m, 0)`` (negate True) is made from, with ``m`` at most float16's lowest value
    (-65504; transformers writes its dtype's ``finfo.min``) or -inf: adding ``m`` to a score drives its
    weight to exactly zero in fp32 softmax unless scores differ by thousands, so the boolean mask gives
    the same attention wherever a row sees at least one key. None for any other mask."""
    where = torch.ops.aten.where.self
    if mask.op != "call_function" or mask.target is not where or len(mask.args) != 3:
        return None
    cond, a, b = mask.args
    a, b = scalar(a), scalar(b)
    val = cond.meta.get("val") if isinstance(cond, torch.fx.Node) else None
    if val is None or val.dtype != torch.bool or a is None or b is None:
        return None
    if a == 0.0 and b <= _LOWEST:
        return cond, False
    if b == 0.0 and a <= _LOWEST:
        return cond, True
    return None


def projection_rows(x, B: int, heads: int, D: int):
    """``x`` is ``permute(view(rows, [B, 1, heads, D]), [0, 2, 1, 3])``: returns ``rows`` ([B, heads*D] or
    [B, 1, heads*D]), or None."""
    if not (is_call(x, aten.permute.default) and list(x.args[1]) == [0, 2, 1, 3]):
        return None
    view = x.args[0]
    if not is_call(view, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        return None
    rows, rv = view.args[0], _val(view.args[0])
    if rv is None or tuple(_val(view).shape) != (B, 1, heads, D):
        return None
    return rows if tuple(rv.shape) in ((B, heads * D), (B, 1, heads * D)) else None


def packed_rows(rows, width: int):
    """The one tensor q, k and v rows are consecutive parts of (a fused q/k/v projection), covering all of
    its last dimension in that order — as slices (``fuse_linears``' stacked projection) or as the parts of
    one split (GPT-2's ``c_attn(x).split(n_embd, 2)``); None otherwise."""
    source, start = None, 0
    for r in rows:
        r = r.args[0] if is_call(r, aten.clone.default) else r
        part = _split_part(r)
        if part is not None:
            base, lo, hi = part
        elif is_call(r, aten.slice.Tensor) and len(r.args) >= 4:
            base, dim, lo, hi = r.args[:4]
            bv = _val(base)
            if bv is None or dim not in (-1, bv.dim() - 1):
                return None
        else:
            return None
        if (source is not None and base is not source) or lo != start:
            return None
        source, start = base, min(hi, _val(base).shape[-1])
    return source if start == width == _val(source).shape[-1] else None


def _split_part(r):
    """``(base, start, end)`` along the last dimension when ``r`` is part ``i`` of ``split(base, size, -1)``
    or ``split_with_sizes(base, sizes, -1)``; None otherwise."""
    import operator

    if not (isinstance(r, Node) and r.op == "call_function" and r.target is operator.getitem):
        return None
    split, i = r.args
    if not is_call(split, aten.split.Tensor, aten.split_with_sizes.default):
        return None
    base = split.args[0]
    bv = _val(base)
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if bv is None or dim not in (-1, bv.dim() - 1):
        return None
    n = bv.shape[-1]
    if split.target is aten.split.Tensor:
        size = split.args[1]
        sizes = [min(size, n - lo) for lo in range(0, n, size)]
    else:
        sizes = list(split.args[1])
    if not 0 <= i < len(sizes):
        return None
    lo = sum(sizes[:i])
    return base, lo, lo + sizes[i]
