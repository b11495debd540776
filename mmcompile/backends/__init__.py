"""Backends: turn an optimized Program into something that runs.

A backend has a ``name``, ``available() -> (ok, reason)`` and ``lower(program, options) -> Compiled``.
Registered: ``eager`` (the reference), ``inductor`` (the embedded default, CPU and CUDA) and
``onnxruntime`` (ONNX export + ONNX Runtime). ``names()`` lists them; ``get(name)`` gives an instance,
or says how to install a backend whose package is missing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree

from mmcompile.errors import BackendError
from mmcompile.program import Program

__all__ = ["Backend", "Compiled", "names", "get", "register", "drop_constant_inputs", "loaded_file", "read_spans",
           "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "inductor"
log = logging.getLogger(__name__)


class Compiled:
    """A lowered Program: call it like the captured model.

    ``fn`` takes the flat inputs (one per placeholder) and returns the flat outputs. ``fusions``: the
    rewrites the backend made on its own copy of the graph, and the candidates it left, with why.
    """

    def __init__(self, program: Program, fn: Callable[..., Any], backend: str, *, check_inputs: bool = True):
        self.program = program
        self.backend = backend
        self._fn = fn
        self.check_inputs = check_inputs
        self.fusions: list[str] = []
        self.regions: list[str] = []  # how the backend cut the graph into separately compiled regions

    def run_flat(self, flat: list[Any]) -> list[Any]:
        if self.check_inputs:
            self.program.check_inputs(flat)
        with torch.no_grad():
            out = self._fn(*flat)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def __call__(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.program.in_spec:
            flat = self.program.flatten_inputs(args, kwargs)  # raises the clear structure error
        return pytree.tree_unflatten(self.run_flat(flat), self.program.out_spec)

    def save(self, directory, *, shared_weights: dict | None = None) -> None:
        """Write a deployable artifact (``mmc.load(directory)`` reads it back). ``shared_weights``: a dict
        a Generator passes to all its phases, so backends that keep weights apart write each once."""
        raise BackendError(f"the {self.backend} backend cannot save artifacts; lower with "
                           "backend='inductor' (an AOTInductor package) or 'onnxruntime' to get one")

    def __repr__(self) -> str:
        return f"<Compiled {self.program.name} on {self.backend}>"


def check_options(backend: str, options: dict, known: tuple[str, ...]) -> None:
    """A BackendError naming the options ``backend`` does not take (a misspelt option is never ignored)."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"its options are {', '.join(known)}" if known else "it takes no options"
        raise BackendError(f"{backend}: unknown option{'s' if len(unknown) > 1 else ''} "
                           f"{', '.join(map(repr, unknown))}; {takes}")


def replayed(program: Program) -> bool:
    """Whether the Program's driver will replay it from CUDA graphs: ``capture_decode_loop`` proved it
    capturable and its driver did not say otherwise (a Generator built with ``cuda_graphs="off"`` marks
    its Programs ``metadata["replayed"] = False``). Backends compile for replay only then."""
    return bool(program.metadata.get("capturable")) and program.metadata.get("replayed", True) is not False


def drop_constant_inputs(graph: torch.fx.Graph, backend: str) -> list[int]:
    """Erase the placeholders of ``graph`` that hold Python constants of the capture (transformers'
    ``use_cache=True``), which exported formats (ONNX, AOTInductor packages) do not take as inputs, and
    return their indices among the placeholders. A constant the graph computes with is an error."""
    dropped = []
    for i, node in enumerate([n for n in graph.nodes if n.op == "placeholder"]):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            continue
        if node.users:
            raise BackendError(f"{backend}: input {node.name} is a {type(val).__name__} the graph computes with; "
                               "the backend takes tensor inputs only, so capture the step with tensors")
        dropped.append(i)
        graph.erase_node(node)
    return dropped


class LoadedFile(dict):
    """What a backend read from one file for one device, keyed as the backend likes (a dict that can be
    weakly referenced: see ``loaded_file``)."""


_LOADED_FILES: "weakref.WeakValueDictionary[tuple, LoadedFile]" = weakref.WeakValueDictionary()
_LOADING = threading.Lock()


@contextlib.contextmanager
def loaded_file(path, device) -> Iterator[LoadedFile]:
    """This process's ``LoadedFile`` for ``(path, device)``, empty the first time, held under a lock while
    the caller reads into it: the phases of a Generator artifact that name one weights file — loaded one
    after another or on threads at once — read it once and share what was read, kept while any loaded
    phase holds it."""
    with _LOADING:
        key = (str(Path(path).resolve()), str(device))
        held = _LOADED_FILES.get(key)
        if held is None:
            held = _LOADED_FILES[key] = LoadedFile()
        yield held


