"""Backends: turn an optimized Program into something that runs.

A backend has a ``name``, ``available() -> (ok, reason)`` and ``lower(program, options) -> Compiled``.
Registered: ``eager`` (the reference), ``inductor`` (the embedded default, CPU and CUDA) and
``onnxruntime`` (ONNX export + ONNX Runtime). ``names()`` lists them; ``get(name)`` gives an instance,
or says how to install a backend whose package is missing.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree

from mmcompile.errors import BackendError
from mmcompile.program import Program

__all__ = ["Backend", "Compiled", "names", "get", "register", "drop_constant_inputs", "DEFAULT_BACKEND"]

DEFAULT_BACKEND = "inductor"


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
