"""quantize_linear: store linear-layer weights in int8 and compute with a fused dequantizing matmul.

Decode at batch 1 is bound by reading weights; int8 halves the bytes. Matches ``nn.Linear`` after
capture: ``aten.mm(x, aten.permute(W, [1, 0]))`` and ``aten.addmm(bias, x, aten.permute(W, [1, 0]))``
with ``W [N, K]`` a floating-point constant. Produces ``mmcompile::linear_int8(x, q, scales, bias)``
with ``q`` int8 ``[N, K]`` and per-output-channel ``scales`` (``mmcompile.quant.quantize_int8``) as new
constants; the float weight is dropped from the Program when nothing else reads it.

Selection (options):

- ``mode``: ``"int8"`` (weight-only, per output channel).
- ``layers``: glob patterns over weight names (``"*mlp*"``, ``"model.layers.*.self_attn.*"``); default all.
  ``exclude``: patterns to leave in floating point.
- ``lm_head``: also quantize the layer whose result is the model's output (off by default: the logits
  are where quantization error shows first). Embeddings are gathers, not matmuls, and are never touched.

The report counts ``quantized.int8`` and notes each layer's choice and its weight error
(``‖W - dequant(q)‖ / ‖W‖``); ``program.metadata["quantization"]`` keeps the same per layer.
Lossy: ``exact = False`` with a stated relative tolerance on layer outputs. Requires: nothing.
Backends: eager (CPU: ``aten._weight_int8pack_mm``), inductor (decomposed into one fused kernel).
"""

from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx

import mmcompile.ops  # noqa: F401  (registers mmcompile::linear_int8)
from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program
from mmcompile.quant import dequantize_int8, quantize_int8
from mmcompile.rewrite import insert_call, val

from . import register

aten = torch.ops.aten
MODES = ("int8",)
_PASS_THROUGH = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten._to_copy.default,
                 aten.clone.default}


def _linear(node: fx.Node):
    """(x, weight get_attr node, bias) of an nn.Linear-shaped matmul, else None."""
    if node.op != "call_function" or node.kwargs:
        return None
    if node.target is aten.mm.default:
        bias, (x, wt) = None, node.args[:2]
    elif node.target is aten.addmm.default and len(node.args) == 3:
        bias, x, wt = node.args
    else:
        return None
    if not (isinstance(wt, fx.Node) and wt.target is aten.permute.default and list(wt.args[1]) == [1, 0]):
        return None
    w = wt.args[0]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and val(w).dim() == 2 and val(w).is_floating_point()):
        return None
    return x, w, bias


def _feeds_output(node: fx.Node) -> bool:
    """True when ``node``'s value reaches a graph output through views and casts only (the LM head)."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op == "output":
                return True
            if u.op == "call_function" and u.target in _PASS_THROUGH and u not in seen:
                seen.add(u)
                stack.append(u)
    return False


@register
class QuantizeLinear(Pass):
    """Store linear-layer weights in int8 (per output channel) and compute with a fused dequantizing matmul."""

    name = "quantize_linear"
    exact = False
    tolerance = 0.05  # relative error of a layer's output, int8 per channel, on well-scaled inputs

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        mode = options.get("mode", "int8")
        if mode not in MODES:
            raise ValueError(f"quantize_linear: mode must be one of {MODES}, got {mode!r}")
        include = list(options.get("layers", ["*"]))
        exclude = list(options.get("exclude", []))
        lm_head = bool(options.get("lm_head", False))
        chosen = program.metadata.setdefault("quantization", {})
        packed: dict[str, tuple[fx.Node, fx.Node, float]] = {}  # one int8 copy per weight, however many readers
        for node in list(program.graph.nodes):
            found = _linear(node)
            if found is None:
                continue
            x, w, bias = found
            name = w.target
            why = None
            if not any(fnmatch.fnmatch(name, p) for p in include):
                why = f"not matched by layers={include}"
            elif any(fnmatch.fnmatch(name, p) for p in exclude):
                why = f"excluded by {exclude}"
            elif not lm_head and _feeds_output(node):
                why = "the output layer (LM head); pass lm_head=True to quantize it"
            elif bias is not None and val(bias).dtype != val(x).dtype:
                why = "bias dtype differs from the activations"
            if why:
                report.stats["kept"] += 1
                report.note(f"{name} kept in {val(w).dtype}: {why}")
                continue
            if name not in packed:
                weight = _get(program, name).detach()
                q, scales = quantize_int8(weight.detach())
                err = float((dequantize_int8(q, scales) - weight.float()).norm() / weight.float().norm().clamp_min(1e-30))
                qn = program.add_constant(q, f"{name}_int8", before=node)
                sn = program.add_constant(scales.to(val(x).dtype), f"{name}_scales", before=node)
                packed[name] = (qn, sn, err)
                chosen[name] = {"mode": mode, "weight_error": err, "shape": list(weight.shape)}
                report.note(f"{name} {list(weight.shape)} -> {mode}, weight error {err:.2%}")
            qn, sn, _ = packed[name]
            new = insert_call(self.name, program.graph_module, node, torch.ops.mmcompile.linear_int8.default,
                              (x, qn, sn, bias))
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
            report.count(f"quantized.{mode}")
        return report


def _get(program: Program, name: str) -> torch.Tensor:
    obj = program.graph_module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj
