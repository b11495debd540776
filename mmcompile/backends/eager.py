"""eager: run the Program's GraphModule as it is — the reference every other backend is checked against."""

from __future__ import annotations

from typing import Any

from mmcompile.program import Program

from . import Backend, Compiled, check_options, register


@register
class EagerBackend(Backend):
    name = "eager"

    def lower(self, program: Program, options: dict[str, Any]) -> Compiled:
        check_options(self.name, options, ())
        return Compiled(program, program.graph_module, self.name)
