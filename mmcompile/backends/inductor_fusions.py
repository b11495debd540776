"""Fusions the Inductor backend applies to its copy of a decode step: each decode-sized linear layer runs
as one GEMV kernel together with its neighbours (``mmcompile.kernels.gemv_fused``).

A decode step of a 7B model is about 13 GB of weight reads and some 400 kernels; the GEMVs read the
weights near the copy bandwidth, and what is left is the small kernels between them — RMSNorm, the
SiLU gate, the residual adds — each a launch and a round trip of activations through memory. Inductor
fuses those with each other, not with the GEMV (an opaque Triton kernel to it). This rewrite moves them
into the GEMV itself:

- **RMSNorm prologue**: ``linear(rms_norm(x, g, eps))`` — the norm as canonicalize leaves it
  (``_to_copy`` to fp32, ``pow``, ``mean``, ``rsqrt``, scale by a constant weight; see ``fuse_rmsnorm``)
  or as ``mmcompile::rms_norm`` — reads ``x``; the kernel sums ``x^2`` in the weight loop and scales
  the finished dot products (every program sees the whole row of ``x`` anyway).
- **SiLU-gate prologue**: ``linear(silu(gate) * up)`` — SwiGLU's down projection, with ``silu`` as
  ``aten.silu`` or ``t * sigmoid(t)`` — reads ``gate`` and ``up`` (two slices of ``fuse_linears``'
  stacked gate/up product, or two products).
- **Residual epilogue**: ``r + linear(a)`` (an add of two tensors of one shape and dtype, the product
  read by nothing else) adds ``r`` in the kernel.

Float weights (``mm``/``addmm`` of a transposed constant) and int8 weight-only ones
(``mmcompile::linear_int8``) qualify, for one row (batch-1 decode) of float16/bfloat16 on ``devices``:
the kernel takes the prologues for several rows too (``gemv_fused``), but in its ``tl.dot`` path they
cost more than they save (decode of a 7B model at batch 8 on an H100: 520 tok/s fused against 1254
apart), so products of several rows keep their neighbours apart. A product that
does not is left to the plain GEMV routing (``mmcompile.ops.inductor_decompositions``); a recognised
neighbour that cannot move in is left where it is, with the reason in the notes
(``compiled.fusions``). The arithmetic is the same; the rounding is not: the kernel keeps the
normalized or gated activations in fp32 for one row (eager rounds them to the input dtype), and adds
the residual before rounding the product.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.fx import GraphModule, Node

from mmcompile.rewrite import insert_call, is_call, linear_parts, sdpa_arguments, val

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.alias.default)
_PASS = "inductor.gemv_fusion"

__all__ = ["fuse_gemv_neighbours", "launch_gemvs_dependently", "fuse_cache_writes_into_attention",
           "launch_attention_dependently", "int4_one_row_products", "INT4_KERNELS"]


def _strip_views(n):
    while is_call(n, *_VIEWS):
        n = n.args[0]
    return n


def _strip_casts(n):
    while is_call(n, aten._to_copy.default) and set(n.kwargs) <= {"dtype"}:
        n = n.args[0]
    return n


def _linear(node: Node):
    """``(a, weight, scales, bias)`` of a float or int8 weight-only linear, else None."""
    parts = linear_parts(node)
    if parts is not None:
        a, w, bias = parts
        return a, w, None, bias
    if is_call(node, torch.ops.mmcompile.linear_int8.default):
        a, q, s, *rest = node.args
        return a, q, s, (rest[0] if rest else None)
    return None


def _norm(a) -> Optional[tuple]:
    """``(x, weight, eps)`` when ``a`` is (a view of) an RMSNorm of ``x``, else None."""
    from mmcompile.passes.fuse_rmsnorm import _match

    src = _strip_views(a)
    if is_call(src, torch.ops.mmcompile.rms_norm.default):
        x, w, eps = src.args[:3]
        return (x, w, float(eps)) if isinstance(w, Node) and w.op == "get_attr" else None
    if not is_call(src, aten.mul.Tensor):
        return None
    for operand in src.args[:2]:
        inner = _strip_casts(operand)
        if is_call(inner, aten.mul.Tensor):
            for r in inner.args[:2]:
                if is_call(r, aten.rsqrt.default):
                    try:
                        x, w, eps, out = _match(r)
                    except ValueError:
                        return None
                    return (x, w, eps) if out is src else None
    return None


def _silu_of(n) -> Optional[Node]:
    """``t`` when ``n`` is ``silu(t)`` (``aten.silu`` or ``t * sigmoid(t)``, casts around it), else None."""
    n = _strip_casts(n)
    if is_call(n, aten.silu.default):
        return _strip_casts(n.args[0])
    if is_call(n, aten.mul.Tensor) and len(n.args) == 2:
        a, b = n.args
        for t, s in ((a, b), (b, a)):
            if is_call(s, aten.sigmoid.default) and s.args[0] is t:
                return _strip_casts(t)
    return None


def _glu(a) -> Optional[tuple]:
    """``(gate, up)`` when ``a`` is (a view of) ``silu(gate) * up``, else None."""
    src = _strip_views(a)
    if not (is_call(src, aten.mul.Tensor) and len(src.args) == 2 and all(isinstance(t, Node) for t in src.args)):
        return None
    p, q = src.args
    for s, u in ((p, q), (q, p)):
        gate = _silu_of(s)
        if gate is not None and gate is not _strip_casts(u):
            return _strip_views(gate), _strip_views(u)
    return None


def _residual(node: Node) -> Optional[tuple]:
    """``(add, r)`` when the product ``node`` is read only by ``r + node`` (through views), else None."""
    chain = node
    while len(chain.users) == 1 and is_call(next(iter(chain.users)), *_VIEWS):
        chain = next(iter(chain.users))
    if len(chain.users) != 1:
        return None
    add = next(iter(chain.users))
    if not (is_call(add, aten.add.Tensor) and len(add.args) == 2 and not add.kwargs):
        return None
    r = add.args[1] if add.args[0] is chain else add.args[0] if add.args[1] is chain else None
    if not isinstance(r, Node) or r is chain:
        return None
    vr, va, vn = val(r), val(add), val(node)
    if vr is None or va is None or tuple(vr.shape) != tuple(va.shape) or vr.dtype != vn.dtype or va.dtype != vn.dtype:
        return None
    return add, r


def _fits_rows(t, rows: int, cols: int) -> bool:
    return (isinstance(t, torch.Tensor) and t.dim() == 2 and tuple(t.shape) == (rows, cols)
            and t.stride(1) == 1)


def fuse_gemv_neighbours(gm: GraphModule, devices=("cuda",)) -> tuple[GraphModule, list[str]]:
    """A copy of ``gm`` (sharing its parameters and buffers) whose decode-sized linears on ``devices`` run
    ``mmcompile::triton_gemv_fused`` with their RMSNorm or SiLU-gate prologue and residual epilogue (see
    the module's docstring), and the notes: each fused product and each neighbour left out, with why.
    ``gm`` itself is left as it is."""
    import copy

    from mmcompile import kernels

    if not any(_linear(n) for n in gm.graph.nodes):
        return gm, []
    new = GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    graph, notes, changed = new.graph, [], False
    for node, (a, weight, scales, bias) in [(n, p) for n in graph.nodes if (p := _linear(n)) is not None]:
        va, vw = val(a), val(weight)
        if not (isinstance(va, torch.Tensor) and va.device.type in devices and va.dim() >= 2):
            continue
        K, N = va.shape[-1], vw.shape[0]
        rows = va.numel() // K if isinstance(va.numel(), int) and isinstance(K, int) else 0
        if rows != 1:
            # several rows go through the kernel's tl.dot path, where a prologue's fp32 arithmetic and
            # layout conversions cost more than the kernels it saves (2.4x slower decode at batch 8 on
            # an H100); many rows or a dynamic number of them are matmul territory
            continue
        vecs = [val(t) for t in (scales, bias) if t is not None]
        if not kernels.supported(va, vw, *vecs)[0]:
            continue
        prologue, norm_w, eps, up, x = None, None, 0.0, None, a
        found = _norm(a)
        if found is not None:
            nx, nw, neps = found
            vx = val(nx)
            if vx.dtype != va.dtype or vx.shape[-1] != K or not vx.is_contiguous():
                notes.append(f"gemv: {node.name}: RMSNorm not fused: its input is {vx.dtype} "
                             f"{list(vx.shape)}{'' if vx.is_contiguous() else ' non-contiguous'}, "
                             f"the product reads {va.dtype}")
            elif not val(nw).is_contiguous():
                notes.append(f"gemv: {node.name}: RMSNorm not fused: its weight is not contiguous")
            else:
                prologue, x, norm_w, eps = "RMSNorm", nx, nw, neps
        else:
            found = _glu(a)
            if found is not None:
                gate, u = found
                if _fits_rows(val(gate), rows, K) and _fits_rows(val(u), rows, K) and val(gate).dtype == va.dtype \
                        and val(u).dtype == va.dtype:
                    prologue, x, up = "SiLU gate", gate, u
                else:
                    notes.append(f"gemv: {node.name}: SiLU gate not fused: gate {_desc(val(gate))} and up "
                                 f"{_desc(val(u))} are not two [{rows}, {K}] row-contiguous {va.dtype} tensors")
        epilogue = _residual(node)
        if epilogue is not None and not val(epilogue[1]).is_contiguous():
            notes.append(f"gemv: {node.name}: residual add not fused: the residual is not contiguous")
            epilogue = None
        if prologue is None and epilogue is None:
            continue
        at = epilogue[0] if epilogue is not None else node
        if x is not a or val(x).dim() != 2:
            x = insert_call(_PASS, new, at, aten.view.default, (x, [rows, K]), origin=node)
        residual = None
        if epilogue is not None:
            residual = insert_call(_PASS, new, at, aten.view.default, (epilogue[1], [rows, N]), origin=node)
        kernels.register()
        fused = insert_call(_PASS, new, at, torch.ops.mmcompile.triton_gemv_fused.default,
                            (x, weight, scales, bias, norm_w, eps, up, residual), origin=node)
        if epilogue is not None:
            out = insert_call(_PASS, new, at, aten.view.default, (fused, list(val(at).shape)), origin=node)
            at.replace_all_uses_with(out)
        else:
            out = insert_call(_PASS, new, at, aten.view.default, (fused, list(val(node).shape)), origin=node)
            node.replace_all_uses_with(out)
        parts = [p for p in (prologue and f"{prologue} prologue", epilogue and "residual epilogue") if p]
        notes.append(f"gemv: {node.name} ({rows} x {K} -> {N}{', int8' if scales is not None else ''}) "
                     f"fused with its {' and '.join(parts)}")
        changed = True
    return _finished(gm, new, notes, changed)


def _finished(gm: GraphModule, new: GraphModule, notes: list[str], changed: bool) -> tuple[GraphModule, list[str]]:
    """A pass's result: its copy ``new``, cleaned up, when it changed anything, else ``gm`` itself."""
    if not changed:
        return gm, notes
    new.graph.eliminate_dead_code()
    new.recompile()
    return new, notes


def _desc(t) -> str:
    return f"{t.dtype} {list(t.shape)} strides {list(t.stride())}" if isinstance(t, torch.Tensor) else "?"


def launch_gemvs_dependently(gm: GraphModule, devices=("cuda",)) -> tuple[GraphModule, list[str]]:
    """A copy of ``gm`` whose one-row ``mmcompile::triton_gemv_fused`` products run as
    ``mmcompile::triton_gemv_fused_pdl`` (and ``triton_gemv_int4_words`` as ``triton_gemv_int4_words_pdl``):
    the same kernel, launched as a programmatic dependent launch
    (CUDA, sm_90 and later). Each product then starts while the kernel before it finishes: its programs
    read their first weight tile at once and wait for that kernel only before they read its output. On an
    H100 the 129 products of a 7B model's decode step took 4.63 ms so against 4.72 (bf16) and 2.75
    against 2.86 (int8) (``bench/gemv_chain.py --pdl``).

    Reading weights early is safe only for weights no kernel writes: a product whose weight is not a
    constant of the graph (``get_attr``) keeps its ordinary launch, with the reason in the notes, as does
    every product on a GPU older than sm_90. ``gm`` itself is left as it is."""
    from mmcompile import kernels

    kernels.register()

    def refusal(product) -> Optional[str]:
        weight = product.args[1]
        if isinstance(weight, Node) and weight.op == "get_attr":
            return None
        where = "an input of the graph" if getattr(weight, "op", None) == "placeholder" else "computed in the graph"
        return (f"{product.name}: launched after the kernel before it finishes, not during: its weight "
                f"{getattr(weight, 'name', weight)} is {where}, not a constant, and the kernel reads its first "
                "tile early")

    gm, notes = _launched_dependently(gm, torch.ops.mmcompile.triton_gemv_fused.default,
                                      torch.ops.mmcompile.triton_gemv_fused_pdl.default, devices, "gemv",
                                      "products", one_row=True, refusal=refusal)
    gm, more = _launched_dependently(gm, torch.ops.mmcompile.triton_gemv_int4_words.default,
                                     torch.ops.mmcompile.triton_gemv_int4_words_pdl.default, devices, "gemv",
                                     "int4 word products", one_row=True, refusal=refusal)
    return gm, notes + more


def _launched_dependently(gm: GraphModule, target, dependent, devices, tag: str, what: str, *,
                          one_row: bool = False, refusal=None) -> tuple[GraphModule, list[str]]:
    """The shared part of the ``launch_*_dependently`` passes: a copy of ``gm`` whose ``target`` calls on
    ``devices`` run as ``dependent`` (the same kernel launched as a programmatic dependent launch), except
    on GPUs older than sm_90, for calls of more than one row with ``one_row``, and where ``refusal(node)``
    gives a reason (noted). Notes are tagged ``tag``; ``what`` names the calls in the count."""
    import copy

    if not any(is_call(n, target) for n in gm.graph.nodes):
        return gm, []
    new = GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    notes, moved, old_gpus = [], 0, set()
    for node in [n for n in new.graph.nodes if is_call(n, target)]:
        x_val = val(node.args[0])
        if not isinstance(x_val, torch.Tensor) or x_val.device.type not in devices or (one_row and x_val.shape[0] != 1):
            continue
        if x_val.device.type == "cuda" and torch.cuda.get_device_capability(x_val.device) < (9, 0):
            old_gpus.add(torch.cuda.get_device_name(x_val.device))
            continue
        why = refusal(node) if refusal is not None else None
        if why:
            notes.append(f"{tag}: {why}")
            continue
        node.target = dependent
        moved += 1
    if old_gpus:
        notes.append(f"{tag}: ordinary launches on {', '.join(sorted(old_gpus))}: programmatic dependent launch "
                     "needs sm_90 or later")
    if moved:
        notes.append(f"{tag}: {moved} {what} launched as programmatic dependent launches")
    return _finished(gm, new, notes, moved > 0)


def fuse_cache_writes_into_attention(gm: GraphModule, state: set, devices=("cuda",)) -> tuple[GraphModule, list[str]]:
    """A copy of ``gm`` whose decode attention takes in the work before it: where one query per row
    attends over a static cache that the step writes its new key and value into —

        k_cache' = index_put(k_cache, [rows, heads, positions], rope(k))   # likewise v, without rope
        out = sdpa(rope(q), k_cache', v_cache', mask=arange(S) <= positions, enable_gqa=...)
        ... copy_(k_cache, k_cache'); copy_(v_cache, v_cache')             # the step's state update

    with q, k and v slices of one fused projection's row — it becomes one
    ``mmcompile::decode_attention_append`` launch: the kernel rotates the query and the key, writes the
    key and value into the caches in place and attends up to each row's position, where Inductor ran
    two or more pointwise kernels (rotary, cache writes, the head slices) before the attention kernel.
    Rotary is rotate-half with the same ``cos``/``sin`` for q and k, one vector per row ([B or 1, 1, 1, D]);
    without it on both, neither is rotated. ``state``: the names of the graph's state inputs (the
    caches). A candidate that does not qualify keeps its ops, with the reason in the notes; ``gm``
    itself is left as it is."""
    import copy

    from mmcompile import decode_attention
    from mmcompile.rewrite import rotations

    from .cache_patterns import match_write, packed_rows, projection_rows, visible_mask

    sdpa = aten.scaled_dot_product_attention.default
    if not any(is_call(n, sdpa) for n in gm.graph.nodes):
        return gm, []
    new = GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    graph, notes, fused = new.graph, [], 0
    for node in [n for n in graph.nodes if is_call(n, sdpa)]:
        a = sdpa_arguments(node)
        q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
        kw, vw = match_write(k, state, written_back=True), match_write(v, state, written_back=True)
        qv = val(q)
        if kw is None or vw is None or not isinstance(qv, torch.Tensor) or qv.device.type not in devices:
            continue  # not attention over a cache this step writes (prefill, encoders), or not here
        B, H, L, D = qv.shape
        cache = val(kw.cache)
        why = None
        if a.get("dropout_p", 0.0) or a.get("is_causal", False):
            why = "dropout or is_causal"
        elif L != 1:
            why = f"{L} queries per row"
        elif kw.positions is not vw.positions or any(ik is not iv for ik, iv in zip(k.args[1], v.args[1])):
            why = "keys and values are written at different indices"
        elif set(k.users) != {node, kw.copy} or set(v.users) != {node, vw.copy}:
            why = "the updated cache has other readers"
        elif H % cache.shape[1] or (H != cache.shape[1] and not a.get("enable_gqa", False)):
            why = "query heads are not a multiple of key heads"
        elif not visible_mask(mask, kw.positions, cache.shape[2]):
            why = "the mask is not arange(cache length) <= position"
        else:
            ok, reason = decode_attention.supported(qv, cache, val(vw.cache))
            why = None if ok else reason
        qx, kx, cos, sin = q, kw.value, None, None
        if why is None:
            rq = [(x, c, s) for x, c, s in rotations(q) if _row_vector(val(c), B, D) and _row_vector(val(s), B, D)]
            rk = [(x, c, s) for x, c, s in rotations(kx)]
            match = [(x, y, c, s) for x, c, s in rq for y, c2, s2 in rk if c is c2 and s is s2]
            if match:
                qx, kx, cos, sin = match[0]
            elif rq or rk:
                why = "the query and the key are not rotated by the same cos and sin"
        if why is None:
            rows = [projection_rows(x, B, h, D) for x, h in ((qx, H), (kx, cache.shape[1]), (vw.value, cache.shape[1]))]
            packed = packed_rows(rows, (H + 2 * cache.shape[1]) * D) if all(r is not None for r in rows) else None
            if packed is None:
                why = "q, k and v are not slices of one fused projection's row"
        if why:
            notes.append(f"attention: {node.name} keeps its cache writes and rotary apart: {why}")
            continue
        decode_attention.register()
        scale = a.get("scale")
        scale = D ** -0.5 if scale is None else float(scale)
        with graph.inserting_before(node):
            fusedn = graph.call_function(torch.ops.mmcompile.decode_attention_append.default,
                                         (packed, kw.cache, vw.cache, kw.positions, cos, sin, scale, H))
        fusedn.meta = dict(node.meta)
        node.replace_all_uses_with(fusedn)
        for write in (kw, vw):
            graph.erase_node(write.copy)
        for n in (node, k, v):
            graph.erase_node(n)
        fused += 1
    if fused:
        notes.append(f"attention: {fused} decode attention(s) with their rotary and cache writes in one kernel")
    return _finished(gm, new, notes, fused > 0)


def _row_vector(t, B: int, D: int) -> bool:
    """``t`` is one rotary factor per row: [B or 1, 1, 1, D]."""
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[0] in (1, B) and tuple(t.shape[1:]) == (1, 1, D)


def launch_attention_dependently(gm: GraphModule, devices=("cuda",)) -> tuple[GraphModule, list[str]]:
    """A copy of ``gm`` whose ``mmcompile::decode_attention_append`` calls run as
    ``mmcompile::decode_attention_append_pdl``: the same kernel launched as a programmatic dependent
    launch (CUDA, sm_90 and later), whose programs read their first block of cached keys and values, the
    positions and the rotary vectors while the kernel before (the q/k/v product) finishes, and wait for
    it only before they read the q/k/v row. The op keeps its combination counters across calls, so no
    kernel zeroes them in between. What is read early is written only by earlier steps or earlier
    kernels: the caches (by this op, in earlier steps), the positions and the rotary vectors.
    ``gm`` itself is left as it is."""
    from mmcompile import decode_attention

    decode_attention.register()
    return _launched_dependently(gm, torch.ops.mmcompile.decode_attention_append.default,
                                 torch.ops.mmcompile.decode_attention_append_pdl.default, devices, "attention",
                                 "decode attention(s)")


INT4_KERNELS = ("auto", "tinygemm", "words")


def _int4_refusal(kernel: str, vx, packed, scales, zeros) -> Optional[str]:
    """Why ``kernel`` cannot take a one-row int4 product of activations ``vx``, or None."""
    from mmcompile import kernels, quant

    K = vx.shape[-1]
    if not all(isinstance(t, Node) and t.op == "get_attr" for t in (packed, scales, zeros)):
        return "its codes, scales or zeros are not constants of the graph"
    if kernel == "tinygemm":
        if vx.device.type != "cuda":
            return "tinygemm is a CUDA kernel"
        if vx.dtype != torch.bfloat16:
            return f"{vx.dtype} activations; tinygemm takes bfloat16"
        ok, why = quant.tinygemm_supported(val(packed), val(scales))
        return None if ok else why
    if vx.dtype not in (torch.float16, torch.bfloat16):
        return f"{vx.dtype} activations; the word kernel takes float16 or bfloat16"
    return kernels.int4_groups_refusal(K, val(scales).shape[1]) or None


def int4_one_row_products(gm: GraphModule, kernel: str = "auto",
                          devices=("cuda",)) -> tuple[GraphModule, list[str]]:
    """A copy of ``gm`` whose one-row int4 weight-only products (``mmcompile::linear_int4``, batch-1
    decode) on CUDA ``devices`` run a kernel for one row, and the notes. Each product's constant codes,
    scales and zeros are laid out once, now, as that kernel reads them, and become constants of the copy:

    - ``"tinygemm"``: torch's tinygemm kernel (``aten._weight_int4pack_mm``, bfloat16 activations) on
      ``quant.tinygemm_layout``'s copy (the formula is ours; the scales and zeros are rounded to bf16);
    - ``"words"``: mmcompile's int4 word kernel (``kernels.gemv_int4_words``, float16 or bfloat16
      activations) on the codes as int32 words (``quant.int4_words``), the scales and zeros rounded to bf16;
    - ``"auto"``: tinygemm where it takes the product, else the word kernel. On an H100 a 7B model's
      products took 6.9-15.4 us each in tinygemm, 7.9-15.7 in the word kernel at its best tiles and
      10.4-25.5 in the packed-code kernel (``bench/gemv.py --kinds int4``); a 7B decode ran at 378.5 tok/s
      on tinygemm against 323.3 on the word kernel.

    A product no kernel takes keeps mmcompile's packed-code int4 kernel or the decomposition, with the
    reason in the notes. ``gm`` itself is left as it is; the copy holds both layouts of the codes. The word
    kernel also runs under Triton's interpreter on the CPU (``devices=("cpu",)``), for tests."""
    import copy

    from mmcompile import kernels, quant
    from mmcompile.program import _getattr, add_constant

    if kernel not in INT4_KERNELS:
        raise ValueError(f"int4 kernel {kernel!r}; choose from {', '.join(INT4_KERNELS)}")
    order = ("tinygemm", "words") if kernel == "auto" else (kernel,)
    target = torch.ops.mmcompile.linear_int4.default
    products = [n for n in gm.graph.nodes if is_call(n, target)]
    if not products:
        return gm, []
    new = GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    notes, moved = [], {"tinygemm": 0, "words": 0}
    for node in [n for n in new.graph.nodes if is_call(n, target)]:
        x, packed, scales, zeros = node.args[:4]
        bias = node.args[4] if len(node.args) > 4 else node.kwargs.get("bias")
        vx = val(x)
        if not (isinstance(vx, torch.Tensor) and vx.device.type in devices and
                (vx.device.type == "cuda" or "words" in order and kernels.available(vx.device)[0])):
            continue  # CUDA kernels (the word kernel also runs under Triton's interpreter, for tests)
        K = vx.shape[-1]
        rows = vx.numel() // K if isinstance(vx.numel(), int) and isinstance(K, int) else 0
        if rows != 1:
            continue  # several rows: the packed-code kernel's tl.dot or the decomposition
        refusals = {k: _int4_refusal(k, vx, packed, scales, zeros) for k in order}
        chosen = next((k for k in order if refusals[k] is None), None)
        if chosen is None:
            notes.append(f"int4: {node.name}: mmcompile's packed-code int4 kernel: "
                         + "; ".join(f"not {k}: {why}" for k, why in refusals.items()))
            continue
        codes, s, z = (_getattr(new, t.target) for t in (packed, scales, zeros))
        x2 = insert_call(_PASS, new, node, aten.view.default, (x, [1, K]), origin=node)
        if chosen == "tinygemm":
            tiled, scales_zeros = quant.tinygemm_layout(codes, s, z)
            consts = [add_constant(new, tensor, f"{source.target}_tinygemm", before=node)
                      for tensor, source in ((tiled, packed), (scales_zeros, scales))]
            out = insert_call(_PASS, new, node, aten._weight_int4pack_mm.default,
                              (x2, consts[0], K // val(scales).shape[1], consts[1]), origin=node)
            if bias is not None:
                out = insert_call(_PASS, new, node, aten.add.Tensor, (out, bias), origin=node)
        else:
            kernels.register()
            consts = [add_constant(new, tensor, f"{source.target}_{suffix}", before=node) for tensor, source, suffix in
                      ((quant.int4_words(codes, s.shape[1]), packed, "words"),
                       (s.to(torch.bfloat16).contiguous(), scales, "bf16"),
                       (z.to(torch.bfloat16).contiguous(), zeros, "bf16"))]
            out = insert_call(_PASS, new, node, torch.ops.mmcompile.triton_gemv_int4_words.default,
                              (x2, *consts, bias), origin=node)
        out = insert_call(_PASS, new, node, aten.view.default, (out, list(val(node).shape)), origin=node)
        node.replace_all_uses_with(out)
        moved[chosen] += 1
    names = {"tinygemm": "tinygemm (aten._weight_int4pack_mm)", "words": "mmcompile's int4 word kernel"}
    notes += [f"int4: {n} one-row products on {names[k]}" for k, n in moved.items() if n]
    return _finished(gm, new, notes, sum(moved.values()) > 0)
