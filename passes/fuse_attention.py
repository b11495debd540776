"""fuse_attention: find attention by what it computes and fuse it into ``aten.scaled_dot_product_attention``.

Matches, starting from every ``softmax`` of the canonical graph, the computation

    out = softmax(c * (q @ kᵀ) + mask) @ v

whatever way the model spells it:

- scores from a batched matmul (``bmm``, 3-D, or 4-D ``[B, H, S, T]`` through views), with ``k``
  transposed by a permute; any layout of q/k/v before that ([B,H,S,D], [B,S,H,D] permuted, split from
  one fused projection) — the fused op reads the same 4-D views the matmuls read;
- the scale ``c``: products and quotients of constants (``mul``/``div`` by a number or a constant 0-d
  tensor) anywhere between the matmul and the softmax, or on q or k alone; none at all (T5);
- softmax in the input dtype, or upcast to fp32 and cast back; dropout is gone after eval capture;
- masks: ``where``/``masked_fill`` with a -inf or finfo.min fill (boolean masks), additive float masks,
  relative-position or ALiBi biases added to the scores — any number of them, in any order with the
  scale; a mask that is causal is recognised by evaluating it when it does not depend on the inputs and
  becomes ``is_causal=True`` — also the constant mask of an SDPA the model already calls;
- grouped-query attention: k/v repeated per head by ``unsqueeze→expand→reshape`` (repeat_kv) or
  ``repeat_interleave`` are read un-repeated with ``enable_gqa=True``, so the repeat is never materialized.

Produces: ``aten.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=c, enable_gqa)``
replacing the output of the second matmul; the matched nodes are erased.

Leaves alone — and says why in the report's notes, for every softmax it does not fuse:
logit soft-capping (``tanh`` between the matmul and the softmax), a softmax over another axis than the
keys, a scale that is not a constant, masks filled with other values than -inf/finfo.min, dropout still
active, probabilities or scores used elsewhere (``output_attentions``), a softmax not fed by q·kᵀ or not
followed by a matmul with v. One documented difference:
a query row whose keys are all masked with -inf gives NaN in the unfused graph (softmax of all -inf)
and zeros or NaN in the fused op depending on the kernel; rows masked with finfo.min (transformers'
masks) keep their exact unfused values.

SiLU attention (HSTU): ``(SiLU(q @ kᵀ + biases) * c * mask) @ v`` — no softmax — is matched from every
``x * sigmoid(x)`` whose ``x`` is scores (``q @ kᵀ`` plus bias tensors) and becomes
``mmcompile::hstu_attention(q, k, v, bias, mask, c)``: constant scales after the SiLU, boolean masks
multiplied in or applied with ``where(mask, w, 0)``, the 4-D or 3-D ``bmm`` forms. A SiLU not applied
to scores (feed-forward) is not a candidate; softmax attention never becomes SiLU attention.

Requires: canonicalize (normal form: views folded, scalar ops as ``.Tensor`` on the right, positive dims,
proven dtype assertions gone). Backends: all; Inductor and ONNX Runtime map the op to flash or
memory-efficient kernels.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program
from mmcompile.rewrite import (SDPA_ARGUMENTS, ConstantEvaluator, depends_on_input, fake_value, insert_call,
                               is_call as _is, sdpa_arguments, val)

from . import register

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
SOFTMAX = (aten._softmax.default, aten._safe_softmax.default)
CAST = aten._to_copy.default


class NoMatch(Exception):
    """Why a softmax is not attention we can fuse."""


@dataclasses.dataclass
class Term:
    """An additive contribution to the scores, scaled by ``factor`` (the scale applied after it):
    a bias node, or — when ``fill`` is set — a boolean mask ``value`` that keeps scores where it is
    ``keep_when_true`` and replaces the others by ``fill`` (-inf or finfo.min)."""

    value: fx.Node
    factor: float = 1.0
    fill: float | None = None
    keep_when_true: bool = True


@dataclasses.dataclass
class Match:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node             # the node the fused op replaces
    scale: float
    terms: list[Term]
    gqa: bool
    rank: int
    out_view: list[int] | None     # reshape the fused output to this shape (3-D output in a 4-D context)
    upcast: bool
    matched: list[fx.Node]


@dataclasses.dataclass
class SiluMatch:
    q: fx.Node
    k: fx.Node
    v: fx.Node
    out: fx.Node
    scale: float
    biases: list            # float tensors added to the scores, broadcast to them
    masks: list             # (boolean node, keep_when_true)
    rank: int
    out_view: list | None
    matched: list
    relative: dict          # HSTU's relative bias by its ingredients (positions, pos_weight, timestamps, ...)


def _bool_source(node: fx.Node):
    """The boolean tensor a mask multiplier is (a bool, or a bool cast to a float dtype), else None."""
    if not isinstance(node, fx.Node):
        return None
    if val(node).dtype == torch.bool:
        return node
    if _is_cast(node) and isinstance(node.args[0], fx.Node) and val(node.args[0]).dtype == torch.bool:
        return node.args[0]
    return None


def _shape(node) -> list:
    return list(val(node).shape)


def _key(shape) -> tuple:
    """A shape compared structurally: symbolic sizes by their expression, so comparing never adds a
    guard to (or specializes) the Program's dynamic dimensions."""
    return tuple(str(d) for d in shape)


def _static(shape) -> bool:
    return all(isinstance(d, int) for d in shape)


def _single_user(node: fx.Node) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        raise NoMatch(f"%{node.name} has {len(users)} users: the intermediate is used elsewhere "
                      "(e.g. attention weights returned with output_attentions)")
    return users[0]


def _skip_clone(node):
    while _is(node, aten.clone.default) and len(node.users) == 1:
        node = node.args[0]
    return node


def _check_realizable(x) -> None:
    """A pending view whose sizes are symbolic cannot be written into the graph as literals: refuse."""
    while isinstance(x, tuple):
        if x[0] == "view" and not _static(x[2]):
            raise NoMatch(f"reading %{x[1].name} as {list(x[2])} needs a new view with symbolic sizes; "
                          "fused only where the model's own [B, H, S, D] tensors are found")
        x = x[1]


def _dtype(x) -> torch.dtype:
    """dtype of a node or of a pending view/permute of one."""
    while isinstance(x, tuple):
        x = x[1]
    return val(x).dtype


