"""fuse_rmsnorm: recognise RMSNorm and make it one ``mmcompile::rms_norm`` op.

Matches, after canonicalize (transformers' ``LlamaRMSNorm`` and our Llama's ``RMSNorm`` both give it):

    xf = _to_copy(x, f32)                      # or x itself when x is already f32
    r  = rsqrt(add(mean(pow(xf, 2), [-1], keepdim=True), eps))
    y  = mul(weight, _to_copy(mul(xf, r), x.dtype))   # the cast only when xf was cast; either operand order

with ``eps`` a number and ``weight`` a constant of shape ``[D]`` (D the last dimension of x).
Produces ``mmcompile::rms_norm(x, weight, eps)``, which the onnxruntime backend exports as ONNX's
``RMSNormalization`` and Inductor decomposes back into the same math (one fused kernel either way).
A candidate that does not fit is left alone with a note (explain=True). Requires: canonicalize.
Not in the default pipeline: it helps backends with a normalization kernel (onnxruntime), not Inductor.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

import mmcompile.ops  # noqa: F401  (registers mmcompile::rms_norm)
from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program
from mmcompile.rewrite import insert_call, is_call as _is, val

from . import register

aten = torch.ops.aten


def _other(mul: fx.Node, one: fx.Node):
    a, b = mul.args[:2]
    return b if a is one else a if b is one else None


def _match(rsqrt: fx.Node):
    """(x, weight, eps, output node) of the RMSNorm around ``rsqrt``; raises ValueError with the reason."""
    add = rsqrt.args[0]
    if not _is(add, aten.add.Tensor) or not isinstance(add.args[1], (int, float)):
        raise ValueError("the rsqrt does not read mean + a constant epsilon")
    mean = add.args[0]
    if not _is(mean, aten.mean.dim) or len(mean.args) < 3 or not mean.args[2]:
        raise ValueError("no keepdim mean under the rsqrt")
    pw = mean.args[0]
    if not _is(pw, aten.pow.Tensor_Scalar) or pw.args[1] != 2:
        raise ValueError("the mean is not of a square")
    xf = pw.args[0]
    last = val(xf).dim() - 1
    if list(mean.args[1]) not in ([last], [-1]):
        raise ValueError(f"the mean is over dims {list(mean.args[1])}, not the last")
    norm = next((u for u in rsqrt.users if _is(u, aten.mul.Tensor) and _other(u, rsqrt) is xf), None)
    if norm is None:
        raise ValueError("the rsqrt does not scale the same input it was computed from")
    x, out = xf, norm
    if _is(xf, aten._to_copy.default) and set(xf.kwargs) <= {"dtype"} and xf.kwargs.get("dtype") == torch.float32:
        x = xf.args[0]
        if val(x).dtype != torch.float32:  # upcast for the statistics: the result must be cast back
            back = next((u for u in norm.users if _is(u, aten._to_copy.default)
                         and set(u.kwargs) == {"dtype"} and u.kwargs["dtype"] == val(x).dtype), None)
            if back is None:
                raise ValueError("the normalized value is not cast back to the input dtype")
            out = back
    scale = next((u for u in out.users if _is(u, aten.mul.Tensor)), None)
    weight = _other(scale, out) if scale is not None else None
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and list(val(weight).shape) == [val(x).shape[-1]]):
        raise ValueError("the normalized value is not scaled by a constant weight of the last dimension's size")
    return x, weight, float(add.args[1]), scale


def _residual(x: fx.Node, weight: fx.Node):
    """(a, b) when the normalized value is ``add(a, b)`` of two tensors of its own shape and dtype whose
    sum is also read elsewhere (the residual stream of a pre-norm block), else None."""
    if not (_is(x, aten.add.Tensor) and len(x.args) == 2 and not x.kwargs
            and all(isinstance(t, fx.Node) for t in x.args)):
        return None
    a, b = x.args
    if any(val(t).shape != val(x).shape or val(t).dtype != val(x).dtype for t in (a, b)):
        return None
    others = [u for u in x.users if not _is(u, aten.pow.Tensor_Scalar, aten.mul.Tensor, aten._to_copy.default)]
    before = set()
    for n in x.graph.nodes:  # the fused op goes where the sum was: its weight must be read before that
        if n is x:
            break
        before.add(n)
    return (a, b) if others and weight in before else None


@register
class FuseRMSNorm(Pass):
    """Recognise RMSNorm (fp32 statistics, constant weight) and make it one mmcompile::rms_norm op."""

    name = "fuse_rmsnorm"
    options = ("skip",)
    requires = ("canonicalize",)

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        for node in [n for n in program.graph.nodes if _is(n, aten.rsqrt.default)]:
            try:
                x, weight, eps, out = _match(node)
            except ValueError as e:
                report.stats["not_fused"] += 1
                if options.get("explain"):
                    report.note(f"rsqrt %{node.name} not fused: {e}")
                continue
            skip = _residual(x, weight) if options.get("skip", True) else None
            if skip is not None:  # the sum is used again (the residual stream): one op gives both, where the sum was
                gm = program.graph_module
                both = insert_call(self.name, gm, x.next, torch.ops.mmcompile.skip_rms_norm.default,
                                   (*skip, weight, eps), origin=out)
                fused = insert_call(self.name, gm, both.next, operator.getitem, (both, 0), origin=out)
                total = insert_call(self.name, gm, fused.next, operator.getitem, (both, 1), origin=out)
                x.replace_all_uses_with(total)  # the norm's own statistics read it too; they are dead below
                out.replace_all_uses_with(fused)
                program.graph.erase_node(out)
                report.count("fused.skip")
            else:
                fused = insert_call(self.name, program.graph_module, out, torch.ops.mmcompile.rms_norm.default,
                                    (x, weight, eps))
                out.replace_all_uses_with(fused)
                program.graph.erase_node(out)
            report.count("fused")
        return report
