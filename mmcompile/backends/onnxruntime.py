"""onnxruntime: a Program exported to ONNX (``torch.onnx.export(..., dynamo=True)``) run by ONNX Runtime.

Lowering (docs/onnx-export.md has the measurements behind each step):

1. State as outputs. ONNX has no in-place updates, and the exporter silently drops a graph's writes
   into its inputs; so each ``copy_(state, new)`` at the end of the Program becomes an extra output
   ``present_<state>``.
2. Export at opset 23, where SDPA becomes ONNX's ``Attention`` op, with a translation for each
   ``mmcompile::`` op that has one: ``linear_int8`` and ``linear_int4`` -> ONNX Runtime's
   ``MatMulNBits`` with the packed weights (or, without contrib ops, ``DequantizeLinear`` / unpacking
   + ``MatMul``); ``embedding_int8`` -> ``Gather`` of the int8 table and of its scales, then ``Mul``;
   ``rms_norm`` (from ``fuse_rmsnorm``) -> ``RMSNormalization``; ``skip_rms_norm`` (the
   residual add and the norm after it, also from ``fuse_rmsnorm``) -> ``SkipSimplifiedLayerNormalization``
   (or ``Add`` + ``RMSNormalization`` without contrib ops); after it, ``x * Sigmoid(x)`` (SiLU) ->
   ``QuickGelu`` with ``alpha=1``, one kernel instead of two. Before export, ``ort_fusions`` rewrites
   decode attention over a static KV cache into ``GroupQueryAttention`` (the cache shared between its
   ``past_*`` inputs and ``present_*`` outputs, the rotary embeddings of q and k inside it) and other
   rotary embeddings into ``RotaryEmbedding``, each only where it proves the rewrite exact
   (``compiled.fusions`` says what was rewritten and what was left, and why).
3. Run with IOBinding: inputs and outputs are bound to the torch tensors' memory, and each state
   buffer is bound both as its input and as its ``present_`` output, so the KV cache is updated where
   it lives, as the Program does. That is only safe when the state input's single reader is the
   update that produces its output; otherwise the output goes to a scratch buffer and is copied back.

The CPU execution provider runs on CPU tensors, the CUDA provider (``onnxruntime-gpu``) on CUDA ones,
replaying a capturable decode step as ONNX Runtime's own CUDA graph. Models with over 1 GiB of weights
reach ONNX Runtime through a scratch copy with external data (protobuf's 2 GB limit).
Options: ``opset`` (default 23), ``providers`` (default: from the Program's device), ``contrib_ops``
(default True: ``com.microsoft`` contrib ops where they apply), ``cuda_graph`` ("auto", True, False).
Not yet: dynamic shapes, W8A8 and fp8 linears.
"""

from __future__ import annotations

import collections
import logging
import shutil
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from mmcompile.errors import BackendError
from mmcompile.program import Program

from . import Backend, Compiled, check_options, drop_constant_inputs, loaded_file, read_spans, register, replayed

_ONNX_TYPES = {torch.float32: 1, torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9,
               torch.float16: 10, torch.float64: 11, torch.bfloat16: 16}  # onnx.TensorProto's element types
log = logging.getLogger(__name__)


