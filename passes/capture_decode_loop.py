"""capture_decode_loop: prove a decode step can be replayed as a CUDA graph, and mark it.

A CUDA graph replays recorded kernel launches with no Python, no allocator and no host involvement,
which removes the CPU launch overhead that dominates decode. Replay is only correct when the step:

- has static shapes (no symbolic dimension in any input or intermediate);
- never synchronizes with the host (``.item()``, ``.tolist()``, ``nonzero`` and other ops whose output
  size depends on data, ``aten._local_scalar_dense``, assertions on tensor values);
- uses no random numbers (a replay would repeat the captured draw);
- reads and writes only device tensors on one device (no CPU tensor inputs or constants);
- updates state only in place, in buffers whose address never changes (the Generator owns them).

Produces: no graph change. ``program.metadata["capturable"]`` becomes True, or False with
``program.metadata["not_capturable"]`` listing every reason; the report repeats them as notes, so a
user sees exactly why CUDA graphs did not engage. The runtime replays a capturable decode step as one
CUDA graph per step, or K steps with on-device greedy sampling per graph; the same proof on a prefill
bucket or another phase that runs once per request (an encoder, a vocoder) lets it replay that phase as
one graph (``PhaseGraph``).
Requires: nothing (run it last: it judges the final graph). Backends: eager and inductor on CUDA.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program
from mmcompile.rewrite import val

from . import register

aten = torch.ops.aten

HOST_SYNC = {
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
    aten._assert_async.default, aten._assert_async.msg, aten.unique_consecutive.default,
    aten._unique2.default, aten.repeat_interleave.Tensor,
}


def _random(node: fx.Node) -> bool:
    t = node.target
    if not (isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags):
        return False
    if t is aten.scaled_dot_product_attention.default:  # random only through dropout
        p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        return p != 0.0
    return True


def reasons_not_capturable(program: Program) -> list[str]:
    """Every reason the Program's step cannot be replayed as a CUDA graph (empty: capturable)."""
    reasons: list[str] = []
    cpu_inputs, cpu_constants, devices = [], [], set()
    for node in program.graph.nodes:
        v = val(node)
        tensors = [t for t in (v if isinstance(v, (tuple, list)) else [v]) if isinstance(t, torch.Tensor)]
        for t in tensors:
            if any(not isinstance(d, int) for d in t.shape):
                reasons.append(f"%{node.name} has a dynamic shape {list(t.shape)}: a graph replays fixed sizes")
                break
        if node.op == "placeholder":
            devices.update(t.device for t in tensors)
            if any(t.device.type == "cpu" for t in tensors):
                cpu_inputs.append(node.name)
        if node.op == "get_attr":
            devices.update(t.device for t in tensors)
            if any(t.device.type == "cpu" and t.numel() > 1 for t in tensors):
                cpu_constants.append(node.target)
        if node.op != "call_function":
            continue
        if node.target in HOST_SYNC:
            reasons.append(f"%{node.name} ({node.target}) synchronizes with the host or has a data-dependent size")
        elif _random(node):
            reasons.append(f"%{node.name} ({node.target}) draws random numbers: a replay would repeat the same draw")
    if cpu_inputs:
        reasons.append(f"{len(cpu_inputs)} input(s) are CPU tensors ({', '.join(cpu_inputs[:3])}"
                       f"{', ...' if len(cpu_inputs) > 3 else ''}): CUDA graphs need every input on the GPU")
    if cpu_constants:
        reasons.append(f"{len(cpu_constants)} constant(s) live on the CPU ({', '.join(cpu_constants[:3])}"
                       f"{', ...' if len(cpu_constants) > 3 else ''}): move the model to the GPU")
    gpus = {d for d in devices if d.type == "cuda"}
    if len(gpus) > 1:
        reasons.append(f"the step spans several GPUs ({', '.join(sorted(map(str, gpus)))}): a graph runs on one")
    seen, unique = set(), []
    for r in reasons:
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique


@register
class CaptureDecodeLoop(Pass):
    """Prove a decode step replayable as a CUDA graph (static shapes, no host sync, no CPU tensors) and mark it."""

    name = "capture_decode_loop"
    options = ()

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        reasons = reasons_not_capturable(program)
        program.metadata["capturable"] = not reasons
        program.metadata["not_capturable"] = reasons
        report.stats["capturable" if not reasons else "not_capturable"] = 1
        for r in reasons:
            report.note(f"not capturable: {r}")
        return report
