"""quantize_linear: linear layers in int8, int4, W8A8 or fp8, computed by fused quantized-matmul ops.

Decode at batch 1 is bound by reading weights; int8 halves the bytes, int4 quarters them. Matches ``nn.Linear`` after
capture: ``aten.mm(x, aten.permute(W, [1, 0]))`` and ``aten.addmm(bias, x, aten.permute(W, [1, 0]))``
with ``W [N, K]`` a floating-point constant. Produces ``mmcompile::linear_int8(x, q, scales, bias)``
(int8 ``[N, K]``, per-output-channel scales) or ``mmcompile::linear_int4(x, packed, scales, zeros, bias)``
(two 4-bit codes per byte, scale and zero per group of ``group_size`` inputs), the layouts of
``mmcompile.quant``, as new constants; the float weight is dropped from the Program when nothing else
reads it. A layer whose input size is not a multiple of the int4 group falls back to int8, with a note.

Selection (options):

- ``mode``: ``"int8"`` (weight-only, per output channel), ``"int4"`` (weight-only, ``group_size`` 32,
  64 or 128, default 128), ``"w8a8"`` (int8 weights and int8 activations scaled per row at run time,
  int32 accumulation: for prefill and large batches) or ``"fp8"`` (float8 e4m3 weights and activations;
  GPUs of compute capability 8.9+ and the CPU). A layer whose shape a mode cannot take
  (int4 group, w8a8/fp8 multiples of 8/16) stays int8, with a note.
- ``fp8_scales``: ``"row"`` (default: one scale per weight row, the activations one per row at run
  time) or ``"tensor"`` (one scale per weight, the activations one per tensor: a reduction over the
  whole activation before each product, and a coarser scale where a row has outliers).
- ``layers``: glob patterns over weight names (``"*mlp*"``, ``"model.layers.*.self_attn.*"``); default all.
  ``exclude``: patterns to leave in floating point.
- ``lm_head``: also quantize the layer whose result is the model's output (off by default: the logits
  are where quantization error shows first).
- ``embeddings``: also store the embedding tables (``aten.embedding`` of a constant table) in int8, one
  scale per row, read by ``mmcompile::embedding_int8`` (off by default). A gather reads one row per
  token, so this saves memory (half the table), not time. The ``layers``/``exclude`` patterns apply; a
  table the LM head shares (tied weights) and quantizes in int8 (``lm_head=True``) is stored once.
- ``mode="auto"``: per layer, run every candidate (``candidates``, default int8 and int4, plus the float
  layer itself) on the layer's real inputs — the Program run on its example inputs — measure its
  output error against the float layer and its time on the device, and keep the fastest whose error
  stays within ``error_budget`` (default 1%). Speed alone would pick int4 everywhere and leave users
  to find the accuracy drift; here the budget decides first. ``timer`` says whose kernels are timed:
  ``"inductor"`` (the default on CUDA) lowers each candidate product alone with the Inductor backend —
  the kernels the compiled model will run for it: mmcompile's GEMV kernels, tinygemm, Inductor's
  decompositions — and times it replayed from a CUDA graph with the L2 cache flushed before each call,
  once per distinct (mode, shape, dtype), since speed does not depend on the values; ``"eager"`` (the
  default on the CPU, where an Inductor compile per candidate costs more than it tells) times the ops as
  they run eagerly; a callable ``timer(mode, fn, device) -> seconds`` replaces the clock.

The report counts ``quantized.<mode>`` and notes each layer's choice and its weight error
(``‖W - dequant(q)‖ / ‖W‖``); ``program.metadata["quantization"]`` keeps the same per layer.
Lossy: ``exact = False`` with a stated relative tolerance on layer outputs. Requires: nothing.
Backends: eager (CPU: ``aten._weight_int8pack_mm``), inductor (decomposed into one fused kernel).
"""

from __future__ import annotations

import fnmatch
import time
from typing import Optional

import torch
import torch.fx as fx

import mmcompile.ops  # noqa: F401  (registers mmcompile::linear_int8)
from mmcompile.pipeline import Pass, PassReport
from mmcompile.program import Program
from mmcompile.quant import (INT4_GROUP_SIZES, dequantize_int4, dequantize_int8, quantize_fp8, quantize_int4,
                             quantize_int8)
from mmcompile.rewrite import insert_call, linear_parts, val

from . import register

