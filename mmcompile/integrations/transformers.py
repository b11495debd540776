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

import torch
import torch.utils._pytree as pytree

__all__ = ["register_cache_pytrees", "is_causal_lm", "is_seq2seq_lm", "cache_argument", "max_positions",
           "prefill_example", "decode_example", "Seq2SeqStep", "seq2seq_prefill_example", "seq2seq_decode_example",
           "ReferenceGenerator"]

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
    try:
        from transformers import EncoderDecoderCache
    except ImportError:
        EncoderDecoderCache = None
    if EncoderDecoderCache is not None:
        # two DynamicCaches; rebuilt through the constructor, which marks the cross-attention layers that
        # hold keys as computed (``is_updated``), so a decode step reads them instead of recomputing them
        def parts(c):
            return {"self": c.self_attention_cache, "cross": c.cross_attention_cache}

        if EncoderDecoderCache in pytree.SUPPORTED_NODES:
            pytree._deregister_pytree_node(EncoderDecoderCache)
        pytree.register_pytree_node(
            EncoderDecoderCache,
            lambda c: pytree._dict_flatten(parts(c)),
            lambda values, context: EncoderDecoderCache(*pytree._dict_unflatten(values, context).values()),
            serialized_type_name="transformers.cache_utils.EncoderDecoderCache",
            flatten_with_keys_fn=lambda c: pytree._dict_flatten_with_keys(parts(c)),
        )
    _REGISTERED = True
    return True


# ---------------------------------------------------------------------- generation of unmodified models
def is_causal_lm(model) -> bool:
    """True for a transformers decoder-only language model (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and callable(getattr(model, "generate", None)) \
        and not getattr(model.config, "is_encoder_decoder", False)


def is_seq2seq_lm(model) -> bool:
    """True for a transformers encoder-decoder language model (``BartForConditionalGeneration``, ``MarianMTModel``, ...)."""
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and callable(getattr(model, "generate", None)) \
        and getattr(model.config, "is_encoder_decoder", False) and callable(getattr(model, "get_encoder", None))


class Seq2SeqStep(torch.nn.Module):
    """One step of an encoder-decoder model, returning ``(logits, cache)``: with ``input_ids`` (the source) it
    runs the encoder and the first decoder step, which computes the cross-attention cache; with
    ``encoder_hidden_states`` and a filled ``cache`` it is one decode step that reads that cache. The model is
    called as it is; this wrapper only picks the outputs the Generator needs."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train(model.training)  # a wrapper in training mode would put the model back into it

    def forward(self, decoder_input_ids, input_ids=None, attention_mask=None, encoder_hidden_states=None, cache=None):
        encoder_outputs = (encoder_hidden_states,) if encoder_hidden_states is not None else None
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                         encoder_outputs=encoder_outputs, use_cache=True, **{cache_argument(self.model): cache})
        return out.logits, cache_of(out)


def cache_of(out):
    """The cache a transformers forward returned (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out.past_key_values


def decoder_start(model) -> int:
    """The token every decoder row starts from (``decoder_start_token_id``, as transformers' generate uses it)."""
    for config in (getattr(model, "generation_config", None), model.config):
        token = getattr(config, "decoder_start_token_id", None)
        if token is not None:
            return int(token)
    from mmcompile.errors import ModelSpecError

    raise ModelSpecError(f"{type(model).__name__} has no decoder_start_token_id in its config or generation config: "
                         "set model.generation_config.decoder_start_token_id to the token its decoder starts from")


def seq2seq_prefill_example(model, batch: int, source_len: int, device) -> dict:
    """Inputs of an encoder-decoder prefill: a ``source_len``-token source and its mask, and each row's
    decoder start token."""
    import torch

    return {"decoder_input_ids": torch.full((batch, 1), decoder_start(model), dtype=torch.long, device=device),
            "input_ids": torch.ones(batch, source_len, dtype=torch.long, device=device),
            "attention_mask": torch.ones(batch, source_len, dtype=torch.long, device=device)}


def seq2seq_decode_example(model, batch: int, source_len: int, device, past: int = 5) -> tuple[dict, dict]:
    """Inputs and ``dynamic_shapes`` of one decode step of an encoder-decoder model, on top of an
    ``EncoderDecoderCache`` made by running the model eagerly: ``past`` decoder tokens (their length
    dynamic) and the cross-attention cache of a ``source_len``-token source (static: it never grows)."""
    import torch

    register_cache_pytrees()
    vocab = int(getattr(model.config, "vocab_size", 2))
    g = torch.Generator().manual_seed(0)
    source = torch.randint(0, max(vocab, 1), (batch, source_len), generator=g).to(device)
    mask = torch.ones(batch, source_len, dtype=torch.long, device=device)
    tokens = torch.randint(0, max(vocab, 1), (batch, past + 1), generator=g).to(device)
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=source, attention_mask=mask)[0]
        out = model(encoder_outputs=(encoded,), attention_mask=mask, decoder_input_ids=tokens[:, :past], use_cache=True)
    cache = cache_of(out)
    layers = len(cache.self_attention_cache.layers)
    auto = torch.export.Dim.AUTO
    kwargs = {"decoder_input_ids": tokens[:, past:], "attention_mask": mask, "encoder_hidden_states": encoded,
              "cache": cache}
    shapes = {"decoder_input_ids": None, "attention_mask": None, "encoder_hidden_states": None,
              "cache": [[[{2: auto}] * layers, [{2: auto}] * layers], [[None] * layers, [None] * layers]]}
    return kwargs, shapes


def cache_argument(model) -> str:
    """The keyword a model's forward takes its cache by: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def max_positions(model) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        n = getattr(config, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def prefill_example(model, batch: int, length: int, device) -> dict:
    """Keyword inputs of a prefill: ``length`` tokens per row at positions 0.., no attention mask (the
    Generator right-pads, so the causal mask alone keeps padding out of every real token's view)."""
    import torch

    tokens = torch.zeros(batch, length, dtype=torch.long, device=device)
    positions = torch.arange(length, device=device).expand(batch, length).contiguous()
    return {"input_ids": tokens, "position_ids": positions, "use_cache": True}


def decode_example(model, batch: int, device, past: int = 5) -> tuple[dict, dict]:
    """Keyword inputs and ``dynamic_shapes`` of one decode step on top of a ``past``-token DynamicCache
    (made by running the model eagerly), with the past length dynamic so ``rewrite_kv_cache`` can prove
    that only the cache and the mask read it."""
    import torch

    register_cache_pytrees()
    name = cache_argument(model)
    vocab = int(getattr(model.config, "vocab_size", 2))
    tokens = torch.randint(0, max(vocab, 1), (batch, past + 1), device=device)
    with torch.no_grad():
        out = model(input_ids=tokens[:, :past], use_cache=True)
    cache = out[1]  # (logits, cache, ...): the DynamicCache the model made
    layers = len(cache.layers)
    auto = torch.export.Dim.AUTO
    kwargs = {"input_ids": tokens[:, past:], "position_ids": torch.full((batch, 1), past, device=device),
              "use_cache": True, name: cache}
    shapes = {"input_ids": None, "position_ids": None, "use_cache": None,
              name: [[{2: auto}] * layers, [{2: auto}] * layers]}
    return kwargs, shapes


class ReferenceGenerator:
    """A transformers model's own ``generate`` (greedy, dynamic cache), one prompt at a time, with the
    interface and ``stats`` of :class:`mmcompile.runtime.Generator`: the eager baseline the command line
    compares a compiled transformers model against."""

    def __init__(self, model):
        self.model = model

    def generate(self, prompts, max_new_tokens: int, pad_token_id: int = 0):
        import time

        import torch

        from mmcompile.runtime.generator import GenerationStats, _sync

        device = next(self.model.parameters()).device
        rows, prefill, total = [], 0.0, 0.0
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=pad_token_id)
        with torch.no_grad():
            for p in prompts:
                ids = p.to(device)[None]
                # every prompt token is real: without the mask, generate would take a prompt token equal to
                # pad_token_id for padding and attend past it
                kw["attention_mask"] = torch.ones_like(ids)
                _sync(device)
                t0 = time.perf_counter()
                self.model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
                _sync(device)
                t1 = time.perf_counter()
                rows.append(self.model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                                **kw)[0])
                _sync(device)
                prefill, total = prefill + (t1 - t0), total + (time.perf_counter() - t1)
        width = max(r.numel() for r in rows)
        out = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
        for i, r in enumerate(rows):
            out[i, : r.numel()] = r
        # rows run one after another: per-row decode rate = (steps - 1) / (decode time per row)
        self.stats = GenerationStats(batch_size=len(rows), steps=max_new_tokens, new_tokens=len(rows) * max_new_tokens,
                                     prefill_seconds=prefill / len(rows),
                                     decode_seconds=max(total - prefill, 1e-9) / len(rows))
        return out
