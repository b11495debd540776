"""transformers' ``DynamicCache`` as a pytree node torch.export can trace through.

A decode step of a transformers model takes and returns a ``DynamicCache``. torch.export needs every
input and output to be a tensor or a registered pytree container. transformers' own registration
(``register_dynamic_cache_export_support``) rebuilds the cache through ``DynamicLayer.update``, which
creates a fresh empty tensor on every retrace, so the exported program fails to decompose
("Constant tensor lifted_tensor_N is not in the constants dictionary"). This registration flattens a
cache into ``{"key_cache": [k0, k1, ...], "value_cache": [v0, v1, ...]}`` and fills the layers back
directly, adding no tensors and no ops. ``mmcompile.capture`` installs it on demand, the first time
transformers is imported by the caller.
"""

from __future__ import annotations

import sys

import torch.utils._pytree as pytree

__all__ = ["register_cache_pytrees"]

_REGISTERED = False


def _cache_dict(cache) -> dict:
    return {"key_cache": [layer.keys for layer in cache.layers],
            "value_cache": [layer.values for layer in cache.layers]}


def register_cache_pytrees() -> bool:
    """Register ``DynamicCache`` with pytree (replacing transformers' own registration).
    Returns False when transformers is not imported or its cache classes are not the expected ones."""
    global _REGISTERED
    if _REGISTERED:
        return True
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import Cache, DynamicLayer
    except ImportError:
        return False
    if not hasattr(DynamicCache(), "layers"):
        return False  # an older cache layout (key_cache / value_cache lists) this registration does not know

    def unflatten(values, context):
        d = pytree._dict_unflatten(values, context)
        layers = []
        for k, v in zip(d["key_cache"], d["value_cache"]):
            layer = DynamicLayer()  # filled directly: no update(), so no new tensors while tracing
            layer.keys, layer.values, layer.device, layer.is_initialized = k, v, k.device, True
            layers.append(layer)
        cache = DynamicCache.__new__(DynamicCache)
        Cache.__init__(cache, layers=layers)
        return cache

    if DynamicCache in pytree.SUPPORTED_NODES:
        pytree._deregister_pytree_node(DynamicCache)
    pytree.register_pytree_node(
        DynamicCache,
        lambda c: pytree._dict_flatten(_cache_dict(c)),
        unflatten,
        serialized_type_name="transformers.cache_utils.DynamicCache",
        flatten_with_keys_fn=lambda c: pytree._dict_flatten_with_keys(_cache_dict(c)),
    )
    _REGISTERED = True
    return True
