"""Artifacts: a compiled Program saved to a directory and loaded back, checked, never unpickled.

    compiled = mmc.lower(program, "onnxruntime")
    compiled.save("out/")            # manifest.json + the backend's payload (model.onnx + model.onnx.data)
    step = mmc.load("out/")          # called like the Program: step(*args, **kwargs)

``manifest.json`` holds the format version, the mmcompile, torch and backend versions it was built
with, the calling convention (pytree specs as JSON, every input's name, shape and dtype), the state
inputs updated in place, and a SHA-256 per file. Loading checks all of them and says exactly what does
not match: a truncated or edited file, an edited manifest, another torch or backend version, a missing
backend package. Nothing is unpickled: the specs are JSON, the payload is the backend's own format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from mmcompile.errors import BackendError, ShapeError

__all__ = ["load", "write_manifest", "read_manifest", "Signature", "FORMAT", "VERSION"]

FORMAT = "mmcompile.artifact"
GENERATOR_FORMAT = "mmcompile.generator"  # a directory of phase artifacts plus the KV-cache layout
VERSION = 1
log = logging.getLogger(__name__)
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                               torch.int8, torch.uint8, torch.bool)}


_CHUNK = 64 << 20  # files larger than this many bytes are hashed as chunks, in parallel
_CHUNKED = "sha256-64MiB-chunks:"
_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> digest: a file several phases share is hashed once


def _sha256(path: Path) -> str:
    """SHA-256 of a file; a file over 64 MiB (a model's weights) is hashed as the SHA-256 of its 64 MiB
    chunks' SHA-256 digests, the chunks on all cores, so checking 13 GB of weights takes seconds, not
    the 9 s one core needs. The digest names its scheme (``sha256-64MiB-chunks:``)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    if st.st_size <= _CHUNK:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    else:
        fd = os.open(path, os.O_RDONLY)
        try:
            def chunk(offset: int) -> bytes:  # pread and sha256 release the GIL: threads run in parallel
                return hashlib.sha256(os.pread(fd, _CHUNK, offset)).digest()

            with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
                parts = list(pool.map(chunk, range(0, st.st_size, _CHUNK)))
        finally:
            os.close(fd)
        digest = _CHUNKED + hashlib.sha256(b"".join(parts)).hexdigest()
    _DIGESTS[key] = digest
    return digest


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def write_manifest(directory: Path, *, backend: str, backend_version: str, program, files: list[str],
                   state: list[str], extra: dict | None = None) -> None:
    """Write ``manifest.json`` for ``program``'s calling convention and the payload ``files``."""
    import mmcompile

    inputs = [{"name": n.name, "shape": list(n.meta["val"].shape), "dtype": str(n.meta["val"].dtype)}
              if isinstance(n.meta.get("val"), torch.Tensor) else {"name": n.name, "constant": repr(n.meta.get("val"))}
              for n in program.placeholders()]
    try:
        in_spec, out_spec = pytree.treespec_dumps(program.in_spec), pytree.treespec_dumps(program.out_spec)
    except Exception as e:
        raise BackendError(f"{program.name}: its inputs or outputs are not plain tuples, lists and dicts "
                           f"({e}); rewrite the step's signature before saving it") from e
    manifest = {
        "format": FORMAT, "version": VERSION, "mmcompile": mmcompile.__version__, "torch": torch.__version__,
        "backend": backend, "backend_version": backend_version, "program": program.name,
        "in_spec": in_spec, "out_spec": out_spec, "inputs": inputs, "state": state,
        "files": {f: _sha256(directory / f) for f in files}, **(extra or {}),
    }
    manifest["checksum"] = _checksum(manifest)
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def _checksum(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(directory, *, deferred: list | None = None) -> dict:
    """The checked manifest of an artifact directory (files present and unchanged, versions matching).

    With ``deferred`` (a list), the hashes of large data files (weights: ``.safetensors``, ONNX external
    ``.data``) are checked on a background thread while the backend loads them, their futures appended
    to it; the caller waits on them (``finish_checks``) before handing anything out. Graphs, packages and
    shared libraries are always checked before they are opened."""
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.is_file():
        raise BackendError(f"{directory} is not an mmcompile artifact: it has no manifest.json "
                           "(write one with compiled.save(DIR) or `mmcompile compile MODEL -o DIR`)")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise BackendError(f"{path} is not valid JSON ({e}): the manifest was edited or truncated; recompile") from e
    if manifest.get("checksum") != _checksum(manifest):
        raise BackendError(f"{path} was edited (its checksum does not match its contents); recompile the artifact")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise BackendError(f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
                           f"but this mmcompile reads {FORMAT!r} version {VERSION}; recompile the artifact")
    for key in ("torch", "backend", "backend_version", "in_spec", "out_spec", "inputs", "state", "files"):
        if key not in manifest:
            raise BackendError(f"{path} has no {key!r}: the manifest was edited; recompile the artifact")
    if _minor(manifest["torch"]) != _minor(torch.__version__):
        raise BackendError(f"{directory} was built with torch {manifest['torch']}, this is torch "
                           f"{torch.__version__}; recompile the artifact with this torch")
    for name, digest in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            raise BackendError(f"{directory}: {name} is missing; copy the whole artifact directory")
        if deferred is not None and name.endswith((".safetensors", ".data")) and f.stat().st_size > _CHUNK:
            deferred.append((_hashing(f), directory, name, digest))
        else:
            _check_hash(directory, name, digest, _sha256(f))
    return manifest


def _check_hash(directory: Path, name: str, digest: str, got: str) -> None:
    if got != digest:
        raise BackendError(f"{directory}: {name} does not match its hash in manifest.json: it was truncated "
                           "or changed; copy it again or recompile")


_POOL = None
_HASHING: dict = {}  # resolved path -> the future of its digest, while it is being computed
_HASHING_LOCK = threading.Lock()


def _hashing(path: Path):
    """The future of ``_sha256(path)`` on a background thread: one per file however many phases name it
    (a Generator's phases share one weights file; hashing it once per phase, at once, took all cores
    from the load that reads it)."""
    global _POOL
    key = str(Path(path).resolve())
    with _HASHING_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mmcompile-hash")
        future = _HASHING.get(key)
        if future is None:
            future = _HASHING[key] = _POOL.submit(_sha256, path)
            future.add_done_callback(lambda _: _HASHING.pop(key, None))
    return future


def finish_checks(deferred: list) -> None:
    """Wait for the hash checks ``read_manifest`` deferred; raises the first mismatch's BackendError."""
    start = time.perf_counter()
    for future, directory, name, digest in deferred:
        _check_hash(directory, name, digest, future.result())
    if deferred:
        log.debug("waited %.2f s for %d weights files' hash checks", time.perf_counter() - start, len(deferred))
    deferred.clear()


class Signature:
    """The calling convention of a saved Program (what ``Compiled`` needs of a Program to be called)."""

    def __init__(self, manifest: dict):
        self.name = manifest["program"]
        self.in_spec = pytree.treespec_loads(manifest["in_spec"])
        self.out_spec = pytree.treespec_loads(manifest["out_spec"])
        self.inputs = manifest["inputs"]

    def flatten_inputs(self, args: tuple, kwargs: dict | None = None) -> list[Any]:
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        if spec != self.in_spec:
            raise ShapeError(f"{self.name}: inputs have structure {spec} but the artifact was compiled for "
                             f"{self.in_spec}")
        self.check_inputs(flat)
        return flat

    def check_inputs(self, flat: list[Any]) -> None:
        if len(flat) != len(self.inputs):
            raise ShapeError(f"{self.name}: {len(flat)} inputs, but the artifact takes {len(self.inputs)}")
        for spec, value in zip(self.inputs, flat):
            if "constant" in spec:
                if repr(value) != spec["constant"]:
                    raise ShapeError(f"{self.name}: input {spec['name']} was {spec['constant']} when compiled, got "
                                     f"{value!r}")
                continue
            if not isinstance(value, torch.Tensor) or list(value.shape) != spec["shape"] \
                    or str(value.dtype) != spec["dtype"]:
                got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ShapeError(f"{self.name}: input {spec['name']} is {got}, but the artifact was compiled for "
                                 f"{spec['dtype']} {spec['shape']}")


def load(directory, *, _deferred: list | None = None):
    """Load an artifact: a compiled Program written by ``compiled.save(directory)`` (call it like the
    Program), or a Generator written by ``gen.save(directory)``. The weights' hashes are checked while
    the backend reads them, and before anything is returned."""
    from mmcompile import backends

    top = Path(directory) / "manifest.json"
    if top.is_file():
        try:
            head = json.loads(top.read_text())
        except ValueError as e:
            raise BackendError(f"{top} is not valid JSON ({e}): the manifest was edited or truncated; recompile") from e
        if isinstance(head, dict) and head.get("format") == GENERATOR_FORMAT:
            if head.get("checksum") != _checksum(head):
                raise BackendError(f"{top} was edited (its checksum does not match its contents); recompile")
            from mmcompile.runtime.generator import Generator

            return Generator.load(directory, head)
    pending = [] if _deferred is None else _deferred  # a Generator's phases wait once, after all of them
    try:
        start = time.perf_counter()
        manifest = read_manifest(directory, deferred=pending)
        backend = backends.get(manifest["backend"])  # says how to install a missing backend package
        loader = getattr(backend, "load_artifact", None)
        if loader is None:
            raise BackendError(f"the {manifest['backend']} backend cannot load artifacts")
        log.debug("%s: manifest checked and %s ready in %.2f s", directory, manifest["backend"],
                  time.perf_counter() - start)
        loaded = loader(Path(directory), manifest)
        log.debug("%s: loaded in %.2f s", directory, time.perf_counter() - start)
        return loaded
    finally:  # a damaged weights file explains a failed load better than the loader's own error
        if _deferred is None:
            finish_checks(pending)
