"""fuse_linears: linear layers that read the same input become one matmul over their stacked weights.

Attention's q, k and v projections read the same normalized hidden state, and so do a gated FFN's gate
and up projections (and an encoder-decoder's cross-attention k and v). At decode time each is a GEMV
bound by reading its weight, and a GPU streams one large weight better than three small ones: on an
H100, one 4096 x 12288 GEMV takes 37 us against 3 x 16.3 us for q, k and v apart (``bench/gemv.py``),
and there are fewer kernels to launch.

Matches: two or more ``aten.mm(x, permute(W_i, [1, 0]))`` / ``aten.addmm(b_i, x, permute(W_i, [1, 0]))``
(``nn.Linear`` after capture) whose ``x`` is the same value — the same node, or views of one node to
the same shape — and whose ``W_i [N_i, K]`` are distinct float constants of one dtype and device.
Produces: one ``mm`` / ``addmm`` with ``W = cat(W_i)`` (biases concatenated; a layer without bias
contributes zeros) and ``slice(y, 1, a_i, a_i + N_i)`` for each former output. A consumer that cannot
read a column slice in place (a ``view`` its strides do not allow) gets a contiguous ``clone``.

Memory: the stacked weight is built once and the original weight tensors are re-pointed into it
(``W_i.data = W[a_i:a_i + N_i]``, the same values), so the model's parameters — which the Program reads
in place — take no extra memory, and a second Program of the same model (another prefill bucket, the
decode step) finds them already stacked and reuses that storage instead of copying again. Updates to
the model's weights in place (``load_state_dict``) reach the fused weight too.

Exact: each output column is the same dot product (kernels may order the sum differently, as any
kernel choice does). Options: ``min_layers`` (default 2), ``explain`` (notes for groups left alone).
Runs after ``fuse_attention`` in the default pipeline; ``quantize_linear`` after it quantizes the
fused weight (per output channel and per input group, the same numbers as the layers apart).
"""

from __future__ import annotations

import collections
import operator

import torch
import torch.fx as fx

from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program
from mmcompile.rewrite import insert_call, is_call, linear_parts, val

from . import register

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _source(x: fx.Node):
    """The key under which linears read the same value: views of one node to one shape are one input
    (shapes compared as text, so symbolic sizes compare too)."""
    shape = tuple(str(s) for s in val(x).shape)
    return (x.args[0], shape) if is_call(x, *_VIEWS) else (x, shape)


def _stacked(weights: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor the weights are consecutive row blocks of, if a previous fusion left them so."""
    first = weights[0]
    K = first.shape[1]
    storage = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for w in weights:
        if not w.is_contiguous() or w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset:
            return None
        offset += w.numel()
    return first.as_strided((sum(w.shape[0] for w in weights), K), (K, 1), first.storage_offset())


def _splits_columns(n: int, target) -> bool:
    """Whether ``view(target)`` of a column slice ``[M, n]`` (row stride larger than n) works: the
    target's trailing sizes must multiply to exactly n (rows split into the leading sizes, columns
    into the trailing ones)."""
    size = 1
    for t in reversed(list(target)):
        if size == n:
            return True
        if not isinstance(t, int) or t < 0:
            return False
        size *= t
    return size == n


@register
class FuseLinears(Pass):
    """Stack the weights of linear layers that read the same input into one matmul."""

    name = "fuse_linears"
    options = ("min_layers",)

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        min_layers = int(options.get("min_layers", 2))
        explain = options.get("explain")
        groups: dict = collections.defaultdict(list)
        for node in program.graph.nodes:
            parts = linear_parts(node)
            if parts is not None:
                groups[_source(parts[0])].append((node, *parts))
        for key, members in groups.items():
            if len(members) < min_layers:
                continue
            reason = self._check(members)
            if reason:
                report.stats["kept"] += 1
                if explain:
                    report.note(f"linears {', '.join('%' + m[0].name for m in members)} not fused: {reason}")
                continue
            self._fuse(program, members)
            report.count("fused", len(members))
            report.count("groups")
        if report.changed:
            program.delete_unused_constants()
        return report

    @staticmethod
    def _check(members) -> str | None:
        weights = [val(w) for _, _, w, _ in members]
        if len({w.target for _, _, w, _ in members}) < len(members):
            return "two of them read the same weight"
        if len({(t.dtype, t.device) for t in weights}) > 1:
            return "their weights differ in dtype or device"
        if any(any(not isinstance(s, int) for s in t.shape) for t in weights):
            return "a weight has a symbolic shape"
        for _, _, w, b in members:
            if b is not None and (not isinstance(b, fx.Node) or b.op != "get_attr" or val(b).dim() != 1
                                  or val(b).dtype != val(w).dtype):
                return f"the bias of %{w.name} is not a constant vector of the weight's dtype"
        return None

    def _fuse(self, program: Program, members) -> None:
        gm = program.graph_module
        first = members[0][0]
        x = members[0][1]
        tensors = [operator.attrgetter(w.target)(gm) for _, _, w, _ in members]
        sizes = [t.shape[0] for t in tensors]
        fused = _stacked(tensors)
        if fused is None:
            fused = torch.cat([t.detach() for t in tensors], 0)
            start = 0
            for t, n in zip(tensors, sizes):  # the originals become views of the stacked weight
                t.data = fused[start:start + n]
                start += n
        name = members[0][2].target.rsplit(".", 1)[0] + ".fused_weight"
        w_node = program.add_constant(fused, name, before=first)
        mk = lambda target, *args, **kw: insert_call(self.name, gm, first, target, args, kw)  # noqa: E731
        wt = mk(aten.permute.default, w_node, [1, 0])
        if any(b is not None for *_, b in members):
            bias = torch.cat([operator.attrgetter(b.target)(gm).detach() if b is not None
                              else torch.zeros(n, dtype=fused.dtype, device=fused.device)
                              for (*_, b), n in zip(members, sizes)])
            b_node = program.add_constant(bias, name.replace("fused_weight", "fused_bias"), before=first)
            y = mk(aten.addmm.default, b_node, x, wt)
        else:
            y = mk(aten.mm.default, x, wt)
        start = 0
        for (node, _, w, b), n in zip(members, sizes):
            out = insert_call(self.name, gm, node, aten.slice.Tensor, (y, 1, start, start + n), {}, origin=node)
            start += n
            for user in list(node.users):
                if is_call(user, *_VIEWS) and not _splits_columns(n, user.args[1]):
                    copy = insert_call(self.name, gm, user, aten.clone.default, (out,),
                                       {"memory_format": torch.contiguous_format}, origin=node)
                    user.replace_input_with(node, copy)
            node.replace_all_uses_with(out)
            permute = node.args[-1]
            program.graph.erase_node(node)
            for dead in (permute, w, b):  # the layer's own weight read, if nothing else reads it
                if isinstance(dead, fx.Node) and not dead.users:
                    program.graph.erase_node(dead)