def read_spans(path, spans: dict, device, *, chunk: int = 16 << 20, workers: int | None = None) -> dict:
    """``{key: uint8 tensor on device}`` holding the bytes ``[offset, offset + length)`` of file ``path``
    for each ``key: (offset, length)`` of ``spans``; a span past the file's end raises EOFError.

    The file is read in ``chunk``-byte pieces by several threads (reads release the GIL), each into two
    page-locked buffers of its own, which it copies to the device on a stream of its own while it reads
    the next piece. A memory map copied to the GPU runs at the speed of page faults and of staging
    through pageable memory (2.6 GB/s for a 7B model's weights on an H100 host); this way reading and
    copying overlap. Each span gets an allocation of its own, aligned for any element type."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    device = torch.device(device)
    cuda = device.type == "cuda"
    out = {key: torch.empty(length, dtype=torch.uint8, device=device) for key, (_, length) in spans.items()}
    pieces = _pieces(spans, chunk)
    if not pieces:
        return out
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    todo, lock = iter(pieces), threading.Lock()
    caller = torch.cuda.current_stream(device) if cuda else None

    def work() -> None:
        with torch.cuda.device(device) if cuda else contextlib.nullcontext():
            read(torch.cuda.Stream(device) if cuda else None)

    def read(stream) -> None:
        if cuda:
            stream.wait_stream(caller)  # the spans' memory may have been freed by work queued there
        buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=cuda) for _ in range(2 if cuda else 1)]
        done: list = [None] * len(buffers)
        for n in range(len(pieces)):
            with lock:
                piece = next(todo, None)
            if piece is None:
                break
            slot = n % len(buffers)
            if done[slot] is not None:
                done[slot].synchronize()  # its copies have left the buffer
            offset, length, copies = piece
            view = memoryview(buffers[slot].numpy())[:length]
            got = 0
            while got < length:
                n_read = os.preadv(fd, [view[got:]], offset + got)
                if n_read == 0:
                    raise EOFError(f"{path} is {size} bytes, but a span ends at {offset + length}")
                got += n_read
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for key, at, start, n_bytes in copies:
                    out[key][at:at + n_bytes].copy_(buffers[slot][start:start + n_bytes], non_blocking=cuda)
                if cuda:
                    done[slot] = torch.cuda.Event()
                    done[slot].record(stream)
        if cuda:
            stream.synchronize()

    start = time.perf_counter()
    try:
        n_workers = max(1, min(workers or min(8, os.cpu_count() or 1), len(pieces)))
        with ThreadPoolExecutor(n_workers, thread_name_prefix="mmcompile-read") as pool:
            for future in [pool.submit(work) for _ in range(n_workers)]:
                future.result()
    finally:
        os.close(fd)
    took, gb = time.perf_counter() - start, sum(p[1] for p in pieces) / 1e9
    log.debug("read %.2f GB of %s to %s in %.2f s (%.1f GB/s, %d threads)", gb, path, device, took,
              gb / max(took, 1e-9), n_workers)
    return out


def _pieces(spans: dict, chunk: int) -> list[tuple[int, int, list]]:
    """The reads ``read_spans`` makes: ``(file offset, length <= chunk, copies)`` covering every span once,
    bytes between spans less than a chunk apart read along, each copy ``(key, offset in the span's
    tensor, offset in the piece, length)``."""
    order = sorted((offset, offset + length, key) for key, (offset, length) in spans.items() if length > 0)
    pieces: list[tuple[int, int, list]] = []
    for begin, end, key in order:
        at = begin
        while at < end:
            if pieces and pieces[-1][0] <= at < pieces[-1][0] + chunk:  # fits in (or extends) the last read
                offset, length, copies = pieces[-1]
                stop = min(end, offset + chunk)
                pieces[-1] = (offset, max(length, stop - offset), copies)
            else:
                offset, copies = at, []
                stop = min(end, at + chunk)
                pieces.append((offset, stop - offset, copies))
            copies.append((key, at - begin, at - offset, stop - at))
            at = stop
    return pieces


class Backend:
    name: str = ""
    install_hint: str = ""
    torch_cuda_graphs: bool = True  # its compiled steps can be recorded in a torch CUDA graph
    saves_artifacts: bool = False  # Compiled.save / mmc.load work
    loads_in_parallel: bool = False  # a Generator artifact's phases may be loaded on threads at once

    def available(self) -> tuple[bool, str]:
        return True, ""

    def lower(self, program: Program, options: dict[str, Any]) -> Compiled:  # pragma: no cover - abstract
        raise NotImplementedError

    def warm_up(self, device: torch.device) -> None:
        """Start what lowering for ``device`` will need (worker processes, say) while the caller captures."""

    def __repr__(self) -> str:
        return f"<Backend {self.name}>"


_REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    if not cls.name:
        raise BackendError(f"backend {cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Backend:
    """An instance of backend ``name``; BackendError if it is unknown or cannot run here."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise BackendError(f"unknown backend {name!r}; available backends: {', '.join(names())}")
    backend = cls()
    ok, reason = backend.available()
    if not ok:
        raise BackendError(f"backend {name!r} cannot run here: {reason}")
    return backend


from . import eager, inductor, onnxruntime  # noqa: E402,F401  (registers them)
