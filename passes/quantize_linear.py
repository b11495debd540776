"""quantize_linear: store linear-layer weights in int8 or int4 and compute with a fused dequantizing matmul.

Decode at batch 1 is bound by reading weights; int8 halves the bytes, int4 quarters them. Matches ``nn.Linear`` after
capture: ``aten.mm(x, aten.permute(W, [1, 0]))`` and ``aten.addmm(bias, x, aten.permute(W, [1, 0]))``
with ``W [N, K]`` a floating-point constant. Produces ``mmcompile::linear_int8(x, q, scales, bias)``
(int8 ``[N, K]``, per-output-channel scales) or ``mmcompile::linear_int4(x, packed, scales, zeros, bias)``
(two 4-bit codes per byte, scale and zero per group of ``group_size`` inputs), the layouts of
``mmcompile.quant``, as new constants; the float weight is dropped from the Program when nothing else
reads it. A layer whose input size is not a multiple of the int4 group falls back to int8, with a note.

Selection (options):

- ``mode``: ``"int8"`` (weight-only, per output channel) or ``"int4"`` (weight-only, ``group_size`` 32,
  64 or 128, default 128).
- ``layers``: glob patterns over weight names (``"*mlp*"``, ``"model.layers.*.self_attn.*"``); default all.
  ``exclude``: patterns to leave in floating point.
- ``lm_head``: also quantize the layer whose result is the model's output (off by default: the logits
  are where quantization error shows first). Embeddings are gathers, not matmuls, and are never touched.

The report counts ``quantized.int8`` / ``quantized.int4`` and notes each layer's choice and its weight error
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
from mmcompile.quant import INT4_GROUP_SIZES, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from mmcompile.rewrite import insert_call, val

from . import register

aten = torch.ops.aten
MODES = ("int8", "int4")
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
    """Store linear-layer weights in int8 or int4 and compute with a fused dequantizing matmul."""

    name = "quantize_linear"
    exact = False
    tolerance = 0.05  # relative error of a layer's output for int8 on well-scaled inputs (int4: about 0.15)

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        mode = options.get("mode", "int8")
        if mode not in MODES:
            raise ValueError(f"quantize_linear: mode must be one of {MODES}, got {mode!r}")
        include = list(options.get("layers", ["*"]))
        exclude = list(options.get("exclude", []))
        lm_head = bool(options.get("lm_head", False))
        group_size = int(options.get("group_size", 128))
        if mode == "int4" and group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantize_linear: group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
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
                layer_mode, fallback = mode, ""
                if mode == "int4" and weight.shape[1] % group_size:
                    layer_mode = "int8"
                    fallback = f" (input size {weight.shape[1]} is not a multiple of group_size={group_size})"
                if layer_mode == "int8":
                    q, scales = quantize_int8(weight)
                    deq = dequantize_int8(q, scales)
                    consts = [(q, "int8"), (scales.to(val(x).dtype), "scales")]
                else:
                    q, scales, zeros = quantize_int4(weight, group_size)
                    deq = dequantize_int4(q, scales, zeros)
                    consts = [(q, f"int4_g{group_size}"), (scales, "scales"), (zeros, "zeros")]
                err = float((deq - weight.float()).norm() / weight.float().norm().clamp_min(1e-30))
                nodes = [program.add_constant(t, f"{name}_{suffix}", before=node) for t, suffix in consts]
                packed[name] = (layer_mode, nodes)
                chosen[name] = {"mode": layer_mode, "weight_error": err, "shape": list(weight.shape)}
                if layer_mode == "int4":
                    chosen[name]["group_size"] = group_size
                report.note(f"{name} {list(weight.shape)} -> {layer_mode}{fallback}, weight error {err:.2%}")
            layer_mode, nodes = packed[name]
            op = torch.ops.mmcompile.linear_int8.default if layer_mode == "int8" else torch.ops.mmcompile.linear_int4.default
            new = insert_call(self.name, program.graph_module, node, op, (x, *nodes, bias))
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
            report.count(f"quantized.{layer_mode}")
        return report


def _get(program: Program, name: str) -> torch.Tensor:
    obj = program.graph_module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj
