"""eliminate_dead_code: remove computations nothing uses, and constants nothing reads.

Matches: ``call_function`` and ``get_attr`` nodes without users that have no side effect
(``Node.is_impure()``: in-place state updates and runtime assertions stay).
Produces: the same graph minus those nodes; the GraphModule's unused tensor attributes are deleted,
so folded-away weights free their memory.
Requires: nothing. Runs last in the default pipeline to sweep up after other passes.
Backends: all (smaller graphs lower faster; dead weights are not shipped in artifacts).
"""

from __future__ import annotations

from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program

from . import register


@register
class EliminateDeadCode(Pass):
    """Remove side-effect-free nodes whose results are unused and constants nothing reads."""

    name = "eliminate_dead_code"
    options = ()

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        graph = program.graph
        for node in reversed(list(graph.nodes)):
            if node.op in ("call_function", "get_attr") and not node.users and not node.is_impure():
                graph.erase_node(node)
                report.count("nodes_removed")
        removed = program.delete_unused_constants()
        if removed:
            report.count("constants_removed", removed)
        return report
