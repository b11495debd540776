"""Pass registry and the built-in passes (one file per pass).

``names()`` lists what is registered, ``get(name)`` gives a fresh instance, ``register(cls)`` adds a
user's own pass (usable as a class decorator).
"""

from __future__ import annotations

from typing import Callable

from mmcompile.errors import PipelineError
from mmcompile.pipeline import Pass

__all__ = ["names", "get", "register", "unregister", "Pass"]

_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass] | None = None, *, override: bool = False) -> Callable | type[Pass]:
    """Register a Pass subclass under its ``name``. Works as ``@register`` or ``register(MyPass)``."""

    def _do(c: type[Pass]) -> type[Pass]:
        if not (isinstance(c, type) and issubclass(c, Pass)):
            raise PipelineError(f"register() needs a Pass subclass, got {c!r}")
        if not c.name or not c.name.replace("_", "").isalnum():
            raise PipelineError(f"pass {c.__name__} needs a name made of letters, digits and '_', got {c.name!r}")
        if c.name in _REGISTRY and _REGISTRY[c.name] is not c and not override:
            raise PipelineError(f"a pass named {c.name!r} is already registered; pass override=True to replace it")
        _REGISTRY[c.name] = c
        return c

    return _do if cls is None else _do(cls)


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> list[str]:
    """Registered pass names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Pass:
    """A new instance of the pass registered as ``name``."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise PipelineError(f"unknown pass {name!r}{hint} Known passes: {', '.join(names())}") from None


from . import (  # noqa: E402,F401  (registers them)
    canonicalize, capture_decode_loop, eliminate_dead_code, fold_constants, fuse_attention, fuse_linears,
    fuse_rmsnorm, quantize_linear,
    reduce_gemv, rewrite_kv_cache,
)