aten = torch.ops.aten
MODES = ("int8", "int4", "w8a8", "fp8")
OPS = {"int8": "linear_int8", "int4": "linear_int4", "w8a8": "linear_w8a8", "fp8": "linear_fp8"}
MULTIPLE = {"w8a8": 8, "fp8": 16}  # sizes the int8 / fp8 GPU matmuls need both dimensions to be multiples of
_PASS_THROUGH = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten._to_copy.default,
                 aten.clone.default}


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
    """Quantize linear layers (int8 or int4 weight-only, W8A8, fp8) to mmcompile:: quantized-matmul ops."""

    name = "quantize_linear"
    options = ("mode", "layers", "exclude", "lm_head", "embeddings", "group_size", "fp8_scales", "error_budget",
               "candidates", "timer")
    exact = False
    tolerance = 0.05  # relative error of a layer's output for int8 on well-scaled inputs (int4: about 0.15)

    def run(self, program: Program, options: dict) -> PassReport:
        report = self.report()
        mode = options.get("mode", "int8")
        if mode not in MODES + ("auto",):
            raise ValueError(f"quantize_linear: mode must be one of {MODES + ('auto',)}, got {mode!r}")
        include = list(options.get("layers", ["*"]))
        exclude = list(options.get("exclude", []))
        lm_head = bool(options.get("lm_head", False))
        group_size = int(options.get("group_size", 128))
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantize_linear: group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        fp8_scales = options.get("fp8_scales", "row")
        if fp8_scales not in ("row", "tensor"):
            raise ValueError(f"quantize_linear: fp8_scales must be 'row' (one scale per weight row and activation "
                             f"row) or 'tensor' (one per tensor), got {fp8_scales!r}")
        embeddings = options.get("embeddings", False)
        if not isinstance(embeddings, bool):
            raise ValueError(f"quantize_linear: embeddings must be true or false, got {embeddings!r}")
        layers = []  # (node, x, weight node, bias) of every linear that may be quantized
        for node in list(program.graph.nodes):
            found = linear_parts(node)
            if found is None:
                continue
            x, w, bias = found
            name = w.target
            why = _unselected(name, include, exclude)
            if why is None and not lm_head and _feeds_output(node):
                why = "the output layer (LM head); pass lm_head=True to quantize it"
            if why is None and bias is not None and val(bias).dtype != val(x).dtype:
                why = "bias dtype differs from the activations"
            if why:
                report.stats["kept"] += 1
                report.note(f"{name} kept in {val(w).dtype}: {why}")
            else:
                layers.append((node, x, w, bias))
        if mode == "auto":
            modes = _choose(program, layers, options, group_size, report)
        else:
            modes = {w.target: _fits(mode, val(w).shape, group_size) for _, _, w, _ in layers}
        chosen = program.metadata.setdefault("quantization", {})
        packed: dict[str, tuple[str, list[fx.Node]]] = {}  # one quantized copy per weight, however many readers
        for node, x, w, bias in layers:
            name = w.target
            layer_mode, why = modes[name]
            if layer_mode == "float":
                continue
            if name not in packed:
                weight = _get(program, name).detach()
                consts, deq = _quantize(weight, layer_mode, group_size, val(x).dtype, fp8_scales)
                err = _relative(deq, weight)
                nodes = [program.add_constant(t, f"{name}_{suffix}", before=node) for t, suffix in consts]
                packed[name] = (layer_mode, nodes)
                entry = chosen.setdefault(name, {})
                entry.update(mode=layer_mode, weight_error=err, shape=list(weight.shape))
                if layer_mode == "int4":
                    entry["group_size"] = group_size
                if layer_mode == "fp8":
                    entry["fp8_scales"] = fp8_scales
                if mode != "auto":
                    report.note(f"{name} {list(weight.shape)} -> {layer_mode}{why}, weight error {err:.2%}")
            layer_mode, nodes = packed[name]
            op = getattr(torch.ops.mmcompile, OPS[layer_mode]).default
            new = insert_call(self.name, program.graph_module, node, op, (x, *nodes, bias))
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
            report.count(f"quantized.{layer_mode}")
        if embeddings:
            self._embeddings(program, include, exclude, packed, chosen, report)
        return report

    def _embeddings(self, program: Program, include: list, exclude: list, packed: dict, chosen: dict,
                    report: PassReport) -> None:
        """Each ``aten.embedding`` of a floating-point constant table in int8, one scale per row."""
        for node in list(program.graph.nodes):
            if not (node.op == "call_function" and node.target is aten.embedding.default):
                continue
            table, indices = node.args[0], node.args[1]
            if not (isinstance(table, fx.Node) and table.op == "get_attr"):
                report.note(f"%{node.name}: its table is not a constant; kept")
                continue
            name = table.target
            tensor = _get(program, name)
            weight = tensor.detach()
            if not weight.is_floating_point() or weight.dim() != 2:
                why = f"the table is {weight.dtype} of {weight.dim()} dimensions, not a floating-point matrix"
            else:
                why = _unselected(name, include, exclude)
            if why:
                report.stats["kept"] += 1
                report.note(f"{name} (embedding) kept in {weight.dtype}: {why}")
                continue
            # a tied LM head reads the same tensor, under its own name
            twin = next((other for other in packed if _get(program, other) is tensor), None)
            shared = packed.get(twin) if twin is not None else None
            if shared is not None and shared[0] == "int8" and val(shared[1][1]).dtype == weight.dtype:
                q_node, s_node = shared[1]  # the tied LM head's int8 copy: the same rows, the same scales
                node.prepend(q_node)  # read here first: constants read no inputs, so they move up freely
                node.prepend(s_node)
                note = f"the int8 copy of {twin}, the same tensor"
            else:
                consts, deq = _quantize(weight, "int8", 0, weight.dtype)  # per row: the linears' int8 layout
                err = _relative(deq, weight)
                q_node, s_node = [program.add_constant(t, f"{name}_{suffix}", before=node) for t, suffix in consts]
                packed[name] = ("int8", [q_node, s_node])
                chosen.setdefault(name, {}).update(mode="int8", weight_error=err, shape=list(weight.shape),
                                                   embedding=True)
                note = f"int8, one scale per row, weight error {err:.2%}"
            new = insert_call(self.name, program.graph_module, node, torch.ops.mmcompile.embedding_int8.default,
                              (q_node, s_node, indices))
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
            report.count("quantized.embedding_int8")
            report.note(f"{name} {list(weight.shape)} (embedding) -> {note}")


