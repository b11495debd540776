"""fold_constants: evaluate weight-only subgraphs once, at compile time.

Matches: maximal subgraphs whose inputs are all constants (``get_attr``: weights, buffers) — for
example a weight cast to another dtype, ``weight * scale``, ``1 + weight`` of a Gemma-style norm, a
RoPE table computed from a constant frequency vector. Pure factory ops (``arange``, ``full``) count as
constant inputs but are never folded on their own.
Produces: one new constant per subgraph output that has a non-constant user; the subgraph is erased
and its now-unused weights are deleted from the GraphModule.
Leaves alone, with a note when ``explain`` is on:
- subgraphs of layout ops only (permute, view, expand, ...): they cost nothing at run time and folding
  would copy the weight;
- subgraphs whose result is larger than their constant inputs (e.g. an ``expand`` being materialized):
  folding would trade a cheap op for memory;
- nondeterministic (random) ops and anything with symbolic shapes;
- subgraphs whose result is a graph output: the caller would get the constant itself (an alias it may mutate).
Requires: nothing. Run canonicalize first: it drops export's dtype assertions on weights, which would
otherwise keep a weight that was only cast (``w.to(fp16)``) alive beside its folded copy.
Backends: all.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program
from mmcompile.rewrite import ConstantEvaluator, ancestors

from . import register

aten = torch.ops.aten

LAYOUT_OPS = {
    aten.permute.default, aten.view.default, aten._unsafe_view.default, aten.expand.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.slice.Tensor, aten.select.int, aten.t.default, aten.transpose.int, aten.alias.default,
    aten.clone.default, aten.reshape.default,
}


def _is_static_tensor(node: fx.Node) -> bool:
    v = node.meta.get("val")
    return isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape)


def _foldable_op(node: fx.Node) -> bool:
    t = node.target
    if not isinstance(t, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in t.tags or node.is_impure():
        return False
    return _is_static_tensor(node)


@register
class FoldConstants(Pass):
    """Evaluate subgraphs that read only constants (weights, buffers) once, at compile time."""

    name = "fold_constants"
    options = ()

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        explain = options.get("explain", False)
        graph = program.graph
        gm = program.graph_module
        constant: set[fx.Node] = set()
        for node in graph.nodes:
            if node.op == "get_attr":
                constant.add(node)
            elif node.op == "call_function" and _foldable_op(node):
                inputs = node.all_input_nodes
                if all(i in constant for i in inputs):
                    constant.add(node)
        frontier = [
            n for n in graph.nodes
            if n in constant and n.op == "call_function" and n.all_input_nodes
            and any(u not in constant for u in n.users)
        ]
        evaluate = ConstantEvaluator(gm)

        for node in frontier:
            sub = ancestors(node)
            weights = [n for n in sub if n.op == "get_attr"]
            if not weights:
                continue  # factories only: computing them is as cheap as loading them
            ops = [n for n in sub if n.op == "call_function"]
            if all(n.target in LAYOUT_OPS for n in ops):
                if explain:
                    report.note(f"%{node.name} not folded: layout ops only ({', '.join(str(n.target) for n in ops)}) — free at run time, folding would copy the weight")
                continue
            if any(u.op == "output" for u in node.users):
                if explain:
                    report.note(f"%{node.name} not folded: it is a graph output, which would then alias a constant")
                continue
            out_numel = node.meta["val"].numel()
            in_numel = sum(n.meta["val"].numel() for n in weights if isinstance(n.meta.get("val"), torch.Tensor))
            if out_numel > in_numel:
                if explain:
                    report.note(f"%{node.name} not folded: result has {out_numel} elements, more than its {in_numel} constant elements")
                continue
            value = evaluate(node).contiguous()  # frontier nodes are static tensors (_foldable_op)
            new = program.add_constant(value.detach().clone() if value._base is not None else value.detach(),
                                       name=f"folded_{node.name}", before=_first_non_placeholder(graph))
            self.tag(new)
            node.replace_all_uses_with(new)
            report.count("subgraphs_folded")
            report.stats["ops_folded"] += len(ops)
        if report.changed:
            for node in reversed(list(graph.nodes)):
                if node in constant and not node.users and node.op in ("call_function", "get_attr"):
                    graph.erase_node(node)
            program.delete_unused_constants()
        return report




def _first_non_placeholder(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op != "placeholder")