@register
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    install_hint = "pip install onnxruntime onnx onnxscript (or 'mmcompile[ort]' for onnxruntime-gpu)"
    torch_cuda_graphs = False  # ONNX Runtime launches on its own streams
    saves_artifacts = True
    loads_in_parallel = True  # each phase is its own session, created without the GIL

    def available(self) -> tuple[bool, str]:
        # found, not imported: loading an artifact needs neither onnxscript nor its imports (sympy, onnx_ir;
        # half a second of a CPU load's 1.2 s)
        import importlib.util
        import sys

        for module in ("onnxruntime", "onnx", "onnxscript"):
            if (sys.modules[module] is None) if module in sys.modules else importlib.util.find_spec(module) is None:
                return False, f"the {module} package is not installed: {self.install_hint}"
        return True, ""

    def lower(self, program: Program, options: dict[str, Any]) -> Compiled:
        check_options(self.name, options, ("opset", "providers", "contrib_ops", "cuda_graph"))
        gm, state, n_out, dropped = _state_as_outputs(program)
        inputs = [n for i, n in enumerate(program.placeholders()) if i not in dropped]
        contrib = options.get("contrib_ops", True)
        device = next((n.meta["val"].device for n in inputs), torch.device("cpu"))
        dtypes = {n.meta["val"].dtype for n in inputs if n.meta["val"].dtype.is_floating_point}
        fusions = []
        if contrib:  # GroupQueryAttention runs fp16/bf16 on CUDA, also fp32 on the CPU
            from .ort_fusions import fuse

            fusions = fuse(gm, state, cached_attention=device.type == "cpu" or dtypes <= {torch.float16, torch.bfloat16})
        for node in inputs:
            v = node.meta.get("val")
            if v.dtype not in _ONNX_TYPES:
                raise BackendError(f"onnxruntime: input {node.name} is {v.dtype}, which the backend does not bind; "
                                   f"use one of {sorted(str(d) for d in _ONNX_TYPES)}")
            if any(not isinstance(d, int) for d in v.shape):
                raise BackendError(f"onnxruntime: input {node.name} has a dynamic shape {list(v.shape)}; "
                                   "the backend compiles static shapes only")
        _pretranspose_weights(gm)
        _expand_attention_masks(gm)
        names = [n.name for n in inputs]
        out_names = [f"output_{i}" for i in range(n_out)] + [f"present_{s}" for s in state]
        example = tuple(x.clone() for i, x in enumerate(program.example_inputs) if i not in dropped)
        providers = _providers(options.get("providers"), device, _cuda_graph(options, program, device))
        import logging
        import time

        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision notes
        timings, t0 = {}, time.perf_counter()
        try:
            with torch.no_grad():
                exported = torch.onnx.export(gm, example, dynamo=True, opset_version=int(options.get("opset", 23)),
                                             input_names=names, output_names=out_names, verbose=False,
                                             custom_translation_table=_translations(contrib))
        except Exception as e:
            raise BackendError(f"onnxruntime: exporting {program.name} to ONNX failed: {_first_line(e)}") from e
        if contrib:
            fusions += _onnx_rewrites(exported.model)
        timings["export"] = time.perf_counter() - t0
        nodes = [(n.op_type, n.domain, [v.name if v is not None else "" for v in n.inputs], [v.name for v in n.outputs])
                 for n in exported.model.graph]
        weight_bytes = sum(v.const_value.nbytes for v in exported.model.graph.initializers.values()
                           if v.const_value is not None)
        scratch = None
        if weight_bytes < _IN_MEMORY_LIMIT:
            source = exported.model_proto.SerializeToString()
        else:  # a protobuf message holds at most 2 GB: ONNX Runtime reads the weights from external data
            import tempfile

            shm = Path("/dev/shm")  # memory-backed where there is room: no disk in the way
            room = shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * weight_bytes
            scratch = tempfile.mkdtemp(prefix="mmcompile-ort-", dir=str(shm) if room else None)
            source = str(Path(scratch) / "model.onnx")
            _save(exported, source)
        timings["serialize"] = time.perf_counter() - t0 - timings["export"]
        try:
            session = _session(source, providers)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        timings["session"] = time.perf_counter() - t0 - timings["export"] - timings["serialize"]
        in_place = _safe_in_place(nodes, state)
        outputs = [(list(n.meta["val"].shape), n.meta["val"].dtype) for n in program.graph.output_node().args[0]]
        compiled = _OrtCompiled(program, session, names, out_names, outputs, state, in_place, device, dropped,
                                cuda_graph=_graph_enabled(providers))
        compiled._exported = exported
        compiled.fusions = fusions
        compiled.timings = timings  # seconds: export to ONNX, serialize, create the session
        compiled._opset = int(options.get("opset", 23))
        return compiled

    def load_artifact(self, directory, manifest: dict) -> Compiled:
        import onnxruntime as ort

        from mmcompile.artifact import _DTYPES, Signature, _minor

        if _minor(manifest["backend_version"]) != _minor(ort.__version__):
            raise BackendError(f"{directory} was built with onnxruntime {manifest['backend_version']}, this is "
                               f"onnxruntime {ort.__version__}; recompile the artifact with this onnxruntime")
        device = torch.device(manifest["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError(f"{directory} was compiled for {device}, and this machine has no CUDA device")
        start = time.perf_counter()
        providers = _providers(None, device, device.type == "cuda" and manifest.get("cuda_graph", False))
        source, data_folder = _with_shared_data(Path(directory), manifest.get("external_data", {}))
        log.debug("%s: providers and model ready in %.2f s", directory, time.perf_counter() - start)
        shared = _device_initializers(source, data_folder or Path(directory), device) if device.type == "cuda" else None
        start = time.perf_counter()
        session = _session(source, providers, data_folder, shared)
        log.debug("%s: session created in %.2f s", directory, time.perf_counter() - start)
        signature = Signature(manifest)
        names = [i["name"] for n, i in enumerate(manifest["inputs"]) if n not in manifest["dropped_inputs"]]
        outputs = [(o["shape"], _DTYPES[o["dtype"]]) for o in manifest["outputs"]]
        out_names = [f"output_{i}" for i in range(len(outputs))] + [f"present_{s}" for s in manifest["state"]]
        compiled = _OrtCompiled(signature, session, names, out_names, outputs, manifest["state"], manifest["in_place"],
                                device, manifest["dropped_inputs"], cuda_graph=_graph_enabled(providers))
        compiled._shared_weights = shared  # the session uses these device copies in place: kept while it lives
        return compiled


_IN_MEMORY_LIMIT = 1 << 30  # weights above this go through a file with external data (protobuf's 2 GB limit)


def _cuda_graph(options: dict, program, device: torch.device) -> bool:
    """Whether ONNX Runtime replays the Program as its own CUDA graph: option ``cuda_graph`` (default
    "auto": on CUDA, for Programs ``capture_decode_loop`` proved capturable and their driver will replay,
    which a Generator built with ``cuda_graphs="off"`` says it will not: ``metadata["replayed"] = False``)."""
    choice = options.get("cuda_graph", "auto")
    if choice not in ("auto", True, False):
        raise BackendError(f"onnxruntime: cuda_graph must be 'auto', True or False, got {choice!r}")
    if device.type != "cuda":
        if choice is True:
            raise BackendError(f"onnxruntime: cuda_graph=True needs a CUDA device; this Program runs on {device}")
        return False
    if choice == "auto":
        return replayed(program)
    return bool(choice)


def _providers(requested, device: torch.device, cuda_graph: bool) -> list:
    """The execution providers for ``device``. On CUDA, ONNX Runtime is handed torch's current stream and
    each run waits for its work, with its CUDA graph when asked."""
    import onnxruntime as ort

    providers = list(requested or (["CUDAExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]))
    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    missing = [p for p in names if p not in ort.get_available_providers()]
    if missing:
        raise BackendError(f"onnxruntime: provider(s) {missing} are not in this onnxruntime build "
                           f"(it has {ort.get_available_providers()}); for CUDA install onnxruntime-gpu")
    if device.type == "cuda" and providers and providers[0] == "CUDAExecutionProvider":
        stream = torch.cuda.current_stream(device)
        providers[0] = ("CUDAExecutionProvider", {
            "device_id": str(device.index or 0), "has_user_compute_stream": "1",
            "user_compute_stream": str(stream.cuda_stream), "enable_cuda_graph": "1" if cuda_graph else "0"})
    return providers


def _graph_enabled(providers) -> bool:
    first = providers[0] if providers else None
    return isinstance(first, tuple) and first[1].get("enable_cuda_graph") == "1"


def _with_shared_data(directory: Path, external_data: dict) -> tuple:
    """(model, data folder) for a saved phase whose weights may lie in another phase's directory.

    A model's external data cannot point outside the model's directory, so ``_save_shared`` names another
    phase's file by a key and the manifest maps the key to its path. Here every location becomes that
    file's path relative to the folder that holds them all, and the session is created from the model's
    bytes with that folder as where its external data lives: ONNX Runtime reads (and maps) the files
    itself. (Handing it the files from memory instead took 25 s per session for a 7B model on an H100
    against 3.5 s from a path: it copies every initializer.)"""
    import os

    import onnx

    model_path = directory / "model.onnx"
    if not external_data or set(external_data) == {"model.onnx.data"}:
        return str(model_path), None  # its own file, beside it: the usual load from a path
    root = directory.resolve()
    paths = {}
    for key, rel in external_data.items():
        path = (root / rel).resolve()
        if not path.is_file():
            raise BackendError(f"{path} is missing: the artifact's weights are incomplete; copy the whole "
                               "artifact directory or recompile it")
        paths[key] = path
    folder = Path(os.path.commonpath([root, *paths.values()]))
    model = onnx.load(str(model_path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                path = paths.get(entry.value, root / entry.value)
                entry.value = path.relative_to(folder).as_posix()
    return model.SerializeToString(), str(folder)


# torch types of the ONNX element types a data file's tensors are handed over in (others load as usual):
# those the backend binds, and int16 (5), which a model may hold as a constant
_TORCH_TYPES = {**{onnx_type: dtype for dtype, onnx_type in _ONNX_TYPES.items()}, 5: torch.int16}


def _device_initializers(source, folder, device: torch.device) -> dict:
    """``{initializer name: (OrtValue on device, the LoadedFile holding it)}`` for every initializer of
    the model ``source`` (a path or its bytes) whose data lies in a file under ``folder``.

    Each file's tensors are copied to the device once per process, however many sessions use them: a
    Generator's prefill and decode phases of one artifact name the same file, and given the same values
    through ``SessionOptions.add_initializer`` ONNX Runtime uses them in place instead of each session
    copying the file to the device itself (two copies of a 7B model's 13.5 GB on the GPU before). The
    file is read by ``read_spans`` (pieces read on threads into page-locked buffers, copied while the
    next is read). The values wrap torch tensors (DLPack): ONNX Runtime takes only memory it does not own."""
    import os

    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source, load_external_data=False)
    wanted: dict[Path, list] = {}  # file -> [(initializer name, key)]
    sizes: dict[Path, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL or tensor.data_type not in _TORCH_TYPES:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        path = (Path(folder) / info["location"]).resolve()
        dims, dtype = tuple(tensor.dims), _TORCH_TYPES[tensor.data_type]
        offset = int(info.get("offset", 0))
        length = int(info.get("length", int(np.prod(dims, dtype=np.int64)) * dtype.itemsize))
        if path not in sizes:
            sizes[path] = os.stat(path).st_size
        if offset + length > sizes[path]:
            raise BackendError(f"{path} ends before {tensor.name}'s data ({offset} + {length} bytes): the "
                               "artifact's weights are incomplete; copy the whole artifact or recompile it")
        wanted.setdefault(path, []).append((tensor.name, (offset, length, tensor.data_type, dims)))
    out = {}
    for path, tensors in wanted.items():
        start = time.perf_counter()
        with loaded_file(path, device) as held:  # phases load on threads: one copy, the other waits for it
            log.debug("%s: %d tensors on %s, %.2f s after asking", path, len(tensors), device,
                      time.perf_counter() - start)
            spans = {key: key[:2] for _, key in tensors if key not in held}
            for key, raw in read_spans(path, spans, device).items():
                value = raw.view(_TORCH_TYPES[key[2]]).reshape(key[3])
                held[key] = (value, ort.OrtValue.from_dlpack(value))
            out.update({name: (held[key][1], held) for name, key in tensors})
    return out


def _session(source, providers, data_folder: str | None = None, initializers: dict | None = None):
    """An InferenceSession of ``source`` (a path, or a model's bytes whose external data lies under
    ``data_folder``); ``initializers`` (``_device_initializers``) are used in place of the model's own."""
    import onnxruntime as ort

    options = _session_options()
    if data_folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", data_folder)
    for name, (value, _) in (initializers or {}).items():
        options.add_initializer(name, value)
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as e:
        text = str(e).strip().splitlines()
        raise BackendError(f"onnxruntime: creating the session failed: {text[0] if text else type(e).__name__}"
                           + (" (ONNX Runtime's CUDA graph needs every node on the CUDA provider; try "
                              "cuda_graph=False)" if _graph_enabled(providers) else "")) from e


def _session_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # keep int8 fused matmuls exact
    return so


class _OrtCompiled(Compiled):
    """Runs an ONNX Runtime session through IOBinding. With ``cuda_graph``, ONNX Runtime records the run as
    a CUDA graph and replays it: every input and output then keeps one address, so inputs are copied
    into buffers bound once, outputs are copied out of them, and state must be the same buffers each
    call (the Generator's cache is)."""

    def __init__(self, program, session, names, out_names, outputs, state, in_place, device, dropped=(),
                 cuda_graph=False):
        super().__init__(program, None, "onnxruntime")
        self.session, self._names, self._out_names = session, names, out_names
        if isinstance(in_place, bool):  # one flag for every state input (artifacts before per-input flags)
            in_place = [in_place] * len(state)
        self._outputs, self._state, self._in_place, self._device = outputs, state, list(in_place), device
        self._dropped = set(dropped)  # inputs that are Python constants of the capture (e.g. use_cache)
        self._state_index = [names.index(s) for s in state]
        self._state_positions = set(self._state_index)
        self.cuda_graph = cuda_graph
        self._static = None  # (binding, input buffers, output buffers, state pointers) once recorded

    def run_flat(self, flat):
        if self.check_inputs:
            self.program.check_inputs(flat)
        if self._dropped:
            flat = [x for i, x in enumerate(flat) if i not in self._dropped]
        if self.cuda_graph:
            return self._replay(flat)
        binding = self.session.io_binding()
        keep = []  # tensors whose memory is bound must live until the run ends
        for name, x in zip(self._names, flat):
            x = x.contiguous()
            keep.append(x)
            _bind(binding.bind_input, name, x)
        results = [torch.empty(shape, dtype=dtype, device=self._device) for shape, dtype in self._outputs]
        for name, r in zip(self._out_names, results):
            _bind(binding.bind_output, name, r)
        scratch = []
        for s, i, in_place in zip(self._state, self._state_index, self._in_place):
            target = flat[i]
            if in_place:  # updated where it lives (GroupQueryAttention requires it: it writes one slot)
                _bind(binding.bind_output, f"present_{s}", keep[i])
                if keep[i] is not target:  # a non-contiguous cache was bound as a contiguous copy
                    scratch.append((target, keep[i]))
            else:
                tmp = torch.empty_like(target)
                scratch.append((target, tmp))
                _bind(binding.bind_output, f"present_{s}", tmp)
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        for target, tmp in scratch:
            target.copy_(tmp)
        return results

    def _replay(self, flat):
        state = self._state_positions
        if self._static is None:
            if not all(self._in_place) or any(not flat[i].is_contiguous() for i in state):
                raise BackendError("onnxruntime: a CUDA graph needs every state input contiguous and updated in "
                                   "place; compile with cuda_graph=False")
            binding = self.session.io_binding()
            buffers = [flat[i] if i in state else torch.empty_like(x, memory_format=torch.contiguous_format)
                       for i, x in enumerate(flat)]
            results = [torch.empty(shape, dtype=dtype, device=self._device) for shape, dtype in self._outputs]
            for name, x in zip(self._names, buffers):
                _bind(binding.bind_input, name, x)
            for name, r in zip(self._out_names, results):
                _bind(binding.bind_output, name, r)
            for s, i in zip(self._state, self._state_index):
                _bind(binding.bind_output, f"present_{s}", buffers[i])
            self._static = (binding, buffers, results, [flat[i].data_ptr() for i in self._state_index])
        binding, buffers, results, pointers = self._static
        if [flat[i].data_ptr() for i in self._state_index] != pointers:
            raise BackendError("onnxruntime: this step's CUDA graph was recorded with other state buffers (the KV "
                               "cache); pass the same buffers each call or compile with cuda_graph=False")
        for i, (x, buf) in enumerate(zip(flat, buffers)):
            if i not in state:
                buf.copy_(x)
        # Run returns once the replay has finished. (Letting it return early, with the replay ordered
        # against torch's stream by events, measured faster on an H100 but generated other tokens than
        # the synchronous replay: ONNX Runtime does not replay on the stream it is handed.)
        self.session.run_with_iobinding(binding)
        return [r.clone() for r in results]

    def save(self, directory, *, shared_weights: dict | None = None) -> None:
        """Write ``model.onnx``, its weights and ``manifest.json`` to ``directory``.

        The weights go to ``model.onnx.data``, each distinct tensor once: ``shared_weights`` (a dict a
        Generator passes to all its phases) lets a later phase reference the bytes an earlier phase wrote
        instead of writing them again. The model names each data file by a key the manifest maps to its
        path; loading points ONNX Runtime at the files where they lie (``_with_shared_data``)."""
        import onnxruntime as ort

        from mmcompile.artifact import write_manifest

        exported = getattr(self, "_exported", None)
        if exported is None:
            raise BackendError("this Compiled was loaded from an artifact; copy the artifact directory instead")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        store = (shared_weights if shared_weights is not None else {}).setdefault("onnxruntime", {})
        data_files = _save_shared(exported, directory, store)
        files = ["model.onnx"] + sorted(set(data_files.values()))
        write_manifest(directory, backend="onnxruntime", backend_version=ort.__version__, program=self.program,
                       files=files, state=self._state, extra={
                           "outputs": [{"shape": list(shape), "dtype": str(dtype)} for shape, dtype in self._outputs],
                           "in_place": self._in_place, "device": str(self._device), "opset": self._opset,
                           "dropped_inputs": sorted(self._dropped), "cuda_graph": self.cuda_graph,
                           "external_data": data_files})

    @property
    def onnx_model(self):
        """The exported model as an ``onnx.ModelProto`` with its weights (None when loaded from an artifact)."""
        exported = getattr(self, "_exported", None)
        return None if exported is None else exported.model_proto


_TRANSPOSED: dict[tuple, torch.Tensor] = {}  # a weight's memory and layout -> its contiguous transpose


def _expand_attention_masks(gm: torch.fx.GraphModule) -> None:
    """ONNX Runtime's ``Attention`` wants its mask's query dimension to be the query length; an SDPA mask
    that broadcasts over queries (``[B, 1, 1, T]``: padding of the keys, a cross-attention's source mask)
    is expanded to ``[B, 1, S, T]`` before export. Same values, no copy at run time beyond ORT's own."""
    from mmcompile.rewrite import fake_value

    aten = torch.ops.aten
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is aten.scaled_dot_product_attention.default):
            continue
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if not isinstance(mask, torch.fx.Node):
            continue
        q, m = node.args[0].meta["val"], mask.meta["val"]
        if m.dim() < 2 or m.shape[-2] != 1 or q.shape[-2] == 1:
            continue
        shape = [*m.shape[:-2], q.shape[-2], m.shape[-1]]
        with gm.graph.inserting_before(node):
            wide = gm.graph.call_function(aten.expand.default, (mask, shape))
        wide.meta["val"] = fake_value(gm, aten.expand.default, (mask, shape), {})
        if len(node.args) > 3:
            node.args = (*node.args[:3], wide, *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": wide}
    gm.recompile()


def _pretranspose_weights(gm: torch.fx.GraphModule) -> None:
    """Give ``permute(weight, [1, 0])`` of a constant 2-D weight (every linear layer's ``x @ W.T``) to the
    exporter as one contiguous ``W.T``, transposed by torch where the weight lives (once per weight,
    shared by every phase). Left to the exporter, each becomes a transposed numpy view on the CPU that is
    copied and written element by element: minutes for a 7B model."""
    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is torch.ops.aten.permute.default
                and list(node.args[1]) in ([1, 0], [-1, -2], [-1, 0], [1, -2])):
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "get_attr"):
            continue
        obj = gm
        for part in src.target.split("."):
            obj = getattr(obj, part, None)
        if not isinstance(obj, torch.Tensor) or obj.dim() != 2:
            continue
        weight = obj.detach()
        # keyed by memory, not object: phases see the same weight through different tensor objects (views
        # of fuse_linears' stacked weights); the entry lives as long as the tensor that made it, which
        # keeps that memory from being reused
        key = (obj.data_ptr(), tuple(obj.shape), tuple(obj.stride()), obj.dtype, str(obj.device))
        transposed = _TRANSPOSED.get(key)
        if transposed is None:
            transposed = _TRANSPOSED[key] = weight.t().contiguous()
            weakref.finalize(obj, _TRANSPOSED.pop, key, None)
        name = f"_ort_transposed_{count}"
        count += 1
        gm.register_buffer(name, transposed)
        with graph.inserting_before(node):
            new = graph.get_attr(name)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    if count:
        graph.eliminate_dead_code()
        gm.recompile()


def _save(exported, path: str) -> None:
    """``exported.save`` with external data, after making every initializer contiguous: the exporter folds
    ``Transpose(weight)`` into a transposed numpy view, which numpy writes element by element (tens of
    MB/s instead of the disk's speed)."""
    import numpy as np
    import onnx_ir as ir

    for value in exported.model.graph.initializers.values():
        t = value.const_value
        if isinstance(t, ir.Tensor) and isinstance(t.raw, np.ndarray) and not t.raw.flags.c_contiguous:
            value.const_value = ir.Tensor(_contiguous(t.raw), dtype=t.dtype, name=t.name)
    exported.save(path, external_data=True)


def _contiguous(array):
    """A C-contiguous copy of a numpy array (itself when it is one), by torch's blocked, multi-threaded copy:
    numpy's transposing copy of float16 runs at ~170 MB/s."""
    import numpy as np

    if array.flags.c_contiguous:
        return array
    try:
        return torch.from_numpy(array).contiguous().numpy()
    except TypeError:  # a dtype torch does not take from numpy (ml_dtypes' bfloat16)
        return np.ascontiguousarray(array)


_ALIGN = 64  # bytes: every tensor in a data file starts at a multiple of this
_INLINE_BELOW = 1024  # bytes: smaller initializers are written into the model itself (as onnx.save does)


def _save_shared(exported, directory: Path, store: dict) -> dict:
    """Write ``directory/model.onnx`` with every initializer as external data: tensors already written by
    an earlier phase (``store``, keyed by dtype, shape and content) are referenced where they lie, the
    others appended to ``directory/model.onnx.data``. Returns {key in the model: path relative to
    ``directory``} of the data files the model reads."""
    import hashlib
    import os
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import onnx_ir as ir

    # small tensors (shapes for Reshape, scalars) stay inside the model: ONNX Runtime reads them while it
    # resolves the graph, before external data is loaded
    values = [v for v in exported.model.graph.initializers.values()
              if v.const_value is not None and v.const_value.nbytes >= _INLINE_BELOW]
    arrays = []
    for value in values:
        arrays.append(_contiguous(np.asarray(value.const_value.numpy())))  # the exporter's transposed views too

    def digest(a):  # hashlib releases the GIL on large buffers: the threads hash in parallel
        return hashlib.blake2b(a.view(np.uint8).reshape(-1).data, digest_size=20).hexdigest() if a.size else ""

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(digest, arrays))
    own = (directory / "model.onnx.data").resolve()
    refs, originals, used = store.setdefault("tensors", {}), {}, {}
    with open(own, "wb") as out:
        for value, array, dig in zip(values, arrays, digests):
            content = (str(array.dtype), tuple(array.shape), dig)
            if content not in refs:
                pad = (-out.tell()) % _ALIGN
                out.write(b"\0" * pad)
                refs[content] = (own, out.tell(), array.nbytes)
                out.write(array.view(np.uint8).reshape(-1).data)
            path, offset, length = refs[content]
            # its own file under the usual name (plain ONNX Runtime finds it beside the model); another
            # phase's file under a name of its own, since a model's external data cannot point outside
            # its directory
            key = "model.onnx.data" if path == own else f"{path.parent.name}.{path.name}"
            used[key] = os.path.relpath(path, directory.resolve())
            originals[value] = value.const_value
            value.const_value = ir.ExternalTensor(key, offset, length, value.const_value.dtype,
                                                  shape=value.const_value.shape, name=value.name,
                                                  base_dir=str(directory))
    try:
        proto = ir.serde.serialize_model(exported.model)  # references only: no tensor bytes in the proto
    finally:
        for value, original in originals.items():
            value.const_value = original
    (directory / "model.onnx").write_bytes(proto.SerializeToString())
    if own.stat().st_size == 0 and "model.onnx.data" not in used.values():
        own.unlink()  # every tensor was already written by an earlier phase
    return used


def _bind(bind, name: str, t: torch.Tensor) -> None:
    device = "cuda" if t.device.type == "cuda" else "cpu"
    bind(name, device, t.device.index or 0, _ONNX_TYPES[t.dtype], list(t.shape), t.data_ptr())


def _state_as_outputs(program: Program):
    """A copy of the Program's graph where each ``copy_(state, new)`` is removed and ``new`` returned after
    the Program's own outputs. Returns (graph module, state input names, number of own outputs)."""
    p = program.clone()
    graph = p.graph
    dropped = drop_constant_inputs(graph, "onnxruntime")
    out = graph.output_node()
    outputs, state = list(out.args[0]), []
    n_out = len(outputs)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.copy_.default:
            dst, src = node.args[:2]
            outputs.append(src)
            state.append(dst.name)
            graph.erase_node(node)
    out.args = (tuple(outputs),)
    p.graph_module.recompile()
    return p.graph_module.eval(), state, n_out, dropped


def _safe_in_place(nodes, state: list[str]) -> list[bool]:
    """For each state input: binding one buffer as the input and its output is safe when that input's only reader is the
    node producing the output, as a ScatterND (output 0) or a GroupQueryAttention (past_key -> present_key,
    past_value -> present_value); ONNX Runtime does not check aliasing."""
    readers = collections.defaultdict(list)
    for node in nodes:  # (op_type, domain, input names, output names)
        for name in node[2]:
            readers[name].append(node)

    def writes_itself(s):
        if len(readers[s]) != 1:
            return False
        op_type, domain, ins, outs = readers[s][0]
        if op_type == "ScatterND":
            return ins[0] == s and outs[0] == f"present_{s}"
        if op_type == "GroupQueryAttention" and domain == "com.microsoft":
            return any(ins[3 + j] == s and outs[1 + j] == f"present_{s}" for j in (0, 1))
        return False

    return [writes_itself(s) for s in state]


_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def _contrib_op(name: str, inputs: list, outputs: list, types: dict, attributes: dict):
    """ONNX Runtime's contrib op ``com.microsoft::name`` as an onnxscript op: onnx has no schema for the
    contrib ops, and the exporter needs one. ``inputs`` / ``outputs``: ``(name, type)`` pairs, with a
    trailing ``"?"`` on the name of an optional one; ``types``: type variable -> allowed types;
    ``attributes``: name -> ``(OpSchema.AttrType name, required)``."""
    import onnxscript
    from onnx.defs import OpSchema

    def params(pairs):
        optional, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
        return [OpSchema.FormalParameter(n.rstrip("?"), t, param_option=optional if n.endswith("?") else single)
                for n, t in pairs]

    schema = OpSchema(name, "com.microsoft", 1, inputs=params(inputs), outputs=params(outputs),
                      type_constraints=[(t, allowed, "") for t, allowed in types.items()],
                      attributes=[OpSchema.Attribute(a, getattr(OpSchema.AttrType, kind), required=required)
                                  for a, (kind, required) in attributes.items()])
    return onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), name, schema)


def _matmul_nbits():
    """``com.microsoft::MatMulNBits``: a matmul with block-quantized weights."""
    return _contrib_op(
        "MatMulNBits",
        [("A", "T1"), ("B", "T2"), ("scales", "T1"), ("zero_points?", "T3"), ("g_idx?", "T4"), ("bias?", "T1")],
        [("Y", "T1")],
        {"T1": _FLOATS, "T2": ["tensor(uint8)", "tensor(int32)"],
         "T3": ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)", "tensor(bfloat16)"],
         "T4": ["tensor(int32)"]},
        {"K": ("INT", True), "N": ("INT", True), "bits": ("INT", False), "block_size": ("INT", True),
         "accuracy_level": ("INT", False)})


def _skip_simplified_layer_norm():
    """``com.microsoft::SkipSimplifiedLayerNormalization``: RMSNorm of ``input + skip`` that also returns
    the sum (output 3)."""
    return _contrib_op(
        "SkipSimplifiedLayerNormalization",
        [("input", "T"), ("skip", "T"), ("gamma", "T"), ("bias?", "T")],
        [("output", "T"), ("mean?", "U"), ("inv_std_var?", "U"), ("input_skip_bias_sum?", "T")],
        {"T": _FLOATS, "U": ["tensor(float)"]},
        {"epsilon": ("FLOAT", False)})


def _group_query_attention():
    """``com.microsoft::GroupQueryAttention``: decode attention over a BNSH cache shared between ``past_*``
    and ``present_*``, keys visible up to ``seqlens_k``; ``key`` and ``value`` empty when q/k/v are packed
    in ``query``."""
    return _contrib_op(
        "GroupQueryAttention",
        [("query", "T"), ("key?", "T"), ("value?", "T"), ("past_key", "T"), ("past_value", "T"),
         ("seqlens_k", "M"), ("total_sequence_length", "M"), ("cos_cache?", "T"), ("sin_cache?", "T")],
        [("output", "T"), ("present_key", "T"), ("present_value", "T")],
        {"T": _FLOATS, "M": ["tensor(int32)"]},
        {"num_heads": ("INT", True), "kv_num_heads": ("INT", True), "scale": ("FLOAT", False),
         "do_rotary": ("INT", False), "rotary_interleaved": ("INT", False)})


def _rotary_embedding():
    """``com.microsoft::RotaryEmbedding`` (rotate-half form with ``interleaved=0``)."""
    return _contrib_op(
        "RotaryEmbedding",
        [("input", "T"), ("position_ids", "M"), ("cos_cache", "T"), ("sin_cache", "T")],
        [("output", "T")],
        {"T": _FLOATS, "M": ["tensor(int64)"]},
        {"interleaved": ("INT", False)})


def _translations(contrib_ops: bool = True) -> dict:
    """ONNX for the ``mmcompile::`` ops (onnxscript functions the exporter traces). With ``contrib_ops``,
    int8 and int4 linears become ONNX Runtime's ``MatMulNBits`` (weights packed as the op reads them, exact
    accumulation: ``accuracy_level=0``); otherwise standard ONNX (``DequantizeLinear`` / unpacking + MatMul)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from onnxscript import opset23 as op

    import mmcompile.ops  # noqa: F401  (the ops must exist to be keys)

    nbits = _matmul_nbits() if contrib_ops else None
    skip_norm = _skip_simplified_layer_norm() if contrib_ops else None

    def linear_int8(x, weight, scales, bias=None):
        N, K = weight.shape
        if nbits is not None and K % 32 == 0:  # blocks of 32 inputs, all with the channel's scale
            i16 = lambda v: op.Constant(value=numpy_helper.from_array(np.array(v, np.int16)))  # noqa: E731
            codes = op.Cast(op.Add(op.Cast(weight, to=onnx.TensorProto.INT16), i16(128)), to=onnx.TensorProto.UINT8)
            b = op.Reshape(codes, op.Constant(value_ints=[N, K // 32, 32]))  # zero point 128, the 8-bit default
            s = op.Expand(op.Unsqueeze(scales, op.Constant(value_ints=[1])), op.Constant(value_ints=[N, K // 32]))
            y = nbits(x, b, s, K=K, N=N, bits=8, block_size=32, accuracy_level=0)
        else:
            w = op.DequantizeLinear(weight, scales, axis=0)  # int8 [N, K] stays int8 in the model
            y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
        return y if bias is None else op.Add(y, bias)

    def embedding_int8(weight, scales, indices):
        rows = op.Cast(op.Gather(weight, indices, axis=0), to=onnx.TensorProto.FLOAT)  # the table stays int8
        s = op.Unsqueeze(op.Cast(op.Gather(scales, indices, axis=0), to=onnx.TensorProto.FLOAT),
                         op.Constant(value_ints=[-1]))
        return op.CastLike(op.Mul(rows, s), scales)

    def linear_int4(x, packed, scales, zeros, bias=None):
        N, Kh = packed.shape
        K, G = 2 * Kh, scales.shape[1]
        if nbits is not None:  # our packing (low nibble = even input) is MatMulNBits' layout, per group
            bs = K // G
            b = op.Reshape(packed, op.Constant(value_ints=[N, G, bs // 2]))
            zp = op.Sub(op.Constant(value_float=8.0), op.Div(zeros, scales))  # (c - 8) s + z == (c - zp) s
            y = nbits(x, b, scales, zp, K=K, N=N, bits=4, block_size=bs, accuracy_level=0)
            return y if bias is None else op.Add(y, bias)
        u8 = lambda v: op.Constant(value=numpy_helper.from_array(np.array(v, np.uint8)))  # noqa: E731
        lo = op.BitwiseAnd(packed, u8(15))
        hi = op.BitShift(packed, u8(4), direction="RIGHT")
        axis2 = op.Constant(value_ints=[2])
        codes = op.Reshape(op.Concat(op.Unsqueeze(lo, axis2), op.Unsqueeze(hi, axis2), axis=2),
                           op.Constant(value_ints=[N, G, K // G]))  # even input first, as mmcompile.quant packs
        w = op.Add(op.Mul(op.Sub(op.Cast(codes, to=onnx.TensorProto.FLOAT), op.Constant(value_float=8.0)),
                          op.Unsqueeze(scales, axis2)), op.Unsqueeze(zeros, axis2))
        w = op.CastLike(op.Reshape(w, op.Constant(value_ints=[N, K])), x)
        y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
        return y if bias is None else op.Add(y, bias)

    def rms_norm(x, weight, eps):
        return op.RMSNormalization(x, weight, axis=-1, epsilon=eps)  # statistics in float (stash_type=1)

    def skip_rms_norm(x, skip, weight, eps):
        if skip_norm is not None:
            out, _, _, total = skip_norm(x, skip, weight, epsilon=eps)
            return out, total
        total = op.Add(x, skip)
        return op.RMSNormalization(total, weight, axis=-1, epsilon=eps), total

    gqa = _group_query_attention() if contrib_ops else None
    rotary = _rotary_embedding() if contrib_ops else None

    def rotary_embedding(x, cos, sin, positions):
        return rotary(x, op.Cast(positions, to=onnx.TensorProto.INT64), cos, sin, interleaved=0)

    def cached_attention(q, k, v, cache_k, cache_v, positions, scale, cos=None, sin=None, num_heads=0):
        B, Hkv, L, D = cache_k.shape
        Hq = num_heads or q.shape[1]
        flat = lambda t, h: op.Reshape(t, op.Constant(value_ints=[B, 1, h * D]))  # noqa: E731  (one query: BNSH = BSNH)
        total = op.Constant(value=numpy_helper.from_array(np.array(L, np.int32)))  # the shared buffer's length
        if k is None:  # packed q/k/v: GroupQueryAttention splits it itself
            qkv = [flat(q, Hq + 2 * Hkv), None, None]
        else:
            qkv = [flat(q, Hq), flat(k, Hkv), flat(v, Hkv)]
        args = qkv + [cache_k, cache_v, op.Cast(positions, to=onnx.TensorProto.INT32), total]
        attrs = {"num_heads": Hq, "kv_num_heads": Hkv, "scale": float(scale)}
        if cos is not None:
            args += [cos, sin]
            attrs["do_rotary"] = 1
        out, present_k, present_v = gqa(*args, **attrs)
        return op.Reshape(out, op.Constant(value_ints=[B, Hq, 1, D])), present_k, present_v

    def hstu_attention(q, k, v, bias=None, mask=None, scale=1.0, positions=None, pos_weight=None, timestamps=None,
                       time_weight=None, time_divisor=0.301, lengths=None, history=None):
        # no contrib op computes SiLU attention: its definition, scores in float as the reference has them
        f32 = lambda t: op.Cast(t, to=onnx.TensorProto.FLOAT)  # noqa: E731
        i64 = lambda v: op.Constant(value=numpy_helper.from_array(np.array(v, np.int64)))  # noqa: E731
        s = op.MatMul(f32(q), op.Transpose(f32(k), perm=[0, 1, 3, 2]))
        if bias is not None:
            s = op.Add(s, f32(bias))
        if positions is not None:  # the relative position bias from its table, as mmcompile.hstu_attention
            off = (pos_weight.shape[0] - 1) // 2
            rel = op.Sub(op.Unsqueeze(positions, op.Constant(value_ints=[1])),
                         op.Unsqueeze(positions, op.Constant(value_ints=[2])))
            s = op.Add(s, op.Unsqueeze(f32(op.Gather(pos_weight, op.Add(op.Clip(rel, i64(-off), i64(off)), i64(off)))),
                                       op.Constant(value_ints=[1])))
        if timestamps is not None:  # and the time bias: log-spaced buckets of |t_i - t_j|
            dt = op.Abs(op.Sub(op.Unsqueeze(timestamps, op.Constant(value_ints=[2])),
                               op.Unsqueeze(timestamps, op.Constant(value_ints=[1]))))
            dt = f32(op.Max(dt, i64(1)))
            bucket = op.Cast(op.Floor(op.Div(op.Log(dt), op.Constant(value_float=float(time_divisor)))),
                             to=onnx.TensorProto.INT64)
            bucket = op.Clip(bucket, i64(0), i64(time_weight.shape[0] - 1))
            s = op.Add(s, op.Unsqueeze(f32(op.Gather(time_weight, bucket)), op.Constant(value_ints=[1])))
        if lengths is not None:  # HSTU's visibility rule instead of (or besides) a mask tensor
            n = q.shape[2]
            idx = np.arange(n, dtype=np.int64)
            i = op.Constant(value=numpy_helper.from_array(idx.reshape(1, n, 1)))
            j = op.Constant(value=numpy_helper.from_array(idx.reshape(1, 1, n)))
            row = lambda t: op.Reshape(t, op.Constant(value_ints=[-1, 1, 1]))  # noqa: E731
            rule = op.And(op.LessOrEqual(j, i), op.Less(i, row(lengths)))
            if history is not None:
                h = row(history)
                rule = op.And(rule, op.Or(op.Or(op.Less(i, h), op.Less(j, h)), op.Equal(j, i)))
            rule = op.Unsqueeze(rule, op.Constant(value_ints=[1]))
            mask = rule if mask is None else op.And(mask, rule)
        w = op.Mul(op.Mul(s, op.Sigmoid(s)), op.Constant(value_float=float(scale)))
        if mask is not None:
            w = op.Where(mask, w, op.Constant(value_float=0.0))
        return op.CastLike(op.MatMul(op.CastLike(w, v), v), q)

    table = {torch.ops.mmcompile.linear_int8.default: linear_int8,
             torch.ops.mmcompile.linear_int4.default: linear_int4,
             torch.ops.mmcompile.embedding_int8.default: embedding_int8,
             torch.ops.mmcompile.rms_norm.default: rms_norm,
             torch.ops.mmcompile.skip_rms_norm.default: skip_rms_norm,
             torch.ops.mmcompile.hstu_attention.default: hstu_attention}
    if contrib_ops:  # made only by ort_fusions, which runs only with contrib ops
        table.update({torch.ops.mmcompile.rotary_embedding.default: rotary_embedding,
                      torch.ops.mmcompile.cached_attention.default: cached_attention})
    return table


def _onnx_rewrites(model) -> list[str]:
    """Rewrites of the exported ONNX graph into ONNX Runtime's contrib ops (``onnxscript.rewriter``
    patterns), one kernel where the exporter wrote several: ``x * Sigmoid(x)`` (SiLU, SwiGLU's gate)
    -> ``com.microsoft::QuickGelu(x, alpha=1)``, which computes ``x * sigmoid(alpha * x)``. Returns
    notes for ``compiled.fusions``."""
    from onnxscript.rewriter import pattern

    def silu(op, x):
        return op.Mul(x, op.Sigmoid(x))

    def quick_gelu(op, x):
        return op.QuickGelu(x, alpha=1.0, _domain="com.microsoft")

    rules = pattern.RewriteRuleSet([pattern.RewriteRule(silu, quick_gelu, name="silu_to_quick_gelu")], commute=True)
    count = rules.apply_to_model(model)
    if count and "com.microsoft" not in model.opset_imports:
        model.opset_imports["com.microsoft"] = 1
    return [f"onnx: {count} SiLU(s) x * Sigmoid(x) -> QuickGelu(alpha=1)"] if count else []


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "No ONNX function found" in ln or "DispatchError" in ln:
            return ln.strip() + " (an op without an ONNX translation; quantize to int8 or int4 for this backend)"
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
