"""Graph rewrites the ONNX Runtime backend applies before export: rotary embeddings and decode attention
over a static KV cache become the ``mmcompile::`` ops that map onto ONNX Runtime's ``RotaryEmbedding``
and ``GroupQueryAttention`` contrib ops.

Both rewrites prove what they replace and leave anything else alone, with the reason in the report
(``compiled.fusions``):

- **rotary**: ``x * c + cat(-x2, x1) * s`` (the rotate-half form of transformers and our models), where
  ``c`` and ``s`` are rows of position tables: gathered from constant tables (``cos[positions]``; the
  two halves of each row must be equal), or computed as ``cos(cat(f, f)) * a`` with ``f = positions *
  inv_freq`` (transformers' rotary embedding), in which case the table is built here for the positions
  the KV cache holds, the only positions such a program can write.
- **cached attention**: SDPA with one query per row over ``index_put(cache, [rows, heads, positions],
  new)`` for the keys and the values, under the mask ``arange(L) <= positions`` (boolean, or additive as
  ``where(visible, 0, m)`` with ``m`` at most float16's lowest value), where the cache is a state input
  that nothing else reads. Rotary embeddings of the query and the new key at the same positions move
  into the op (``GroupQueryAttention``'s ``do_rotary``).
- **copies**: a ``permute`` that only moves dimensions of size 1 becomes a reshape (no ``Transpose``
  kernel), and slices cutting one tensor into consecutive parts that cover a dimension become one
  ``split`` (one ``Split`` kernel instead of a ``Slice`` per part) — in a decode step, the attention
  output's transpose and the packed gate/up halves of every layer.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from mmcompile.rewrite import is_call, rotations, scalar, sdpa_arguments

from .cache_patterns import match_write, packed_rows, positions_of, projection_rows, strip, visible_mask

aten = torch.ops.aten


def _val(n) -> Optional[torch.Tensor]:
    return n.meta.get("val") if isinstance(n, Node) else None


def _constant(gm: GraphModule, n) -> Optional[torch.Tensor]:
    if isinstance(n, Node) and n.op == "get_attr":
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def _scalar(n) -> Optional[float]:
    return None if isinstance(n, bool) else scalar(n)


# ----------------------------------------------------------------------------------------- rotary


class _Rope:
    """A matched rotary embedding: ``add`` computes rope(x) with position tables ``key`` at ``positions``."""

    def __init__(self, add, x, positions, cos, sin):
        self.add, self.x, self.positions, self.cos, self.sin = add, x, positions, cos, sin


def _table(gm, n):
    """What the per-position factor ``n`` ([B, 1, S, D]) is made from: ``("table", T, positions)`` for
    rows of a constant table, ``("computed", fn, inv_freq, scale, positions)`` for ``fn(cat(f, f)) *
    scale`` with ``f = positions * inv_freq``; None otherwise."""
    core = strip(n, casts=True)
    if is_call(core, aten.index.Tensor) and len(core.args[1]) == 1:
        table, pos = _constant(gm, core.args[0]), positions_of(core.args[1][0])
        if table is not None and table.dim() == 2 and pos is not None:
            return ("table", table, pos)
        return None
    scale = 1.0
    if is_call(core, aten.mul.Tensor) and _scalar(core.args[1]) is not None:
        scale, core = _scalar(core.args[1]), strip(core.args[0], casts=True)
    if not is_call(core, aten.cos.default, aten.sin.default):
        return None
    fn = torch.cos if core.target is aten.cos.default else torch.sin
    cat = core.args[0]
    if not is_call(cat, aten.cat.default) or len(cat.args[0]) != 2 or cat.args[0][0] is not cat.args[0][1]:
        return None
    f = cat.args[0][0]
    if not is_call(f, aten.mul.Tensor):
        return None
    for a, b in (f.args, f.args[::-1]):
        inv, pos = _constant(gm, b), positions_of(strip(a, casts=True))
        if inv is not None and inv.dim() == 1 and pos is not None and _val(strip(a, casts=True)).dim() >= 1:
            return ("computed", fn, inv, scale, pos)
    return None


def _match_rope(gm, add) -> Optional[tuple]:
    """(x, cos-spec, sin-spec) when ``add`` is ``x * c + rotate_half(x) * s``."""
    for x, c, s in rotations(add):
        xv, cv, sv = _val(x), _val(c), _val(s)
        if xv is None or cv is None or sv is None or xv.dim() != 4:
            continue
        B, _, S, D = xv.shape
        if tuple(cv.shape) != (B, 1, S, D) or tuple(sv.shape) != (B, 1, S, D):
            continue
        ct, st = _table(gm, c), _table(gm, s)
        if ct is None or st is None or ct[0] != st[0] or ct[-1] is not st[-1]:
            continue
        if ct[0] == "computed" and (ct[1] is not torch.cos or st[1] is not torch.sin or ct[2] is not st[2]):
            continue
        return x, ct, st
    return None


def _half_tables(spec_c, spec_s, length: Optional[int], dtype) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """[P, D/2] cos and sin tables for the op, or None when they cannot be proven equal to the model's."""
    if spec_c[0] == "table":
        c, s = spec_c[1], spec_s[1]
        h = c.shape[-1] // 2
        if c.shape != s.shape or c.shape[-1] % 2 or not (torch.equal(c[:, :h], c[:, h:]) and torch.equal(s[:, :h], s[:, h:])):
            return None
        return c[:, :h].to(dtype).contiguous(), s[:, :h].to(dtype).contiguous()
    if length is None:
        return None
    inv, scale_c, scale_s = spec_c[2], spec_c[3], spec_s[3]
    f = torch.arange(length, device=inv.device).to(inv.dtype)[:, None] * inv[None, :]
    return (torch.cos(f) * scale_c).to(dtype).contiguous(), (torch.sin(f) * scale_s).to(dtype).contiguous()


# ------------------------------------------------------------------------------- cached attention


def fuse(gm: GraphModule, state: list[str], *, cached_attention: bool = True) -> list[str]:
    """Rewrite ``gm`` in place; returns one line per rewrite and per candidate left alone (why)."""
    graph, notes = gm.graph, []
    state_set = set(state)
    lengths = {}  # positions -> the length of a cache written at them (one slot per row, or a prompt's slots)
    for n in graph.nodes:
        if is_call(n, aten.index_put.default) and len(n.args[1]) == 3 and n.args[0].op == "placeholder" \
                and n.args[0].name in state_set and _val(n.args[0]) is not None and _val(n.args[0]).dim() == 4:
            pos = positions_of(n.args[1][2]) if n.args[1][2] is not None else None
            if pos is not None:
                lengths[pos] = _val(n.args[0]).shape[2]
    ropes, n_tables, made = {}, 0, []
    for add in list(graph.nodes):
        m = _match_rope(gm, add)
        if m is None:
            continue
        x, spec_c, spec_s = m
        pos = spec_c[-1]
        xv = _val(x)
        if _val(add) is None or _val(add).dtype != xv.dtype:
            notes.append(f"rotary: {add.name} left as it is: it computes in {_val(add).dtype if _val(add) is not None else '?'}, "
                         f"not in its input's {xv.dtype}")
            continue
        tables = _half_tables(spec_c, spec_s, lengths.get(pos), xv.dtype)
        if tables is None:
            notes.append(f"rotary: {add.name} left as it is: "
                         + ("its cos/sin tables are not the rotate-half layout (equal halves)" if spec_c[0] == "table"
                            else "its positions are not those of a KV-cache write, so the table length is unknown"))
            continue
        key = (spec_c[0], tuple(tables[0].shape), tables[0].dtype) + (
            (id(spec_c[1]), id(spec_s[1])) if spec_c[0] == "table" else (id(spec_c[2]), spec_c[3], spec_s[3]))
        if key not in ropes:  # one pair of tables per distinct source
            names = []
            for t in tables:
                name = f"_ort_rotary_table_{n_tables}"
                n_tables += 1
                gm.register_buffer(name, t)
                names.append(name)
            ropes[key] = names
        with graph.inserting_before(add):
            cos, sin = (graph.get_attr(name) for name in ropes[key])
            for node, t in ((cos, tables[0]), (sin, tables[1])):
                node.meta["val"] = t
            B, _, S, _ = xv.shape
            p2 = graph.call_function(aten.view.default, (pos, [B, S]))
            p2.meta["val"] = _val(pos).reshape(B, S)
            new = graph.call_function(torch.ops.mmcompile.rotary_embedding.default, (x, cos, sin, p2))
        new.meta = dict(add.meta)
        add.replace_all_uses_with(new)
        made.append((new, f"rotary: {add.name} -> RotaryEmbedding ({tables[0].shape[0]} positions)"))
    graph.eliminate_dead_code()
    if cached_attention:
        notes += _fuse_cached_attention(gm, state_set)
    alive = set(graph.nodes)  # rotary embeddings that moved into GroupQueryAttention are said there
    notes += [note for node, note in made if node in alive]
    notes += _fewer_copies(gm)
    graph.lint()
    gm.recompile()
    return notes


def _fewer_copies(gm: GraphModule) -> list[str]:
    """Copies ONNX Runtime would make as kernels of their own, replaced by what costs none or fewer:

    - a ``permute`` that only moves dimensions of size 1 keeps every element where it was: a reshape
      (a decode step's attention output, ``[B, H, 1, D] -> [B, 1, H, D]``, is one per layer);
    - slices that cut one tensor along one dimension into consecutive parts covering all of it (the
      packed gate/up product): one ``split``, one kernel instead of one per part."""
    graph, notes, reshaped = gm.graph, [], 0
    for n in list(graph.nodes):
        if not is_call(n, aten.permute.default) or _val(n) is None or _val(n.args[0]) is None:
            continue
        shape, perm = list(_val(n.args[0]).shape), [d % len(_val(n.args[0]).shape) for d in n.args[1]]
        if [d for d in perm if shape[d] != 1] != [d for d in range(len(shape)) if shape[d] != 1]:
            continue
        with graph.inserting_before(n):
            new = graph.call_function(aten.reshape.default, (n.args[0], list(_val(n).shape)))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)
        reshaped += 1
    if reshaped:
        notes.append(f"copies: {reshaped} transpose(s) of size-1 dimensions -> reshape")
    split = 0
    by_source: dict = {}
    for n in graph.nodes:
        if is_call(n, aten.slice.Tensor) and _val(n) is not None and _val(n.args[0]) is not None:
            dim = n.args[1] if len(n.args) > 1 else 0
            step = n.args[4] if len(n.args) > 4 else 1
            if step == 1:
                by_source.setdefault((n.args[0], dim % _val(n.args[0]).dim()), []).append(n)
    for (x, dim), slices in by_source.items():
        size = _val(x).shape[dim]
        parts = []
        for sl in slices:
            start = sl.args[2] if len(sl.args) > 2 and sl.args[2] is not None else 0
            end = sl.args[3] if len(sl.args) > 3 and sl.args[3] is not None else size
            if not (isinstance(start, int) and isinstance(end, int)):
                break
            parts.append((max(0, start + size if start < 0 else start), min(size, end + size if end < 0 else end), sl))
        else:
            parts.sort(key=lambda p: p[0])
            if len(parts) < 2 or parts[0][0] != 0 or parts[-1][1] != size or \
                    any(a[1] != b[0] for a, b in zip(parts, parts[1:])) or any(a >= b for a, b, _ in parts):
                continue
            members = {p[2] for p in parts}
            first = next(n for n in graph.nodes if n in members)  # the split goes before the earliest slice
            with graph.inserting_before(first):
                whole = graph.call_function(aten.split_with_sizes.default, (x, [b - a for a, b, _ in parts], dim))
                whole.meta["val"] = [_val(p[2]) for p in parts]
                for i, (_, _, sl) in enumerate(parts):
                    item = graph.call_function(operator.getitem, (whole, i))
                    item.meta = dict(sl.meta)
                    sl.replace_all_uses_with(item)
            for _, _, sl in parts:
                graph.erase_node(sl)
            split += 1
    if split:
        notes.append(f"copies: {split} set(s) of slices covering a dimension -> one split")
    return notes


def _fuse_cached_attention(gm: GraphModule, state: set) -> list[str]:
    graph, notes = gm.graph, []
    sdpa = aten.scaled_dot_product_attention.default
    rope = torch.ops.mmcompile.rotary_embedding.default
    for node in [n for n in graph.nodes if is_call(n, sdpa)]:
        a = sdpa_arguments(node)
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        kw, vw = match_write(k, state), match_write(v, state)
        qv = _val(q)
        if kw is None or vw is None:
            continue  # not attention over a static cache (prefill, encoders): nothing to say
        why = None
        if a.get("dropout_p", 0.0) or a.get("is_causal", False):
            why = "dropout or is_causal"
        elif qv is None or qv.dim() != 4 or qv.shape[2] != 1:
            why = "more than one query per row"
        elif kw.positions is not vw.positions or any(ik is not iv for ik, iv in zip(k.args[1], v.args[1])):
            why = "keys and values are written at different indices"
        elif set(k.users) != {node, graph.output_node()} or set(v.users) != {node, graph.output_node()}:
            why = "the updated cache has other readers"
        elif qv.shape[1] % _val(kw.cache).shape[1] or (qv.shape[1] != _val(kw.cache).shape[1]
                                                      and not a.get("enable_gqa", False)):
            why = "query heads are not a multiple of key heads"
        elif not visible_mask(mask, kw.positions, _val(kw.cache).shape[2]):
            why = "the mask is not arange(cache length) <= position"
        if why:
            notes.append(f"cached attention: {node.name} left as SDPA: {why}")
            continue
        B, L = qv.shape[0], _val(kw.cache).shape[2]
        scale = a.get("scale")
        scale = qv.shape[-1] ** -0.5 if scale is None else float(scale)
        qx, kx, cos, sin = q, kw.value, None, None
        if (is_call(q, rope) and is_call(kx, rope) and q.args[1].target == kx.args[1].target
                and q.args[2].target == kx.args[2].target
                and positions_of(q.args[3]) is kw.positions and positions_of(kx.args[3]) is kw.positions
                and _val(q.args[1]).shape[0] >= L):
            qx, kx, cos, sin = q.args[0], kx.args[0], q.args[1], q.args[2]
        Hq, (Hkv, D) = qv.shape[1], _val(kw.cache).shape[1::2]
        vx, heads, layout = vw.value, 0, ""
        rows = [projection_rows(x, B, h, D) for x, h in ((qx, Hq), (kx, Hkv), (vx, Hkv))]
        if all(r is not None for r in rows):  # the projections' rows, without the copies of their transposes
            (qx, kx, vx), heads, layout = rows, Hq, ", rows"
            packed = packed_rows(rows, (Hq + 2 * Hkv) * D)
            if packed is not None:
                qx, kx, vx, layout = packed, None, None, ", packed q/k/v"
        with graph.inserting_before(node):
            pos = graph.call_function(aten.view.default, (kw.positions, [B]))
            pos.meta["val"] = _val(kw.positions).reshape(B)
            new = graph.call_function(torch.ops.mmcompile.cached_attention.default,
                                      (qx, kx, vx, kw.cache, vw.cache, pos, scale, cos, sin, heads))
            outs = []
            for i, like in enumerate((qv, _val(kw.cache), _val(vw.cache))):
                g = graph.call_function(operator.getitem, (new, i))
                g.meta["val"] = torch.empty_like(like)
                outs.append(g)
        new.meta["val"] = tuple(o.meta["val"] for o in outs)
        node.replace_all_uses_with(outs[0])
        k.replace_all_uses_with(outs[1])
        v.replace_all_uses_with(outs[2])
        for n in (node, k, v):
            graph.erase_node(n)
        notes.append(f"cached attention: {node.name} -> GroupQueryAttention"
                     + (" with rotary" if cos is not None else "") + layout)
    graph.eliminate_dead_code()
    return notes