def _is_cast(node) -> bool:
    return _is(node, CAST) and set(node.kwargs) <= {"dtype", "layout", "device", "memory_format"} \
        and val(node).device == val(node.args[0]).device


class _Matcher:
    def __init__(self, program: Program, visibility_rule: bool = True):
        self.program = program
        self.const = ConstantEvaluator(program.graph_module)
        self.visibility_rule = visibility_rule  # HSTU's mask passed as the rows' lengths, not as a tensor

    # ------------------------------------------------------------------ value side / output
    def match(self, softmax: fx.Node) -> Match:
        x = softmax.args[0]
        rank = len(_shape(x))
        dim = softmax.args[1] % rank
        if rank not in (3, 4):
            raise NoMatch(f"softmax over a rank-{rank} tensor (attention scores are 3-D or 4-D)")
        if dim != rank - 1:
            raise NoMatch(f"softmax over dim {dim}, not the last (key) axis of the scores")
        matched = [softmax]
        p = softmax
        nxt = _single_user(p)
        if _is_cast(nxt):
            matched.append(nxt)
            p = nxt
            nxt = _single_user(p)
        p3, nxt = self._through_view(p, nxt, rank, matched)
        if _is(nxt, aten.native_dropout.default):
            raise NoMatch(f"dropout with p={nxt.args[1]} is active on the attention probabilities "
                          "(training mode); capture in eval mode")
        bmm2, out, out_view = self._value_product(p3, nxt, rank, matched,
                                                  "the softmax output does not feed a matmul with v (it feeds %{})")

        # ---------------------------------------------------------------- scores chain
        scale, terms, root, chain = self.scores(x, rank)
        matched += chain
        upcast = any(_is_cast(n) for n in chain)
        bmm1 = root if _is(root, aten.bmm.default) else root.args[0]
        if not _is(bmm1, aten.bmm.default):
            raise NoMatch(f"the softmax input is not computed from a matmul q @ kᵀ (found %{root.name})")
        if root is not bmm1:
            matched.append(root)
        matched.append(bmm1)
        for n in (bmm1,) + ((root,) if root is not bmm1 else ()):
            if len(n.users) != 1:
                raise NoMatch(f"the scores %{n.name} are used elsewhere")

        s4 = _shape(root) if rank == 4 else None
        a, b = bmm1.args
        v3 = bmm2.args[1]
        if rank == 4:
            B, H = s4[0], s4[1]
            q = self.as_4d(a, B, H)
            k = self.k_as_4d(b, B, H)
            v = self.as_4d(v3, B, H)
        else:
            q, k, v = a, self._transpose_last(b), v3
        q, q_scale = self.peel_scale(q)
        k, k_scale = self.peel_scale(k)
        scale *= q_scale * k_scale
        gqa = False
        if rank == 4:
            kk, kr = self.unrepeat(k)
            vv, vr = self.unrepeat(v)
            if kr and kr == vr:
                k, v, gqa = kk, vv, True
        for x in (q, k, v):
            _check_realizable(x)
        dq, dk, dv = _dtype(q), _dtype(k), _dtype(v)
        if not (dq == dk == dv):
            raise NoMatch(f"q, k, v have different dtypes ({dq}, {dk}, {dv})")
        if val(out).dtype != dq:
            raise NoMatch(f"the attention output is {val(out).dtype} but q is {dq}")
        return Match(q, k, v, out, scale, terms, gqa, rank, out_view, upcast, matched)

    def scores(self, x: fx.Node, rank: int):
        """Walk from the softmax input back to the q·kᵀ matmul, collecting scale and mask terms."""
        chain: list[fx.Node] = []
        ops: list[tuple[str, object]] = []   # from the softmax backwards
        node = x
        while True:
            if _is(node, aten.bmm.default) or (_is(node, aten.view.default) and _is(node.args[0], aten.bmm.default)):
                root = node
                break
            if not isinstance(node, fx.Node) or node.op != "call_function":
                raise NoMatch(f"the softmax input is not computed from a matmul q @ kᵀ (reached %{getattr(node, 'name', node)})")
            if len(node.users) != 1:  # the softmax input too: fusing would compute the scores twice
                raise NoMatch(f"the scores %{node.name} are used elsewhere")
            t = node.target
            if _is_cast(node):
                src, dst = val(node.args[0]).dtype, val(node).dtype
                if torch.promote_types(src, dst) != dst:
                    raise NoMatch(f"%{node.name} casts the scores from {src} down to {dst} before the softmax: "
                                  f"SDPA would compute the softmax in {src}")
                chain.append(node)
                node = node.args[0]
                continue
            if t in (aten.mul.Tensor, aten.div.Tensor):
                a, b = node.args[:2]
                c = self.const.scalar(b)
                if c is None:
                    c_a = self.const.scalar(a) if t is aten.mul.Tensor else None
                    if c_a is None:
                        raise NoMatch(f"%{node.name} scales the scores by a value that is not a constant")
                    a = b
                    c = c_a
                if t is aten.div.Tensor:
                    if c == 0:
                        raise NoMatch(f"%{node.name} divides the scores by zero")
                    c = 1.0 / c
                ops.append(("scale", c))
                chain.append(node)
                node = a
                continue
            if t is aten.add.Tensor and node.kwargs.get("alpha", 1) == 1:
                a, b = node.args[:2]
                a_on, b_on = self._on_chain(a), self._on_chain(b)
                if a_on and b_on:  # a bias computed with a matmul of its own (relative-position keys, q · r)
                    a_on, b_on = self._scores_path(a), self._scores_path(b)
                if a_on == b_on:
                    raise NoMatch(f"%{node.name} adds the scores to {'themselves' if a_on else 'something else'}")
                on, bias = (a, b) if a_on else (b, a)
                if not isinstance(bias, fx.Node):
                    ops.append(("shift", bias))  # a constant shift of every score: softmax ignores it
                else:
                    ops.append(("bias", bias))
                chain.append(node)
                node = on
                continue
            if t is aten.where.self:
                cond, a, b = node.args
                a_on, b_on = self._on_chain(a), self._on_chain(b)
                if a_on == b_on:
                    raise NoMatch(f"%{node.name} selects between two values that are both (or neither) scores")
                if self._on_chain(cond):
                    raise NoMatch(f"%{node.name} masks the scores with a condition computed from the scores")
                fill_node = b if a_on else a
                fill = self.const.scalar(fill_node)
                if fill is None:
                    raise NoMatch(f"%{node.name} masks the scores with a value that is not a constant")
                dtype = val(node).dtype
                if not (fill == -math.inf or fill <= torch.finfo(dtype).min or fill == torch.finfo(torch.float32).min):
                    raise NoMatch(f"%{node.name} masks with fill {fill}, not -inf or finfo.min: "
                                  "not provably equivalent to an attention mask")
                ops.append(("where", (cond, a_on, fill)))
                chain.append(node)
                node = a if a_on else b
                continue
            if t is aten.tanh.default:
                raise NoMatch("logit soft-capping (tanh) between q @ kᵀ and the softmax: not expressible by SDPA")
            if t in (aten.native_dropout.default, aten.bernoulli.p, aten.bernoulli.default):
                raise NoMatch("dropout is active (training mode); capture in eval mode")
            raise NoMatch(f"{t} (%{node.name}) between q @ kᵀ and the softmax is not a scale or a mask")
        # replay forward from the matmul: every later scale multiplies the terms added before it
        scale, terms = 1.0, []
        for kind, arg in reversed(ops):
            if kind == "scale":
                scale *= arg
                for term in terms:
                    term.factor *= arg
            elif kind == "bias":
                terms.append(Term(arg))
            elif kind == "where":
                cond, keep_when_true, fill = arg
                terms.append(Term(cond, fill=fill, keep_when_true=keep_when_true))
        if rank == 4 and not _is(root, aten.view.default):
            raise NoMatch("the scores are not reshaped to [B, H, S, T] after the matmul")
        for n in chain:
            if _key(_shape(n)) != _key(_shape(root)):
                raise NoMatch(f"%{n.name} changes the scores' shape to {_shape(n)} (a mask broadcast past the scores)")
        return scale, terms, root, chain

    @staticmethod
    def _scores_path(node) -> bool:
        """Does ``node`` reach a q·kᵀ matmul through the ops the score chain may hold (casts, scales, adds,
        masks; the matmul itself possibly behind one view)? A bias made by its own matmul and then
        permuted into place — Shaw's relative-position keys ``einsum(q, r)`` — does not."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if _is(n, aten.bmm.default) or (_is(n, aten.view.default) and _is(n.args[0], aten.bmm.default)):
                return True
            if n.op == "call_function" and (_is_cast(n) or n.target in (aten.mul.Tensor, aten.div.Tensor,
                                                                         aten.add.Tensor, aten.where.self)):
                stack.extend(a for a in n.args if isinstance(a, fx.Node))
        return False

    def _on_chain(self, node) -> bool:
        """Does ``node`` depend on the q·kᵀ matmul (is it the scores), as opposed to a mask/bias?"""
        if not isinstance(node, fx.Node):
            return False
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if _is(n, aten.bmm.default):
                return True
            if n.op != "call_function" or _is(n, *SOFTMAX):
                continue
            for i in n.all_input_nodes:
                if i not in seen:
                    seen.add(i)
                    stack.append(i)
        return False

    @staticmethod
    def _through_view(p: fx.Node, nxt: fx.Node, rank: int, matched: list):
        """(the weights as the value matmul reads them, the node after): past a 4-D -> 3-D view."""
        if _is(nxt, aten.view.default) and rank == 4:
            matched.append(nxt)
            return nxt, _single_user(nxt)
        return p, nxt

    @staticmethod
    def _value_product(p3: fx.Node, nxt, rank: int, matched: list, missing: str):
        """(bmm with v, the node the fused op replaces, the 3-D view to give its output or None); NoMatch
        with ``missing`` (``{}`` for the node found instead) when ``nxt`` is not ``bmm(p3, v)``."""
        if not _is(nxt, aten.bmm.default) or nxt.args[0] is not p3:
            raise NoMatch(missing.format(getattr(nxt, "name", nxt)))
        matched.append(nxt)
        out, out_view = nxt, None
        if rank == 4:
            users = list(nxt.users)
            if len(users) == 1 and _is(users[0], aten.view.default) and len(_shape(users[0])) == 4:
                out = users[0]
                matched.append(out)
            else:
                out_view = _shape(nxt)
                if not _static(out_view):
                    raise NoMatch("the output is used as 3-D with symbolic sizes; fused only with static shapes")
        return nxt, out, out_view

    # ------------------------------------------------------------------ SiLU (HSTU) attention
    def match_silu(self, sig: fx.Node) -> "SiluMatch | None":
        """``(SiLU(q @ kᵀ + bias) * c * mask) @ v`` around the sigmoid ``sig`` of ``x * sigmoid(x)``; None when
        the SiLU is not applied to attention scores (a feed-forward SiLU); NoMatch says why one that is
        cannot be fused."""
        x = sig.args[0]
        silu = [u for u in sig.users if _is(u, aten.mul.Tensor) and set(u.args[:2]) == {x, sig}]
        if len(silu) != 1 or len(sig.users) != 1 or len(_shape(x)) not in (3, 4):
            return None
        silu = silu[0]
        rank = len(_shape(x))
        start, upcast = x, []
        if _is_cast(x) and val(x).dtype == torch.float32 and val(x.args[0]).dtype.is_floating_point:
            start, upcast = x.args[0], [x]  # SiLU of bf16/fp16 scores decomposes through fp32 (the op's dtype)
            if len(start.users) != 1:
                raise NoMatch(f"the scores %{start.name} are used elsewhere")
        # ---------------------------------------------------------------- before the SiLU: q @ kᵀ + biases
        biases, pre, node = [], [], start
        while not (_is(node, aten.bmm.default) or (_is(node, aten.view.default) and _is(node.args[0], aten.bmm.default))):
            if not _is(node, aten.add.Tensor) or node.kwargs.get("alpha", 1) != 1:
                return None  # not scores: a feed-forward SiLU, or something else
            a, b = node.args[:2]
            a_on, b_on = self._on_chain(a), self._on_chain(b)
            if a_on == b_on or not isinstance(a if b_on else b, fx.Node):
                return None
            on, bias = (a, b) if a_on else (b, a)
            if _is_cast(bias) and val(bias.args[0]).dtype.is_floating_point:
                bias = bias.args[0]  # the op adds the bias in fp32: no per-layer copy in the scores' dtype
            biases.append(bias)
            pre.append(node)
            node = on
        root = node
        bmm1 = root if _is(root, aten.bmm.default) else root.args[0]
        for n in pre:
            if len(n.users) != (2 if n is x else 1):
                raise NoMatch(f"the scores %{n.name} are used elsewhere")
        for bias in biases:
            if not val(bias).dtype.is_floating_point:
                raise NoMatch(f"the bias %{bias.name} added to the scores is {val(bias).dtype}")
        if rank == 4 and root is bmm1:
            raise NoMatch("the scores are not reshaped to [B, H, S, T] after the matmul")
        for n in {root, bmm1}:
            if len(n.users) != (2 if n is x else 1):  # the scores themselves feed the sigmoid and the product
                raise NoMatch(f"the scores %{n.name} are used elsewhere")
        matched = [sig, silu] + upcast + pre + list({root, bmm1})
        # ---------------------------------------------------------------- after the SiLU: scale, mask, @ v
        scale, masks, node = 1.0, [], silu
        while True:
            nxt = _single_user(node)
            if _is(nxt, aten.mul.Tensor, aten.div.Tensor):
                a, b = nxt.args[:2]
                other = b if a is node else a
                c = self.const.scalar(other)
                if c is not None:
                    if nxt.target is aten.div.Tensor:
                        if other is a or c == 0:
                            raise NoMatch(f"%{nxt.name} divides by the weights or by zero")
                        c = 1.0 / c
                    scale *= c
                elif nxt.target is aten.mul.Tensor and isinstance(other, fx.Node) and _bool_source(other) is not None:
                    masks.append((_bool_source(other), True))
                else:
                    raise NoMatch(f"%{nxt.name} multiplies the weights by a value that is neither a constant nor a "
                                  "boolean mask")
            elif _is(nxt, aten.where.self):
                cond, a, b = nxt.args
                zero_a, zero_b = self.const.scalar(a) == 0.0, self.const.scalar(b) == 0.0
                if a is node and zero_b:
                    masks.append((cond, True))
                elif b is node and zero_a:
                    masks.append((cond, False))
                else:
                    raise NoMatch(f"%{nxt.name} selects the weights against a value other than zero")
                if self._on_chain(cond):
                    raise NoMatch(f"%{nxt.name} masks the weights with a condition computed from the scores")
            elif _is_cast(nxt) and val(nxt).dtype.is_floating_point:
                pass
            else:
                break
            matched.append(nxt)
            node = nxt
        p3, nxt = self._through_view(node, nxt, rank, matched)
        bmm2, out, out_view = self._value_product(p3, nxt, rank, matched,
                                                  "the SiLU weights do not feed a matmul with v (they feed %{})")
        for n in [silu] + [m for m in matched if m not in pre + upcast and m not in (sig, root, bmm1, bmm2, out)]:
            if _key(_shape(n)) != _key(_shape(x)) and not _is(n, aten.view.default):
                raise NoMatch(f"%{n.name} changes the weights' shape to {_shape(n)} (a mask broadcast past the scores)")
        a, b = bmm1.args
        if rank == 4:
            B, H = _shape(root)[:2]
            q, k, v = self.as_4d(a, B, H), self.k_as_4d(b, B, H), self.as_4d(bmm2.args[1], B, H)
        else:
            q, k, v = ("view", a, [1] + _shape(a)), ("view", b, [1] + _shape(b)), ("view", bmm2.args[1], [1] + _shape(bmm2.args[1]))
            k = ("permute", k)
        for t in (q, k, v):
            _check_realizable(t)
        if not (_dtype(q) == _dtype(k) == _dtype(v)):
            raise NoMatch(f"q, k, v have different dtypes ({_dtype(q)}, {_dtype(k)}, {_dtype(v)})")
        for t in biases + [m for m, _ in masks]:
            if len(_shape(t)) > len(_shape(x)):
                raise NoMatch(f"%{t.name} has more dimensions than the scores")
        rel, kept = {}, []
        if rank == 4 and self.visibility_rule:  # HSTU's visibility rule: the kernel applies it from the rows' lengths
            for cond, keep in list(masks):
                rule = self.visibility(cond, _shape(x)) if keep and "lengths" not in rel else None
                if rule is not None:
                    masks.remove((cond, keep))
                    rel["lengths"], rel["history"] = rule
        for bias in biases:  # HSTU's relative bias: the kernel computes it from its ingredients
            parts = self.relative_bias(bias, _shape(x)) if rank == 4 and "pos_weight" not in rel \
                and "time_weight" not in rel else None
            if parts is None:
                kept.append(bias)
            else:
                rel.update(parts[0])
                kept += parts[1]
        return SiluMatch(q, k, v, out, scale, kept, masks, rank, out_view, matched, rel)

    def relative_bias(self, bias: fx.Node, scores: list):
        """``({positions, pos_weight, timestamps, time_weight, time_divisor}, other terms)`` when ``bias`` is
        ``unsqueeze(terms, 1)`` and some of its float32 terms are HSTU's relative position or time bias
        (``mmcompile.hstu_attention`` defines them) computed from [B, N] integer sequences of these
        scores; None when none is."""
        if not (_is(bias, aten.unsqueeze.default) and bias.args[1] == 1) or scores[2] != scores[3]:
            return None
        terms, stack = [], [bias.args[0]]
        while stack:
            t = stack.pop()
            if _is(t, aten.add.Tensor) and t.kwargs.get("alpha", 1) == 1 and all(isinstance(a, fx.Node) for a in t.args[:2]):
                stack += list(t.args[:2])
            else:
                terms.append(t)
        found, rest = {}, []
        for t in terms:
            u = t.args[0] if _is_cast(t) and val(t).dtype == torch.float32 else t
            if val(t).dtype != torch.float32:
                rest.append(t)
                continue
            pos = None if "positions" in found else self._position_term(u, scores)
            time = None if pos is not None or "timestamps" in found else self._time_term(u, scores)
            if pos is not None:
                found.update(positions=pos[0], pos_weight=pos[1])
            elif time is not None:
                found.update(timestamps=time[0], time_weight=time[1], time_divisor=time[2])
            else:
                rest.append(t)
        if not found:
            return None
        return found, [self._new_view(r, [_shape(r)[0], 1] + _shape(r)[1:]) if len(_shape(r)) == 3 else r
                       for r in rest] if rest else []

    def visibility(self, cond: fx.Node, scores: list):
        """``(lengths, history or None)`` — ``[B, 1, 1]`` nodes — when ``cond`` is ``unsqueeze(rule, 1)`` and
        ``rule`` [B, N, N] is the conjunction of ``j <= i``, ``i < lengths`` and optionally ``(i < history)
        | (j < history) | (j == i)``, with i and j the query and key indices (``mmcompile.hstu_attention``'s
        visibility); None otherwise."""
        if not (_is(cond, aten.unsqueeze.default) and cond.args[1] == 1) or scores[2] != scores[3]:
            return None
        n, B = scores[2], scores[0]
        if not isinstance(n, int) or _key(_shape(cond.args[0])) != _key([B, n, n]):
            return None

        def flat(node, ops):
            if _is(node, *ops):
                return flat(node.args[0], ops) + flat(node.args[1], ops)
            return [node]

        def index(node):  # "i" (queries, along dim 1), "j" (keys, along dim 2) or None
            if not isinstance(node, fx.Node) or depends_on_input(node):
                return None
            try:
                t = self.const(node)
            except Exception:  # noqa: BLE001 - not evaluable here: not an index
                return None
            if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.numel() != n:
                return None
            ar = torch.arange(n)
            if tuple(t.shape)[-2:] == (n, 1) and torch.equal(t.reshape(-1).cpu(), ar):
                return "i"
            if tuple(t.shape)[-1:] == (n,) and torch.equal(t.reshape(-1).cpu(), ar):
                return "j"
            return None

        def row(node):  # a per-row integer [B, 1, 1] that depends on the inputs
            if not isinstance(node, fx.Node) or _key(_shape(node)) != _key([B, 1, 1]):
                return None
            v = val(node)
            return node if not v.dtype.is_floating_point and v.dtype != torch.bool else None

        def compare(node):  # ("le", a, b) meaning a <= b, ("lt", a, b), ("eq", a, b), with ge/gt flipped
            table = {aten.le.Tensor: ("le", False), aten.ge.Tensor: ("le", True), aten.lt.Tensor: ("lt", False),
                     aten.gt.Tensor: ("lt", True), aten.eq.Tensor: ("eq", False)}
            if not isinstance(node, fx.Node) or node.target not in table or len(node.args) != 2:
                return None
            kind, flip = table[node.target]
            a, b = node.args
            return (kind, b, a) if flip else (kind, a, b)

        and_ops = (aten.bitwise_and.Tensor, aten.logical_and.default)
        or_ops = (aten.bitwise_or.Tensor, aten.logical_or.default)
        causal, lengths, history = False, None, None
        for c in flat(cond.args[0], and_ops):
            cmp = compare(c)
            if cmp is not None:
                kind, a, b = cmp
                ia, ib = index(a), index(b)
                if kind == "le" and (ia, ib) == ("j", "i"):
                    causal = True
                    continue
                if kind == "lt" and ia == "i" and row(b) is not None and lengths is None:
                    lengths = b
                    continue
                return None
            parts = [compare(d) for d in flat(c, or_ops)]
            if history is not None or len(parts) != 3 or None in parts:
                return None
            found = set()
            h = None
            for kind, a, b in parts:
                ia, ib = index(a), index(b)
                if kind == "eq" and {ia, ib} == {"i", "j"}:
                    found.add("self")
                elif kind == "lt" and ia in ("i", "j") and row(b) is not None and (h is None or b is h):
                    h = b
                    found.add(ia)
            if found != {"self", "i", "j"}:
                return None
            history = h
        if not causal or lengths is None:
            return None
        as_rows = lambda t: None if t is None else self._new_view(t, [B])  # noqa: E731
        return as_rows(lengths), as_rows(history)

    def _table(self, index: fx.Node):
        """(table, index) of ``table[index]`` with a constant 1-D table."""
        if not _is(index, aten.index.Tensor) or len(index.args[1]) != 1:
            return None
        table = index.args[0]
        if not isinstance(table, fx.Node) or table.op != "get_attr" or val(table).dim() != 1:
            return None
        return table, index.args[1][0]

    @staticmethod
    def _sequence_pair(sub: fx.Node, first_dim: int, scores: list):
        """``s`` when ``sub`` is ``s.unsqueeze(first_dim) - s.unsqueeze(3 - first_dim)`` for an integer
        ``s`` [B, N] of the scores' B and N."""
        if not _is(sub, aten.sub.Tensor) or sub.kwargs.get("alpha", 1) != 1:
            return None
        a, b = sub.args[:2]
        if not (_is(a, aten.unsqueeze.default) and _is(b, aten.unsqueeze.default)) or a.args[0] is not b.args[0]:
            return None
        if (a.args[1], b.args[1]) != (first_dim, 3 - first_dim):
            return None
        s = a.args[0]
        v = val(s)
        if v.dim() != 2 or v.dtype.is_floating_point or v.dtype == torch.bool or _key(list(v.shape)) != _key([scores[0], scores[2]]):
            return None
        return s

    def _position_term(self, node: fx.Node, scores: list):
        """(positions, table) of ``table[clamp(p_j - p_i, -off, off) + off]`` with a table of 2 off + 1."""
        got = self._table(node)
        if got is None:
            return None
        table, idx = got
        size = val(table).shape[0]
        off = (size - 1) // 2
        if size % 2 == 0 or not _is(idx, aten.add.Tensor) or self.const.scalar(idx.args[1]) != off:
            return None
        clamp = idx.args[0]
        if not _is(clamp, aten.clamp.default) or len(clamp.args) != 3 or \
                (self.const.scalar(clamp.args[1]), self.const.scalar(clamp.args[2])) != (-off, off):
            return None
        p = self._sequence_pair(clamp.args[0], 1, scores)
        return None if p is None else (p, table)

    def _time_term(self, node: fx.Node, scores: list):
        """(timestamps, table, divisor) of ``table[clamp(long(floor(log(float(clamp(|t_i - t_j|, min=1)))
        / divisor)), 0, T-1)]``."""
        got = self._table(node)
        if got is None:
            return None
        table, idx = got
        top = val(table).shape[0] - 1
        chain = []
        if not _is(idx, aten.clamp.default) or len(idx.args) != 3 or \
                (self.const.scalar(idx.args[1]), self.const.scalar(idx.args[2])) != (0, top):
            return None
        n = idx.args[0]
        for want in ("long", "floor", "div", "log", "float", "clamp1", "abs"):
            if want in ("long", "float"):
                dtype = torch.int64 if want == "long" else torch.float32
                if not (_is_cast(n) and val(n).dtype == dtype and set(n.kwargs) <= {"dtype"}):
                    return None
            elif want == "div":
                if not _is(n, aten.div.Tensor) or self.const.scalar(n.args[1]) in (None, 0):
                    return None
                chain.append(float(self.const.scalar(n.args[1])))
            elif want == "clamp1":
                if not (_is(n, aten.clamp.default) and self.const.scalar(n.args[1]) == 1
                        and (len(n.args) < 3 or n.args[2] is None)):
                    return None
            else:
                if not _is(n, {"floor": aten.floor.default, "log": aten.log.default, "abs": aten.abs.default}[want]):
                    return None
            n = n.args[0]
        t = self._sequence_pair(n, 2, scores) or self._sequence_pair(n, 1, scores)  # |t_i - t_j| either way
        return None if t is None else (t, table, chain[0])

    # ------------------------------------------------------------------ q / k / v
    def as_4d(self, node3: fx.Node, B: int, H: int) -> fx.Node:
        """The [B, H, S, D] tensor a 3-D bmm operand [B*H, S, D] was viewed from (or a new view).
        A contiguous copy made only for the matmul is skipped: the fused op reads any strides."""
        if _is(node3, aten.view.default):
            src = _skip_clone(node3.args[0])
            shp = _shape(src)
            if len(shp) == 4 and _key(shp) == _key([B, H] + _shape(node3)[1:]):  # the view only merges B and H
                return src
        return self._new_view(node3, [B, H] + _shape(node3)[1:])  # unrepeat() looks through it

    def k_as_4d(self, b: fx.Node, B: int, H: int) -> fx.Node:
        """k as [B, H, T, D] from the bmm's right operand [B*H, D, T] (= kᵀ)."""
        if _is(b, aten.view.default):
            src = _skip_clone(b.args[0])
            shp = _shape(src)
            if len(shp) == 4 and _key(shp) == _key([B, H] + _shape(b)[1:]) and _is(src, aten.permute.default):
                perm = list(src.args[1])
                unswapped = perm[:2] + [perm[3], perm[2]]
                if unswapped == [0, 1, 2, 3]:
                    return src.args[0]
                return ("permute_to", src.args[0], unswapped)
        d, t = _shape(b)[1:]
        kt4 = self._new_view(b, [B, H, d, t])
        return ("permute", kt4)  # type: ignore[return-value]  (made when the match is applied)

    def _transpose_last(self, b: fx.Node):
        if _is(b, aten.permute.default) and list(b.args[1]) == [0, 2, 1]:
            return b.args[0]
        return ("permute3", b)

    def _new_view(self, node: fx.Node, shape: list):
        return ("view", node, shape)  # made when the match is applied; see _check_realizable

    def peel_scale(self, node):
        """Strip ``mul``/``div`` by constants applied to q or k alone (only when nothing else reads them)."""
        scale = 1.0
        while _is(node, aten.mul.Tensor, aten.div.Tensor) and len(node.users) == 1:
            c = self.const.scalar(node.args[1])
            if c is None or c == 0:
                break
            scale *= c if node.target is aten.mul.Tensor else 1.0 / c
            node = node.args[0]
        return node, scale

    def unrepeat(self, original):
        """kv [B, Hkv, T, D] and the repeat r when ``original`` is kv repeated per head (repeat_kv /
        repeat_interleave: head h reads kv head h // r, as SDPA's enable_gqa); (original, 0) otherwise."""
        node = original[1] if isinstance(original, tuple) and original[0] == "view" else original
        if not _is(node, aten.view.default):
            return original, 0
        src = node.args[0]
        if _is(src, aten.clone.default):
            src = src.args[0]
        if not _is(src, aten.expand.default):
            return original, 0
        base = src.args[0]
        if not (_is(base, aten.unsqueeze.default) and base.args[1] == 2):
            return original, 0
        kv = base.args[0]
        kvs, exp = _shape(kv), _shape(src)
        if len(kvs) != 4 or len(exp) != 5 or not isinstance(exp[2], int) \
                or _key(exp[:2]) != _key(kvs[:2]) or _key(exp[3:]) != _key(kvs[2:]):
            return original, 0
        return kv, exp[2]


@register
class FuseAttention(Pass):
    """Recognize softmax attention by what it computes and fuse it into scaled_dot_product_attention.

    Option ``visibility_rule`` (default True): HSTU's causal-and-jagged mask reaches the fused op as the
    rows' lengths and candidate counts; False passes the mask tensor instead."""

    name = "fuse_attention"
    options = ("visibility_rule",)
    requires = ("canonicalize",)

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        graph = program.graph
        already = [n for n in graph.nodes if _is(n, SDPA)]
        if already:
            report.stats["already_fused"] = len(already)
        for node in already:
            self.unrepeat_existing(program, node, report)
            self.causal_existing(program, node, report)
        if report.stats["existing_causal"]:
            report.note(f"{report.stats['existing_causal']} SDPA call(s) under a constant causal mask became is_causal")
        self._masks: dict = {}  # masks shared by every layer are built once
        for softmax in [n for n in graph.nodes if _is(n, *SOFTMAX)]:
            matcher = _Matcher(program)
            try:
                m = matcher.match(softmax)
                self.apply(program, m, matcher, report)
            except NoMatch as e:
                report.stats["not_fused"] += 1
                report.note(f"softmax %{softmax.name} not fused: {e}")
        for sig in [n for n in graph.nodes if _is(n, aten.sigmoid.default)]:
            if getattr(sig, "_erased", False):
                continue
            matcher = _Matcher(program, visibility_rule=bool(options.get("visibility_rule", True)))
            try:
                sm = matcher.match_silu(sig)
                if sm is not None:
                    self.apply_silu(program, sm, report)
            except NoMatch as e:
                report.stats["not_fused"] += 1
                report.note(f"SiLU attention at %{sig.name} not fused: {e}")
        return report

    def apply_silu(self, program: Program, m: SiluMatch, report: PassReport) -> None:
        """Replace a matched SiLU attention by ``mmcompile::hstu_attention`` (biases summed, masks and-ed,
        both as 4-D tensors that broadcast to the scores)."""
        gm = program.graph_module
        mk = lambda target, args, kwargs=None: insert_call(self.name, gm, m.out, target, tuple(args), kwargs)  # noqa: E731

        realize = lambda x: _realize(x, mk)  # noqa: E731

        def as_4d(t):
            while len(_shape(t)) < 4:
                t = mk(aten.unsqueeze.default, (t, 0))
            return t

        q, k, v = realize(m.q), realize(m.k), realize(m.v)
        bias = None
        for b in m.biases:
            b = realize(b)
            bias = b if bias is None else mk(aten.add.Tensor, (bias, b))
        mask = None
        for cond, keep_when_true in m.masks:
            c = cond if keep_when_true else mk(aten.logical_not.default, (cond,))
            mask = c if mask is None else mk(aten.logical_and.default, (mask, c))
        bias = as_4d(bias) if bias is not None else None
        mask = as_4d(mask) if mask is not None else None
        rel = m.relative
        rows = [realize(rel[k]) if rel.get(k) is not None else None for k in ("lengths", "history")]
        fused = mk(torch.ops.mmcompile.hstu_attention.default,
                   (q, k, v, bias, mask, m.scale, rel.get("positions"), rel.get("pos_weight"), rel.get("timestamps"),
                    rel.get("time_weight"), rel.get("time_divisor", 0.301), *rows))
        if m.rank == 3:
            fused = mk(aten.view.default, (fused, _shape(m.out)))
        elif m.out_view is not None:
            fused = mk(aten.view.default, (fused, m.out_view))
        m.out.replace_all_uses_with(fused)
        matched = set(m.matched)
        _erase_dead(program.graph, [n for n in reversed(list(program.graph.nodes)) if n in matched])
        report.count("fused")
        report.stats["fused.silu"] += 1
        if "pos_weight" in rel or "time_weight" in rel:
            report.stats["fused.silu_relative_bias"] += 1
        if "lengths" in rel:
            report.stats["fused.silu_visibility"] += 1

    def causal_existing(self, program: Program, node: fx.Node, report: PassReport) -> None:
        """An SDPA the model already calls under a mask that does not depend on the inputs and evaluates to
        the causal pattern on square scores (transformers' sdpa attention builds one for a prompt that
        fills its cache): ``is_causal=True`` without the mask, which flash kernels compute by skipping the
        masked half instead of reading a mask. Boolean masks, or additive ones whose hidden entries are
        at most float16's lowest value (their weight is exactly zero in the softmax)."""
        a = sdpa_arguments(node)
        mask = a.get("attn_mask")
        if not isinstance(mask, fx.Node) or a.get("is_causal") or a.get("dropout_p") or depends_on_input(mask):
            return
        q, k = _shape(a["query"]), _shape(a["key"])
        if len(q) < 2 or not _static(q + k) or q[-2] != k[-2]:
            return
        try:
            total = ConstantEvaluator(program.graph_module)(mask)
        except Exception as e:  # noqa: BLE001 - cannot evaluate here: the mask stays
            report.note(f"%{node.name}: its constant mask could not be evaluated ({type(e).__name__}); kept")
            return
        n = q[-2]
        if not isinstance(total, torch.Tensor) or total.dim() < 2 or tuple(total.shape[-2:]) != (n, n):
            return
        visible = total if total.dtype == torch.bool else total > float(torch.finfo(torch.float16).min)
        if total.dtype != torch.bool and bool((total[visible] != 0).any()):
            return  # a bias, not only a mask
        if not bool((visible == torch.ones(n, n, dtype=torch.bool, device=visible.device).tril()).all()):
            return
        args = list(node.args) + [None] * (6 - len(node.args))
        args[3], args[5] = None, True
        args[4] = a.get("dropout_p", 0.0)
        node.args = tuple(args)
        node.kwargs = {key: v for key, v in node.kwargs.items() if key not in SDPA_ARGUMENTS}
        _erase_dead(program.graph, [mask])
        report.count("existing_causal")

    def unrepeat_existing(self, program: Program, node: fx.Node, report: PassReport) -> None:
        """An SDPA the model already calls, on k/v repeated per head (transformers' sdpa attention with
        GQA): read them un-repeated with ``enable_gqa=True`` instead."""
        if node.kwargs.get("enable_gqa") or len(node.args) < 3:
            return
        matcher = _Matcher(program)
        old_k, old_v = node.args[1], node.args[2]
        (k, rk), (v, rv) = matcher.unrepeat(old_k), matcher.unrepeat(old_v)
        if not rk or rk != rv or isinstance(k, tuple) or isinstance(v, tuple):
            return
        q = _shape(node.args[0])
        if len(q) != 4 or len(_shape(old_k)) != 4 or len(_shape(k)) != 4 or _key([_shape(k)[1] * rk]) != _key([q[1]]):
            return  # 3-D attention (heads folded into the batch) or a repeat that does not map heads as GQA does
        old = val(node)
        node.update_arg(1, k)
        node.update_arg(2, v)
        node.update_kwarg("enable_gqa", True)
        new = node.meta["val"] = fake_value(program.graph_module, SDPA, node.args, node.kwargs)
        if _strides(new) != _strides(old):
            # Another kernel serves GQA on this device and lays its output out differently; users of the
            # output may be views that rely on the old layout, so restore it (one copy of the output).
            self._restore_layout(program, node, old)
        _erase_dead(program.graph, [old_k, old_v])
        report.count("gqa_unrepeated")

    def _restore_layout(self, program: Program, node: fx.Node, old: torch.Tensor) -> None:
        order = sorted(range(old.dim()), key=lambda d: (-old.stride()[d], d))  # outermost first
        inverse = [order.index(d) for d in range(old.dim())]
        users = list(node.users)
        after = node.next
        mk = lambda target, *args, **kw: insert_call(self.name, program.graph_module, after, target, args, kw)  # noqa: E731
        dense = mk(aten.clone.default, mk(aten.permute.default, node, order), memory_format=torch.contiguous_format)
        back = mk(aten.permute.default, dense, inverse)
        for u in users:
            u.replace_input_with(node, back)

    # ------------------------------------------------------------------ rewrite
    def apply(self, program: Program, m: Match, matcher: _Matcher, report: PassReport) -> None:
        gm = program.graph_module
        out = m.out
        mk = lambda target, args, kwargs=None: insert_call(self.name, gm, out, target, tuple(args), kwargs)  # noqa: E731

        realize = lambda x: _realize(x, mk)  # noqa: E731

        # decide the mask before touching the graph: evaluation may still reject
        mask_plan = self.plan_mask(m, matcher)
        q, k, v = realize(m.q), realize(m.k), realize(m.v)
        dtype = val(q).dtype
        mask, is_causal = self.build_mask(mask_plan, mk, dtype)
        kwargs = {"scale": m.scale}
        if m.gqa:
            kwargs["enable_gqa"] = True
        fused = mk(SDPA, (q, k, v, mask, 0.0, is_causal), kwargs)
        result = fused if m.out_view is None else mk(aten.view.default, (fused, m.out_view))
        out.replace_all_uses_with(result)
        matched = set(m.matched)
        _erase_dead(program.graph, [n for n in reversed(list(program.graph.nodes)) if n in matched])
        report.count("fused")
        for tag, on in (("gqa", m.gqa), ("causal", is_causal), ("masked", mask is not None),
                        ("softmax_upcast", m.upcast), ("unscaled", m.scale == 1.0), ("bmm_3d", m.rank == 3)):
            if on:
                report.stats[f"fused.{tag}"] += 1

    def plan_mask(self, m: Match, matcher: _Matcher):
        """None (no mask), "causal" (an input-independent mask that evaluates to the causal pattern on
        square scores), or the list of terms to build."""
        if not m.terms:
            return None
        if not any(depends_on_input(t.value) for t in m.terms):
            try:
                total = self._evaluate(m.terms, matcher)
            except Exception:  # noqa: BLE001 - cannot evaluate here: keep the mask as a tensor
                total = None
            if total is not None and total.dim() >= 2 and total.shape[-1] == total.shape[-2]:
                blocked = total <= torch.finfo(torch.float32).min
                causal = torch.ones(total.shape[-2:], dtype=torch.bool, device=total.device).tril()
                if bool(((~blocked) == causal).all()) and bool((total[~blocked] == 0).all()):
                    return "causal"
        return m.terms

    def _evaluate(self, terms, matcher) -> torch.Tensor:
        total = None
        for t in terms:
            if t.fill is not None:
                cond = matcher.const(t.value).bool()
                keep = cond if t.keep_when_true else ~cond
                part = torch.zeros(keep.shape, device=keep.device).masked_fill(~keep, t.fill * t.factor)
            else:
                part = matcher.const(t.value).double() * t.factor
            total = part if total is None else total + part
        return total

    def build_mask(self, plan, mk, dtype):
        if plan is None:
            return None, False
        if plan == "causal":
            return None, True
        terms = plan
        key = (dtype,) + tuple((t.value, t.factor, t.fill, t.keep_when_true) for t in terms)
        if key not in self._masks:
            self._masks[key] = self._build_terms(terms, mk, dtype)
        return self._masks[key], False

    def _build_terms(self, terms, mk, dtype):
        if all(t.fill == -math.inf for t in terms):  # boolean masks only: one boolean attn_mask
            keep = None
            for t in terms:
                k = t.value if val(t.value).dtype == torch.bool else mk(CAST, (t.value,), {"dtype": torch.bool})
                if not t.keep_when_true:
                    negated = _is(k, aten.bitwise_not.default, aten.logical_not.default) and \
                        val(k.args[0]).dtype == torch.bool
                    k = k.args[0] if negated else mk(aten.logical_not.default, (k,))  # masked_fill(~m): keep m
                keep = k if keep is None else mk(aten.logical_and.default, (keep, k))
            return keep
        total = None
        for t in terms:
            if t.fill is not None:
                fill = t.fill * t.factor
                zero = mk(aten.full.default, ([], 0.0), {"dtype": dtype, "device": val(t.value).device})
                neg = mk(aten.full.default, ([], fill), {"dtype": dtype, "device": val(t.value).device})
                cond = t.value
                part = mk(aten.where.self, (cond, zero, neg) if t.keep_when_true else (cond, neg, zero))
            else:
                part = t.value
                if t.factor != 1.0:
                    part = mk(aten.mul.Tensor, (part, t.factor))
            if val(part).dtype != dtype:
                part = mk(CAST, (part,), {"dtype": dtype})
            total = part if total is None else mk(aten.add.Tensor, (total, part))
        return total


def _realize(x, mk):
    """The node a matcher's planned value stands for, made with ``mk(target, args)`` where it is a plan:
    ("view", x, shape), ("permute", x) (swap the last two of 4 dims), ("permute3", x) (of 3 dims),
    ("permute_to", x, dims)."""
    if not isinstance(x, tuple):
        return x
    if x[0] == "view":
        return mk(aten.view.default, (_realize(x[1], mk), x[2]))
    if x[0] == "permute":
        return mk(aten.permute.default, (_realize(x[1], mk), [0, 1, 3, 2]))
    if x[0] == "permute3":
        return mk(aten.permute.default, (_realize(x[1], mk), [0, 2, 1]))
    if x[0] == "permute_to":
        return mk(aten.permute.default, (_realize(x[1], mk), x[2]))
    raise AssertionError(x)


def _strides(t: torch.Tensor) -> tuple:
    """Strides that matter for views: those of dimensions longer than 1."""
    return tuple(st for st, n in zip(t.stride(), t.shape) if n != 1)


def _erase_dead(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` (users first) and then whatever they alone kept alive (views, repeat_kv chains)."""
    stack = list(reversed(nodes))
    while stack:
        n = stack.pop()
        if n.op == "call_function" and not n.users and not n.is_impure() and not getattr(n, "_erased", False):
            inputs = n.all_input_nodes
            graph.erase_node(n)
            stack.extend(inputs)
