"""rewrite_kv_cache: turn a growing KV cache into static buffers updated in place.

Matches, in a captured prefill or decode step:

- a **growing cache**: a 4-D input ``past`` ``[B, H, T, D]`` whose only use is ``aten.cat([past, new], 2)``,
  with ``T`` symbolic (captured with ``Dim.AUTO`` on it), the cat feeding attention (``aten.
  scaled_dot_product_attention`` as k or v) and the graph's outputs — transformers' ``DynamicCache``
  and legacy ``(k, v)`` tuples both appear this way;
- a **created cache** (prefill): ``aten.cat([empty, new], 2)`` returned as an output, where ``empty`` has
  no elements;
- **buffers already** (models written for static caches, like ``models/llama``): state inputs updated by
  ``copy_``; the pass records their layout and changes nothing.

Produces a step with the calling convention of the generation protocol,
``step(input_ids [B, S], position_ids [B, S], cache) -> logits``, where ``cache`` is a list of per-layer
``(k, v)`` buffers of ``max_seq_len`` slots that the graph writes in place at ``position_ids``
(``index_put`` + ``copy_``, the ops ``Program.state_inputs`` recognises). In a decode step attention reads
the whole buffer under the position mask ``slot <= position_ids[b]``, so every step has the same shapes
and ``capture_decode_loop`` can prove it capturable; in a prefill step attention keeps reading the new
keys and values. The cache outputs are dropped; the step returns the logits only.

Safety: the rewrite is all-or-nothing on a copy of the graph. It declines, with a note, when the past
length is static (nothing could prove that only the mask and the cat read it), when a cat feeds anything
but attention and the outputs, when the attention mask reads an input (padding is expressed by positions
after the rewrite) or is not all-visible over the past at sampled lengths from 1 to ``max_seq_len - 1``
(a sliding window, say), or when anything else still reads the past length or another input.

Layout (option ``layout``): ``"bhsd"`` (default, ``"auto"``) stores ``[B, H, L, D]``, the layout SDPA's
flash, efficient and cuDNN kernels read with each head's keys contiguous; ``"bshd"`` stores
``[B, L, H, D]`` and attention reads a permuted view. One buffer per layer and per k/v: a stacked tensor
would save nothing for per-layer kernels. The choice is recorded in ``program.metadata["kv_cache"]``.

Beam search (option ``beam_rows=True``, on a rewritten step or on one whose cache is already static):
an input ``cache_rows`` [B, L] is added and attention reads slot j of row b from buffer row
``cache_rows[b, j]`` (one gather per buffer). When beams change parents, the runtime swaps rows of
that small table instead of copying caches with ``index_select`` every step; each row still writes its
new token into its own buffer row, and a buffer slot, once written, is never overwritten while a beam
can read it.

Options: ``max_seq_len`` (required to rewrite), ``layout``, ``beam_rows``, ``tokens``/``positions`` (input
names, default ``input_ids``/``position_ids``). Requires: fuse_attention (the cat must feed SDPA directly).
Backends: all; the Generator allocates the buffers from ``metadata["kv_cache"]``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program, _fake_mode_of
from mmcompile.rewrite import ancestors, depends_on_input, insert_call, is_call, val

from . import register

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
LAYOUTS = {"bhsd": "[B, H, L, D]: SDPA kernels read each head's keys contiguously",
           "bshd": "[B, L, H, D]: one token's heads contiguous; attention reads a permuted view"}


class Decline(Exception):
    """The rewrite cannot be proven safe; the message says why."""


def _cat_parts(node: fx.Node):
    """(first, second) of a 2-operand ``aten.cat(..., 2)`` on 4-D tensors, else None."""
    if node.op != "call_function" or node.target is not aten.cat.default:
        return None
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    v = val(node)
    if len(tensors) != 2 or not isinstance(v, torch.Tensor) or v.dim() != 4 or dim % 4 != 2:
        return None
    return tensors[0], tensors[1]


def _static(n) -> bool:
    return isinstance(n, int)


class _Cache:
    """One cache tensor (k or v of a layer) as found in the graph. ``cross``: a cross-attention cache of an
    encoder-decoder model, computed from the encoder's output rather than from the decoder's tokens."""

    def __init__(self, cat: fx.Node, past: fx.Node, new: fx.Node, growing: bool, cross: bool = False):
        self.cat, self.past, self.new, self.growing, self.cross = cat, past, new, growing, cross


def _find_caches(program: Program) -> tuple[list[_Cache], list[str]]:
    outputs = set(program.graph.output_node().args[0])
    caches, problems = [], []
    for node in program.graph.nodes:
        parts = _cat_parts(node)
        if parts is None or not all(isinstance(p, fx.Node) for p in parts):
            continue
        past, new = parts
        pv = val(past)
        if past.op == "placeholder" and isinstance(pv, torch.Tensor):
            if _static(pv.shape[2]):
                problems.append(
                    f"%{node.name} appends to input %{past.name} whose past length {pv.shape[2]} is static: capture "
                    "the step with a dynamic past length (Dim.AUTO on the cache's dimension 2) so the rewrite can "
                    "prove nothing but the mask and this cat reads it")
                continue
            caches.append(_Cache(node, past, new, growing=True))
        elif node in outputs and isinstance(pv, torch.Tensor) and _static(pv.numel()) and pv.numel() == 0:
            caches.append(_Cache(node, past, new, growing=False))
    return caches, problems


def _pair_by_attention(caches: list[_Cache]) -> list[tuple[_Cache, _Cache, list[fx.Node]]]:
    """(k, v, attention nodes) per layer, in graph order of the first attention reading them."""
    by_cat = {c.cat: c for c in caches}
    pairs: dict[tuple[fx.Node, fx.Node], list[fx.Node]] = {}
    for c in caches:
        for user in c.cat.users:
            if user.op == "output":
                continue
            if user.target is SDPA and user.args[1] in by_cat and user.args[2] in by_cat:
                pairs.setdefault((user.args[1], user.args[2]), []).append(user)
            elif c.growing:
                raise Decline(f"cache %{c.cat.name} feeds {user.target} (%{user.name}), not attention: run "
                              "fuse_attention first, or the model attends in a form the rewrite does not know")
    paired = {cat for kv in pairs for cat in kv}
    lone = [c.cat.name for c in caches if c.cat not in paired]
    if lone:
        raise Decline(f"cache tensor(s) {', '.join('%' + n for n in lone)} do not feed one attention op as "
                      "its keys or values: run fuse_attention first")
    order = sorted(pairs.items(), key=lambda kv: min(_index(n) for n in kv[1]))
    return [(by_cat[k], by_cat[v], nodes) for (k, v), nodes in order]


def _index(node: fx.Node) -> int:
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)


def _check_mask_all_visible(gm: fx.GraphModule, mask: fx.Node, pasts: set[fx.Node], max_seq_len: int) -> None:
    """The old decode mask must read nothing but the past's length, and let the query see every past slot
    (plus itself) at each sampled past length: then ``slot <= position`` over the buffer is the same mask."""
    reads = ancestors(mask)
    nodes = [n for n in gm.graph.nodes if n in reads]  # in graph order, to copy them into a graph of their own
    inputs = [n for n in nodes if n.op == "placeholder"]
    bad = [n.name for n in inputs if n not in pasts]
    if bad:
        raise Decline(f"the attention mask %{mask.name} reads input(s) {', '.join('%' + b for b in bad)}: after the "
                      "rewrite padding is expressed by each row's position; capture the step without them")
    for n in nodes:
        if n.op == "call_function" and any(u.op == "placeholder" for u in n.all_input_nodes) \
                and n.target is not aten.sym_size.int:
            raise Decline(f"the attention mask reads the values of the past cache (%{n.name}), not only its length")
    graph, env = fx.Graph(), {}
    for n in nodes:
        env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[mask])
    sub = fx.GraphModule(gm, graph)
    lengths = sorted(set(range(1, min(max_seq_len, 65))) | {max_seq_len - 1, max_seq_len // 2, max_seq_len // 4})
    for t in lengths:
        args = []
        for p in inputs:
            v = val(p)
            shape = [t if i == 2 else d for i, d in enumerate(v.shape)]
            args.append(torch.zeros((), dtype=v.dtype, device=v.device).expand(shape))
        with torch.no_grad():
            m = sub(*args)
        m = m[0] if isinstance(m, (tuple, list)) else m
        visible = m if m.dtype == torch.bool else m == 0
        if m.dtype != torch.bool and bool((torch.isfinite(m) & (m != 0)).any()):
            raise Decline(f"the attention mask %{mask.name} adds a bias to the scores that depends on the past length "
                          "(a relative position bias, as T5's): the rewrite only turns a 0/-inf causal mask into "
                          "slot <= position")
        if m.shape[-1] not in (1, t + 1) or not bool(visible.all()):
            raise Decline(f"the attention mask %{mask.name} hides some of the {t + 1} cached positions at past length "
                          f"{t} (a sliding window or a custom mask): only a causal decode mask can become slot <= position")


@register
class RewriteKVCache(Pass):
    """Rewrite a growing KV cache (cat of past and new) into static buffers written in place at the position."""

    name = "rewrite_kv_cache"
    options = ("max_seq_len", "layout", "beam_rows", "inputs", "positions", "tokens", "max_source_len")
    requires = ("fuse_attention",)

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        layout = options.get("layout", "auto")
        layout = "bhsd" if layout == "auto" else layout
        if layout not in LAYOUTS:
            raise ValueError(f"rewrite_kv_cache: layout must be 'auto', 'bhsd' or 'bshd', got {layout!r}")
        caches, problems = _find_caches(program)
        if not caches and options.get("beam_rows"):
            return _beam_rows(program, report)
        if not caches:
            state = program.state_inputs()
            if state and "kv_cache" not in program.metadata:
                shapes = [list(val(n).shape) for n in state]
                layout = _layout_of_state(program, state)
                program.metadata["kv_cache"] = {
                    "source": "static buffers updated in place", "layout": layout,
                    "max_seq_len": shapes[0][2 if layout == "bhsd" else 1] if layout != "unknown" else None,
                    "phase": None, "dtype": str(val(state[0]).dtype),
                    "buffers": [shapes[i:i + 2] for i in range(0, len(shapes), 2)]}
                report.note(f"the cache is already {len(state)} static buffer(s) updated in place; nothing to rewrite")
            for p in problems:
                report.note(f"not rewritten: {p}")
            if not state and not problems:
                report.note("no KV cache found: no input appended to by a cat on dimension 2, no cache output")
            return report
        max_seq_len = options.get("max_seq_len")
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            report.note("not rewritten: rewrite_kv_cache needs the buffer length, "
                        "optimize(..., rewrite_kv_cache={'max_seq_len': N}) with N >= 2")
            return report
        if problems:
            for p in problems:
                report.note(f"not rewritten: {p}")
            return report
        tokens, positions = options.get("tokens", "input_ids"), options.get("positions", "position_ids")
        if not _on_copy(program, report, lambda w: _rewrite(w, layout, max_seq_len, tokens, positions, options), "not rewritten"):
            return report
        if options.get("beam_rows"):
            _beam_rows(program, report)
        n = 2 * len(program.metadata["kv_cache"]["buffers"])
        report.note(f"{n} cache buffers of {max_seq_len} slots, layout {layout} ({LAYOUTS[layout]})")
        return report


def _on_copy(program: Program, report: PassReport, rewrite, refusal: str) -> bool:
    """All or nothing: ``rewrite`` a copy of the Program and adopt it, or, when it declines, note why and
    leave the Program as it was."""
    work = program.clone()
    try:
        stats = rewrite(work)
    except Decline as e:
        report.note(f"{refusal}: {e}")
        return False
    program.graph_module = work.graph_module
    program.in_spec, program.out_spec = work.in_spec, work.out_spec
    program.example_inputs = work.example_inputs
    program.metadata = work.metadata
    program._initial_aliases = program._output_aliases()
    report.changed = True
    report.stats.update(stats)
    return True


def _beam_rows(program: Program, report: PassReport) -> PassReport:
    """Beam search by index indirection: add an input ``cache_rows`` [B, L] and let attention read slot j of
    row b from buffer row ``cache_rows[b, j]``. Beams that change parents then swap a [B, L] table of row
    indices instead of copying their caches; each row still writes its new token into its own buffer row."""
    if not any(n.name == "cache_rows" for n in program.placeholders()):
        _on_copy(program, report, _add_rows, "no beam indirection")
    return report


def _add_rows(work: Program) -> dict:
    gm, graph = work.graph_module, work.graph
    state = work.state_inputs()
    if not state:
        raise Decline("the step has no static cache buffers (run the rewrite first)")
    args, kwargs = pytree.tree_unflatten(list(range(len(work.placeholders()))), work.in_spec)
    n_positional = len(pytree.tree_leaves(args))
    # cross-attention caches are the inputs the step reads and never writes (the rewrite's cross_cache_*
    # buffers, or a static-cache model's own); every beam of a prompt holds the same rows of them
    cross = {n for n in work.placeholders() if n not in state}
    reads: list[tuple[fx.Node, int, fx.Node, bool]] = []  # (attention, arg index, written buffer, permuted)
    for node in graph.nodes:
        if node.target is not SDPA or (node.args[1] in cross and node.args[2] in cross):
            continue  # beams of one prompt share its cross-attention cache: nothing to reorder
        for i in (1, 2):
            x = node.args[i]
            found = _buffer_read(x, state)
            if found is None or found[0] in state:
                raise Decline(f"%{node.name} reads %{x.name}, not a cache buffer written in place")
            reads.append((node, i, *found))
    if not reads:
        raise Decline("no attention reads the cache buffers")
    first = val(reads[0][2])
    B = first.shape[0]
    L = first.shape[1] if reads[0][3] else first.shape[2]
    last_input = work.placeholders()[n_positional - 1]  # the table is the last positional input
    with graph.inserting_after(last_input):
        rows = graph.placeholder("cache_rows")
    mode = _fake_mode_of(gm)
    with mode:
        rows.meta["val"] = torch.empty(B, L, dtype=torch.int64, device=first.device)
    anchor = work.placeholders()[-1].next  # constants may precede the inputs: build the indices after all of them
    call = lambda target, *a, before=anchor, **kw: insert_call(RewriteKVCache.name, gm, before, target, a, kw)  # noqa: E731
    slots = call(aten.arange.start_step, 0, L, 1, dtype=torch.int64, device=first.device)
    index: dict[tuple, list[fx.Node]] = {}
    gathered: dict[fx.Node, fx.Node] = {}
    for attn, i, w, permuted in reads:
        v = val(w)
        H = v.shape[2] if permuted else v.shape[1]
        key = (H, permuted)
        if key not in index:
            heads = call(aten.arange.start_step, 0, H, 1, dtype=torch.int64, device=first.device)
            if permuted:  # buffer [B, L, H, D]
                index[key] = [call(aten.view.default, rows, [B, L, 1]), call(aten.view.default, slots, [1, L, 1]),
                              call(aten.view.default, heads, [1, 1, H])]
            else:  # buffer [B, H, L, D]
                index[key] = [call(aten.view.default, rows, [B, 1, L]), call(aten.view.default, heads, [1, H, 1]),
                              call(aten.view.default, slots, [1, 1, L])]
        if w not in gathered:
            g = call(aten.index.Tensor, w, index[key], before=attn)
            gathered[w] = call(aten.permute.default, g, [0, 2, 1, 3], before=attn) if permuted else g
        attn.update_arg(i, gathered[w])
    for node in reversed(list(graph.nodes)):  # the old permuted views, if now unused
        if node.op == "call_function" and not node.users and node.target is aten.permute.default:
            graph.erase_node(node)
    examples = list(work.example_inputs)
    examples.insert(n_positional, torch.arange(B, device=first.device)[:, None].expand(B, L))
    work.example_inputs = examples
    work.in_spec = pytree.tree_structure(((*args, 0), kwargs))
    gm.recompile()
    work.recompute_meta()
    kv = dict(work.metadata.get("kv_cache", {}))
    kv["beam_rows"] = "cache_rows [B, L]: attention reads slot j of row b from buffer row cache_rows[b, j]"
    work.metadata["kv_cache"] = kv
    return {"beam_rows": len(gathered)}


def _buffer_read(x, state) -> tuple[fx.Node, bool] | None:
    """(buffer value, permuted) when an attention input ``x`` is a state buffer — as it is, or as written
    in place by ``index_put`` — read directly ([B, H, L, D]) or through a permute ([B, L, H, D]); else None."""
    permuted = is_call(x, aten.permute.default) and list(x.args[1]) == [0, 2, 1, 3]
    src = x.args[0] if permuted else x
    if src in state or (is_call(src, aten.index_put.default) and src.args[0] in state):
        return src, permuted
    return None


def _layout_of_state(program: Program, state: list[fx.Node]) -> str:
    """How attention reads the buffers: directly ([B, H, L, D]) or through a permute ([B, L, H, D])."""
    for node in program.graph.nodes:
        found = _buffer_read(node.args[1], state) if node.target is SDPA else None
        if found is not None:
            return "bshd" if found[1] else "bhsd"
    return "unknown"


def _cross_reads(work: Program, pasts: set[fx.Node]) -> list[tuple[fx.Node, fx.Node, list[fx.Node]]]:
    """The kept cross-attention caches of a decode step: (k, v, attention nodes) for each pair of inputs of
    static shape that attention reads as its keys and values, and that nothing else reads but the outputs
    (which return them unchanged: transformers' ``EncoderDecoderCache`` after its first step)."""
    pairs: dict[tuple[fx.Node, fx.Node], list[fx.Node]] = {}
    for node in work.graph.nodes:
        if node.target is SDPA and all(isinstance(x, fx.Node) and x.op == "placeholder" and x not in pasts
                                       for x in node.args[1:3]):
            pairs.setdefault((node.args[1], node.args[2]), []).append(node)
    for (k, v), _ in pairs.items():
        for i, x in ((1, k), (2, v)):
            xv = val(x)
            if not isinstance(xv, torch.Tensor) or xv.dim() != 4 or not all(_static(d) for d in xv.shape):
                raise Decline(f"attention reads input %{x.name} as its keys or values, but it is not a static 4-D "
                              "tensor: a cross-attention cache must have the shape of the encoder's output")
            other = [u for u in x.users if u.op != "output" and not (u.target is SDPA and u.args[i] is x
                                                                    and x not in (u.args[0], *u.args[3:]))]
            if other:
                raise Decline(f"cross-attention input %{x.name} is also read by %{other[0].name}: only attention may "
                              "read a kept cross-attention cache")
    return [(k, v, attn) for (k, v), attn in pairs.items()]


def _rewrite(work: Program, layout: str, L: int, tokens_name: str, positions_name: str, options: dict) -> dict:
    gm, graph = work.graph_module, work.graph
    old_examples = dict(zip([n.name for n in work.placeholders()], work.example_inputs))
    by_name = {n.name: n for n in work.placeholders()}
    tokens, positions = by_name.get(tokens_name), by_name.get(positions_name)
    if tokens is None:
        raise Decline(f"the step has no input named {tokens_name!r}: capture it with {tokens_name}= and "
                      f"{positions_name}= (the positions say which cache slot each new token is written to)")
    caches, _ = _find_caches(work)
    for c in caches:  # a created cache the decoder's tokens do not reach is computed from the encoder's output
        c.cross = not c.growing and tokens not in ancestors(c.new)
    layers = _pair_by_attention([c for c in caches if not c.cross])
    created_cross = _pair_by_attention([c for c in caches if c.cross]) if any(c.cross for c in caches) else []
    growing = [c for k, v, _ in layers for c in (k, v) if c.growing]
    pasts = {c.past for c in growing}
    kept_cross = _cross_reads(work, pasts) if growing else []
    mode = _fake_mode_of(gm)
    tv = val(tokens)
    positions_added = False
    if positions is None:
        if tv.dim() != 2 or not all(_static(d) for d in tv.shape):
            raise Decline(f"the step has no input named {positions_name!r} and its tokens are not a static [B, S] "
                          f"tensor: capture it with {tokens_name}= and {positions_name}=")
        # The slots the new tokens go to become an input: 0..S-1 for a step that creates its cache; the past
        # length for a decode step, one number for the whole batch (so its rows share their position).
        with graph.inserting_after(tokens):
            positions = graph.placeholder(positions_name)
        with mode:
            positions.meta["val"] = torch.empty(tuple(tv.shape), dtype=torch.int64, device=tv.device)
        old_examples[positions_name] = torch.arange(tv.shape[1], device=tv.device).expand(*tv.shape).contiguous()
        positions_added = True
    pv = val(positions)
    if pv.dim() != 2 or not all(_static(d) for d in pv.shape) or pv.dtype not in (torch.int64, torch.int32):
        raise Decline(f"{positions_name} must be a static integer [B, S] tensor, got {pv.dtype} {list(pv.shape)}")
    B, S = pv.shape
    device = val(tokens).device
    if S > 1 and growing:
        raise Decline(f"the step appends {S} tokens to a growing cache: how its queries see each other cannot be "
                      "kept by the position mask (decode one token per step)")
    for k, v, _ in layers:
        for c in (k, v):
            nv = val(c.new)
            if not all(_static(d) for d in nv.shape) or nv.shape[0] != B or nv.shape[2] != S:
                raise Decline(f"the new keys/values %{c.new.name} {list(nv.shape)} are not [B={B}, H, S={S}, D]")
    out_node = graph.output_node()
    anchor = next(n for n in graph.nodes if n.op != "placeholder")
    call = lambda target, *args, before=None, **kw: insert_call(  # noqa: E731
        RewriteKVCache.name, gm, before or anchor, target, args, kw)

    def index(n: int, shape: list[int]) -> fx.Node:
        return call(aten.view.default, call(aten.arange.start_step, 0, n, 1, dtype=torch.int64, device=device), shape)

    # Shared index tensors: batch rows, heads, positions and, for decode, the mask over the buffer.
    b_idx = index(B, [B, 1, 1])
    pos = positions if pv.dtype == torch.int64 else call(aten._to_copy.default, positions, dtype=torch.int64)
    pos_idx = call(aten.view.default, pos, [B, 1, S] if layout == "bhsd" else [B, S, 1])
    head_idx: dict[tuple[int, str], fx.Node] = {}
    decode_mask: dict[torch.dtype, fx.Node] = {}

    def heads(h: int, lay: str = layout) -> fx.Node:
        if (h, lay) not in head_idx:
            head_idx[h, lay] = index(h, [1, h, 1] if lay == "bhsd" else [1, 1, h])
        return head_idx[h, lay]

    def mask(dtype: torch.dtype) -> fx.Node:
        if dtype not in decode_mask:
            slots = index(L, [1, 1, L])
            visible = call(aten.unsqueeze.default,
                           call(aten.le.Tensor, slots, call(aten.view.default, pos, [B, S, 1])), 1)  # [B, 1, S, L]
            if dtype == torch.bool:
                decode_mask[dtype] = visible
            else:
                zero = call(aten.full.default, [], 0.0, dtype=dtype, device=device)
                low = call(aten.full.default, [], torch.finfo(dtype).min, dtype=dtype, device=device)
                decode_mask[dtype] = call(aten.where.self, visible, zero, low)
        return decode_mask[dtype]

    def new_input(name: str, like: torch.Tensor, shape: list[int]) -> fx.Node:
        with graph.inserting_before(anchor):
            node = graph.placeholder(name)
        with mode:
            node.meta["val"] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return node

    def write_back(buf: fx.Node, written: fx.Node) -> None:
        with graph.inserting_before(out_node):
            update = graph.call_function(aten.copy_.default, (buf, written))
        update.meta["mmcompile.pass"] = RewriteKVCache.name

    stats = {"layers": len(layers), "buffers": 2 * len(layers)}
    checked: set[fx.Node] = set()
    buffers: list[list[fx.Node]] = []
    for i, (k, v, attn) in enumerate(layers):
        for c in (k, v):
            if c.growing and any(val(c.past).shape[d] != val(c.new).shape[d] for d in (0, 1, 3)):
                raise Decline(f"past %{c.past.name} and new %{c.new.name} disagree outside the sequence dimension")
        if k.growing:
            for a in attn:
                causal = a.args[5] if len(a.args) > 5 else a.kwargs.get("is_causal", False)
                if causal:
                    raise Decline(f"%{a.name} is causal with a query of {S} token(s) over a growing cache; "
                                  "its alignment cannot be kept over a buffer")
                old = a.args[3] if len(a.args) > 3 else a.kwargs.get("attn_mask")
                if isinstance(old, fx.Node) and old not in checked:
                    _check_mask_all_visible(gm, old, pasts, L)
                    checked.add(old)
        layer = []
        for kind, c in (("k", k), ("v", v)):
            nv = val(c.new)  # [B, H, S, D]
            H, D = nv.shape[1], nv.shape[3]
            buf = new_input(f"kv_cache_{i}_{kind}", nv, [B, H, L, D] if layout == "bhsd" else [B, L, H, D])
            values = c.new if layout == "bhsd" else call(aten.permute.default, c.new, [0, 2, 1, 3], before=c.cat)
            idx = [b_idx, heads(H), pos_idx] if layout == "bhsd" else [b_idx, pos_idx, heads(H)]
            written = call(aten.index_put.default, buf, idx, values, before=c.cat)
            seen = written if layout == "bhsd" else call(aten.permute.default, written, [0, 2, 1, 3], before=c.cat)
            if c.growing:
                for a in attn:  # attention reads the whole buffer, under the position mask
                    a.replace_input_with(c.cat, seen)
            elif val(c.cat).dtype == nv.dtype:
                c.cat.replace_all_uses_with(c.new, delete_user_cb=lambda u: u.op != "output")  # cat with empty
            write_back(buf, written)
            layer.append(buf)
            stats["rewritten.growing" if c.growing else "rewritten.created"] = \
                stats.get("rewritten.growing" if c.growing else "rewritten.created", 0) + 1
        if k.growing:
            for a in attn:
                q = val(a.args[0])
                new_mask = mask(torch.bool if q.dtype == torch.bool else q.dtype)
                args = list(a.args) + [None] * max(0, 4 - len(a.args))
                if "attn_mask" in a.kwargs:
                    a.update_kwarg("attn_mask", new_mask)
                else:
                    args[3] = new_mask
                    a.args = tuple(args)
        buffers.append(layer)

    # Cross-attention caches: written whole by the step that computes them (slots 0..T-1 of max_source_len),
    # read as they are by every later step. Always [B, H, T, D]: attention reads them directly.
    cross: list[list[fx.Node]] = []
    limit = options.get("max_source_len")
    for i, (k, v, _attn) in enumerate(created_cross):
        layer = []
        for kind, c in (("k", k), ("v", v)):
            nv = val(c.new)
            T = nv.shape[2]
            slots = limit or T
            if not all(_static(d) for d in nv.shape) or nv.shape[0] != B or T > slots:
                raise Decline(f"cross-attention keys/values %{c.new.name} {list(nv.shape)} do not fit [B={B}, H, "
                              f"max_source_len={slots}, D]")
            buf = new_input(f"cross_cache_{i}_{kind}", nv, [B, nv.shape[1], slots, nv.shape[3]])
            written = call(aten.index_put.default, buf, [b_idx, heads(nv.shape[1], "bhsd"), index(T, [1, 1, T])],
                           c.new, before=c.cat)
            if val(c.cat).dtype == nv.dtype:
                c.cat.replace_all_uses_with(c.new, delete_user_cb=lambda u: u.op != "output")
            write_back(buf, written)
            layer.append(buf)
            stats["cross.created"] = stats.get("cross.created", 0) + 1
        cross.append(layer)
    for i, (k, v, _attn) in enumerate(kept_cross):
        layer = []
        for kind, x in (("k", k), ("v", v)):
            xv = val(x)
            if limit and xv.shape[2] != limit:
                raise Decline(f"cross-attention cache %{x.name} holds {xv.shape[2]} source positions but the buffers "
                              f"have max_source_len={limit}: capture the decode step with the source padded to it")
            buf = new_input(f"cross_cache_{i}_{kind}", xv, list(xv.shape))
            x.replace_all_uses_with(buf)
            layer.append(buf)
            stats["cross.kept"] = stats.get("cross.kept", 0) + 1
        cross.append(layer)

    # Positions a model derives from the past length (``arange(S) + past``, transformers' BART and its kin):
    # that length is the first new token's position, taken from the positions of row 0, so rows must share it.
    _sweep(graph, pasts)  # the old masks are dead now: only live reads of the past length count
    shared_position = positions_added and bool(growing)
    first_position = None
    for p in pasts:
        for s in [u for u in p.users if is_call(u, aten.sym_size.int)]:
            for u in list(s.users):
                if is_call(u, aten.add.Tensor) and u.args[1] is s and isinstance(u.args[0], fx.Node) \
                        and not depends_on_input(u.args[0]):
                    if first_position is None:
                        first_position = call(aten.select.int, call(aten.select.int, pos, 0, 0), 0, 0)
                    u.update_arg(1, first_position)
                    shared_position = True
    if shared_position:
        stats["positions.from_past_length"] = 1

    # The outputs: drop every cache tensor and every input returned unchanged; what remains is the result.
    cats = {c.cat for c in caches}
    kept = [o for o in out_node.args[0] if o not in cats and not (isinstance(o, fx.Node) and o.op == "placeholder")]
    out_node.args = (tuple(kept),)
    _sweep(graph, pasts)
    keep_inputs = [n for n in work.placeholders() if n.name in set(options.get("inputs", ())) and n.users]
    signature = [tokens, positions] + [b for layer in buffers + cross for b in layer] + keep_inputs
    leftover = [n for n in work.placeholders() if n not in signature]
    for n in leftover:
        if n.users:
            users = ", ".join(f"%{u.name}" for u in list(n.users)[:3])
            raise Decline(f"input %{n.name} is still read ({users}) after the rewrite: the step would depend on "
                          "more than its tokens, positions and cache")
        graph.erase_node(n)
    for n in signature:  # placeholders in signature order
        anchor = next(x for x in graph.nodes if x.op != "placeholder")
        anchor.prepend(n)
    examples = [old_examples[tokens.name], old_examples[positions.name]]
    for layer in buffers + cross:
        for b in layer:  # zero-stride stand-ins: a real copy of the cache per Program would double its memory;
            v = val(b)   # clone them before running the graph on them (verify and testing.run_program do)
            examples.append(torch.zeros((), dtype=v.dtype, device=v.device).expand(v.shape))
    examples += [old_examples[n.name] for n in keep_inputs]
    work.example_inputs = examples
    positional = (0, 0, [(0, 0)] * len(buffers)) + ((([(0, 0)] * len(cross)),) if cross else ())
    work.in_spec = pytree.tree_structure((positional, {n.name: 0 for n in keep_inputs}))
    work.out_spec = pytree.tree_structure(kept[0] if len(kept) == 1 else tuple(kept))
    gm.recompile()
    work.recompute_meta()
    kv = {
        "source": "growing cache (cat of past and new), rewritten" if growing else "cache created by the step, rewritten",
        "layout": layout, "max_seq_len": L, "phase": "decode" if growing else "prefill",
        "buffers": [[list(val(b).shape) for b in layer] for layer in buffers], "dtype": str(val(buffers[0][0]).dtype),
        "signature": f"({tokens_name} [B, S], {positions_name} [B, S], cache [(k, v)] * {len(buffers)}"
                     + (f", cross_cache [(k, v)] * {len(cross)}" if cross else "")
                     + "".join(f", {n.name}=" for n in keep_inputs) + ") -> logits",
    }
    if cross:
        kv["cross"] = {"buffers": [[list(val(b).shape) for b in layer] for layer in cross],
                       "max_source_len": val(cross[0][0]).shape[2],
                       "written": "by this step" if created_cross else "no: read as kept"}
    if keep_inputs:
        kv["inputs"] = [n.name for n in keep_inputs]
    if shared_position:
        kv["shared_position"] = ("the model derives positions from the past length: every row of a step must "
                                 "be at the same position")
    if positions_added:
        kv["positions_added"] = (f"{positions_name} is an added input: the slot of each row's new token (the past "
                                 "length before the rewrite)" if growing else
                                 f"{positions_name} is an added input: the step's tokens go to slots 0..S-1")
    work.metadata["kv_cache"] = kv
    return stats


def _sweep(graph: fx.Graph, pasts: set[fx.Node]) -> None:
    """Remove what no longer feeds anything, including asserts that only guard the old past length."""
    for node in reversed(list(graph.nodes)):
        if node.op != "call_function" or node.users:
            continue
        guard = node.target in (aten._assert_scalar.default, aten.sym_constrain_range_for_size.default)
        if guard and {p for p in ancestors(node) if p.op == "placeholder"} <= pasts:
            graph.erase_node(node)
        elif not node.is_impure() and node.target is not operator.setitem:
            graph.erase_node(node)