def _fits(mode: str, shape, group_size: int) -> tuple[str, str]:
    """``mode`` for a weight of ``shape`` [N, K], or int8 with the reason when the shape does not allow it."""
    N, K = shape
    if mode == "int4" and K % group_size:
        return "int8", f" (input size {K} is not a multiple of group_size={group_size})"
    if mode in MULTIPLE and (N % MULTIPLE[mode] or K % MULTIPLE[mode]):
        return "int8", f" ({mode} needs both sizes to be multiples of {MULTIPLE[mode]}; this weight is [{N}, {K}])"
    return mode, ""


def _unselected(name: str, include: list, exclude: list) -> Optional[str]:
    """Why the weight ``name`` is left out by the ``layers``/``exclude`` patterns, or None."""
    if not any(fnmatch.fnmatch(name, p) for p in include):
        return f"not matched by layers={include}"
    if any(fnmatch.fnmatch(name, p) for p in exclude):
        return f"excluded by {exclude}"
    return None


def _relative(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖approx - exact‖ / ‖exact‖`` in fp32."""
    return float((approx.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-30))


def _quantize(weight: torch.Tensor, mode: str, group_size: int, dtype: torch.dtype, fp8_scales: str = "row"):
    """The constants of ``weight`` in ``mode`` ((tensor, name suffix) in op argument order) and its dequantized
    value."""
    if mode in ("int8", "w8a8"):
        q, scales = quantize_int8(weight)
        return [(q, "int8"), (scales.to(dtype) if mode == "int8" else scales, "scales")], dequantize_int8(q, scales)
    if mode == "fp8":
        q, scales = quantize_fp8(weight, fp8_scales)
        return [(q, "fp8"), (scales, "scales")], q.float() * (scales[:, None] if scales.dim() else scales)
    q, scales, zeros = quantize_int4(weight, group_size)
    return [(q, f"int4_g{group_size}"), (scales, "scales"), (zeros, "zeros")], dequantize_int4(q, scales, zeros)


def _record_inputs(program: Program, nodes: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    """The values ``nodes`` take when the Program runs on its example inputs (the calibration activations)."""
    wanted, seen = set(nodes), {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                seen[n] = out.detach().clone()
            return out

    inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in program.example_inputs]
    with torch.no_grad():
        Recorder(program.graph_module).run(*inputs)
    return seen


def _seconds(mode: str, fn, device: torch.device, reps: int = 20) -> float:
    """Seconds per call of ``fn`` on ``device`` (``timer="eager"``, and the clock of ``"inductor"``). On
    CUDA: replayed from a CUDA graph, each call after a write of 256 MB that evicts the L2 cache (a
    decode step reads each weight once, from memory), less the time of the writes alone, each the least
    of three replays; calls a graph cannot capture are timed with events instead."""
    with torch.no_grad():
        for _ in range(3):
            fn()
        if device.type != "cuda":
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - start) / reps
        flush = torch.empty(64 * 2 ** 20, dtype=torch.int32, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)

        def elapsed(body) -> float:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(reps):
                        body()
                run = graph.replay
            except RuntimeError:  # not capturable: launched one by one
                torch.cuda.synchronize(device)

                def run():
                    for _ in range(reps):
                        body()
            run()
            best = float("inf")
            for _ in range(3):  # the least of three: noise only adds
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                run()
                end.record()
                end.synchronize()
                best = min(best, begin.elapsed_time(end) / 1e3)
            return best

        both = elapsed(lambda: (flush.zero_(), fn()))
        alone = elapsed(flush.zero_)
    return max(both - alone, 0.0) / reps


def _product(mode: str, x: torch.Tensor, consts: list[torch.Tensor]) -> torch.Tensor:
    """``x @ W.T`` in ``mode`` ("float": ``consts`` is ``[W]``; else the mode's op on its constants)."""
    if mode == "float":
        return torch.nn.functional.linear(x, consts[0])
    return getattr(torch.ops.mmcompile, OPS[mode])(x, *consts, None)


class _Product(torch.nn.Module):
    """One candidate product, ``x @ W.T`` in a quantization mode, with its constants as buffers."""

    def __init__(self, mode: str, consts: list[torch.Tensor]):
        super().__init__()
        self.mode = mode
        for i, t in enumerate(consts):
            self.register_buffer(f"c{i}", t)

    def forward(self, x):
        return _product(self.mode, x, [getattr(self, f"c{i}") for i in range(len(self._buffers))])


class _InductorTimer:
    """``timer="inductor"``: each candidate product lowered alone by the Inductor backend and timed with
    ``_seconds``, once per distinct (mode, activations' shape and dtype, constants' shapes and dtypes)."""

    def __init__(self):
        self.seconds: dict[tuple, float] = {}
        self.compiled = 0

    def __call__(self, mode: str, x: torch.Tensor, consts: list[torch.Tensor]) -> float:
        key = (mode, tuple(x.shape), x.dtype, str(x.device), *((tuple(t.shape), t.dtype) for t in consts))
        if key not in self.seconds:
            from mmcompile.capture import capture
            from mmcompile.compile import lower

            product = lower(capture(_Product(mode, consts), (x,)), "inductor")
            self.compiled += 1
            self.seconds[key] = _seconds(mode, lambda: product(x), x.device)
        return self.seconds[key]


def _choose(program: Program, layers, options: dict, group_size: int, report: PassReport) -> dict:
    """mode="auto": per layer, the fastest of float and the candidates whose output error on the calibration
    activations (the Program run on its example inputs) stays within ``error_budget``."""
    budget = float(options.get("error_budget", 0.01))
    candidates = tuple(options.get("candidates", ("int8", "int4")))
    unknown = set(candidates) - set(MODES)
    if unknown:
        raise ValueError(f"quantize_linear: unknown candidates {sorted(unknown)}; choose from {MODES}")
    acts = _record_inputs(program, [x for _, x, _, _ in layers])
    timer = options.get("timer")
    if timer is None:
        on_cuda = any(a.device.type == "cuda" for a in acts.values())
        timer = "inductor" if on_cuda else "eager"
    if timer == "inductor":
        timer = _InductorTimer()
        time_of = timer
    elif timer == "eager" or callable(timer):
        clock = _seconds if timer == "eager" else timer

        def time_of(mode, x, consts):
            return clock(mode, lambda: _product(mode, x, consts), x.device)
    else:
        raise ValueError(f"quantize_linear: timer={timer!r}; use 'inductor', 'eager' or a callable "
                         "timer(mode, fn, device) -> seconds")
    chosen = program.metadata.setdefault("quantization", {})
    modes: dict[str, tuple[str, str]] = {}
    for _, x, w, _ in layers:
        name = w.target
        if name in modes:
            continue
        weight, xv = _get(program, name).detach(), acts[x]
        weight = weight.to(xv.device)
        ref = _product("float", xv, [weight])  # the bias adds the same to every candidate: left out
        trials = {"float": (0.0, time_of("float", xv, [weight]))}
        for mode in candidates:
            if _fits(mode, weight.shape, group_size)[0] != mode:
                continue
            consts, _ = _quantize(weight, mode, group_size, xv.dtype, options.get("fp8_scales", "row"))
            args = [t.to(xv.device) for t, _ in consts]
            y = _product(mode, xv, args)
            err = _relative(y, ref)
            trials[mode] = (err, time_of(mode, xv, args))
        ok = {m: t for m, (e, t) in trials.items() if e <= budget}
        pick = min(ok, key=ok.get)
        modes[name] = (pick, "")
        chosen[name] = {"mode": pick, "error_budget": budget,
                        "errors": {m: e for m, (e, _) in trials.items()},
                        "times_us": {m: t * 1e6 for m, (_, t) in trials.items()}}
        detail = ", ".join(f"{m} {e:.2%} {t * 1e6:.0f} us" for m, (e, t) in trials.items())
        report.note(f"{name} {list(weight.shape)} -> {pick} (output error, time: {detail}; budget {budget:.2%})")
    if isinstance(timer, _InductorTimer):
        report.note(f"auto: timed {timer.compiled} distinct candidate products, each lowered alone by the Inductor "
                    "backend")
    return modes


def _get(program: Program, name: str) -> torch.Tensor:
    obj = program.graph_module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj
