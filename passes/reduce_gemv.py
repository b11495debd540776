"""reduce_gemv: batch-1 linear layers with large weights become multiply-and-sum reductions on the GPU.

Decode at batch 1 multiplies one row by every weight matrix: a GEMV, bound by reading the weight once.
On an H100, cuBLAS reaches about 0.82 of the copy bandwidth on the FFN shapes of a 7B model, while the
reduction Inductor generates from ``sum(x[:, None, :] * W, -1)`` (fp32 accumulation, the bf16 weight read
once, the casts fused into the loads) reaches 0.91-0.97; on small weights (4096 x 4096) cuBLAS is better
(``bench/gemv.py`` measures both). So the pass rewrites only where it wins.

Matches: ``aten.mm(x [M, K], aten.permute(W, [1, 0]))`` and ``aten.addmm(bias, x, aten.permute(W, [1, 0]))``
(``nn.Linear`` after capture) where ``W`` [N, K] is a constant, ``M <= max_rows`` (default 1: each row of a
larger M would read the weight again), ``N * K >= min_weight_elements`` (default 2**25) and the weight lives
on a device in ``devices`` (default ``("cuda",)``: on the CPU the BLAS GEMV is kept).
Produces: ``_to_copy(sum(mul(view(x, [M, 1, K]).f32, view(W, [1, N, K]).f32), [2]), dtype)`` (+ bias).
The sum is reassociated (as any kernel choice does); accumulation stays in fp32.
Requires: nothing. Not in the default pipeline: in a whole 7B decode step on an H100 Inductor fuses the
producers of ``x`` (RMSNorm, SiLU-gate) into the reduction's loads, recomputing them per output column,
and decode slowed from 157 to 151 tok/s although each GEMV alone is faster (docs/benchmarks.md). Opt in
with ``passes=[..., "reduce_gemv", ...]``. Backends: inductor (elsewhere correct, maybe slower).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program
from mmcompile.rewrite import insert_call, is_call, linear_parts, val

from . import register

aten = torch.ops.aten


@register
class ReduceGemv(Pass):
    """Rewrite batch-1 linear layers with large weights on CUDA into fp32 multiply-and-sum reductions."""

    name = "reduce_gemv"
    options = ("devices", "max_rows", "min_weight_elements")

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        max_rows = int(options.get("max_rows", 1))
        min_elements = int(options.get("min_weight_elements", 1 << 25))
        devices = tuple(options.get("devices", ("cuda",)))
        for node in list(program.graph.nodes):
            if not is_call(node, aten.mm.default, aten.addmm.default):
                continue
            if node.kwargs or (node.target is aten.addmm.default and len(node.args) > 3):
                continue  # addmm with beta/alpha
            parts = linear_parts(node)
            reason = ("the weight is not a float constant read transposed (not an nn.Linear)" if parts is None
                      else self._check(*parts, max_rows, min_elements, devices))
            if reason:
                report.stats["kept"] += 1
                if options.get("explain"):
                    report.note(f"%{node.name} kept as a matmul: {reason}")
                continue
            self._rewrite(program, node, *parts)
            report.count("rewritten")
        return report

    @staticmethod
    def _check(x, w, bias, max_rows, min_elements, devices) -> str | None:
        xv, w = val(x), val(w)
        if not isinstance(xv.shape[0], int) or xv.shape[0] > max_rows:
            return f"{xv.shape[0]} rows > max_rows={max_rows} (each row would read the weight again)"
        if w.numel() < min_elements:
            return f"weight {list(w.shape)} smaller than {min_elements} elements: the BLAS GEMV is faster there"
        if w.device.type not in devices:
            return f"weight on {w.device.type}, not one of {devices}"
        if not w.is_floating_point() or xv.dtype != w.dtype or (bias is not None and val(bias).dtype != w.dtype):
            return "mixed or non-float dtypes"
        return None

    def _rewrite(self, program: Program, node: fx.Node, x: fx.Node, w: fx.Node, bias) -> None:
        mk = lambda target, *args, **kw: insert_call(self.name, program.graph_module, node, target, args, kw)  # noqa: E731
        (M, K), (N, _) = val(x).shape, val(w).shape
        dtype = val(w).dtype
        xf = mk(aten._to_copy.default, mk(aten.view.default, x, [M, 1, K]), dtype=torch.float32)
        wf = mk(aten._to_copy.default, mk(aten.view.default, w, [1, N, K]), dtype=torch.float32)
        y = mk(aten.sum.dim_IntList, mk(aten.mul.Tensor, xf, wf), [2])  # [M, N], fp32
        if bias is not None:
            y = mk(aten.add.Tensor, y, bias)
        out = mk(aten._to_copy.default, y, dtype=dtype)
        node.replace_all_uses_with(out)
        program.graph.erase_node(node)
