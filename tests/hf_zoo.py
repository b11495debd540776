"""A zoo of tiny Hugging Face transformers models for end-to-end attention-fusion tests.

Not a test file: tests import it (``import hf_zoo``; pytest puts ``tests/`` on ``sys.path``).

    model, args, kwargs, n_attn = hf_zoo.build("bart")
    prog = mmcompile.capture(model, args, kwargs)
    torch.testing.assert_close(hf_zoo.logits_of(prog(*args, **kwargs)), hf_zoo.reference(model, args, kwargs))

Every model is built from a tiny config with seeded random weights (nothing is downloaded) and
``attn_implementation="eager"``, so its attention is the explicit matmul -> (mask/bias add) ->
softmax -> matmul that a fusion pass should recognise. ``n_attn`` is the number of softmax attention
computations one forward runs on the example inputs (= ``aten._softmax.default`` in the captured IR).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

__all__ = ["ZOO", "build", "reference", "logits_of"]

ZOO = ("llama_gqa", "gpt2", "t5", "bart", "whisper", "qwen2")

VOCAB = 128
BATCH, SRC_LEN, TGT_LEN = 2, 9, 5


def _ids(*shape: int, low: int = 3) -> torch.Tensor:
    # ids >= 3 stay clear of the special tokens (pad/bos/eos are 0..2 in every config below)
    return torch.randint(low, VOCAB, shape, dtype=torch.long)


def _left_padded_mask(batch: int, seq: int, pad: int = 3) -> torch.Tensor:
    """Row 0 full, row 1 left-padded with `pad` zeros (as a batched decoder-only prompt would be)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :pad] = 0
    return mask


def _right_padded_mask(batch: int, seq: int, pad: int = 3) -> torch.Tensor:
    """Row 0 full, row 1 right-padded with `pad` zeros (as a batched encoder input would be)."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - pad:] = 0
    return mask


_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Weights wider than the HF default (0.02): attention scores then span several units, so the softmax is
# far from uniform and a wrong scale, mask or bias changes the logits well beyond test tolerances.
INIT_STD = 0.2


def _llama_gqa():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=INIT_STD, attn_implementation="eager", **_SPECIAL,
    )
    args = ()
    kwargs = dict(input_ids=_ids(BATCH, SRC_LEN), attention_mask=_left_padded_mask(BATCH, SRC_LEN))
    return LlamaForCausalLM(cfg), args, kwargs, cfg.num_hidden_layers


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_sliding_window=False, initializer_range=INIT_STD, attn_implementation="eager", **_SPECIAL,
    )
    kwargs = dict(input_ids=_ids(BATCH, SRC_LEN))
    return Qwen2ForCausalLM(cfg), (), kwargs, cfg.num_hidden_layers


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=INIT_STD,
        attn_implementation="eager", bos_token_id=1, eos_token_id=2,
    )
    kwargs = dict(input_ids=_ids(BATCH, SRC_LEN), attention_mask=_left_padded_mask(BATCH, SRC_LEN))
    return GPT2LMHeadModel(cfg), (), kwargs, cfg.n_layer


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    # T5 scales its init by d_model**-0.5 itself (initializer_factor=1.0): its scores are already wide.
    cfg = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        decoder_start_token_id=0, attn_implementation="eager", pad_token_id=0, eos_token_id=1,
    )
    kwargs = dict(
        input_ids=_ids(BATCH, SRC_LEN), attention_mask=_right_padded_mask(BATCH, SRC_LEN),
        decoder_input_ids=_ids(BATCH, TGT_LEN),
    )
    # encoder self + decoder self + decoder cross, per layer
    return T5ForConditionalGeneration(cfg), (), kwargs, cfg.num_layers + 2 * cfg.num_decoder_layers


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        decoder_start_token_id=2, forced_eos_token_id=None, init_std=INIT_STD,
        attn_implementation="eager", **_SPECIAL,
    )
    kwargs = dict(
        input_ids=_ids(BATCH, SRC_LEN), attention_mask=_right_padded_mask(BATCH, SRC_LEN),
        decoder_input_ids=_ids(BATCH, TGT_LEN),
    )
    return BartForConditionalGeneration(cfg), (), kwargs, cfg.encoder_layers + 2 * cfg.decoder_layers


def _whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    mel, source_positions = 16, 8  # the conv stem halves 2*8 = 16 input frames to 8 positions
    cfg = WhisperConfig(
        vocab_size=VOCAB, num_mel_bins=mel, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=source_positions, max_target_positions=16,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None, init_std=INIT_STD,
        attn_implementation="eager",
    )
    kwargs = dict(
        input_features=torch.randn(1, mel, 2 * source_positions),
        decoder_input_ids=_ids(1, 4),
    )
    return WhisperForConditionalGeneration(cfg), (), kwargs, cfg.encoder_layers + 2 * cfg.decoder_layers


_BUILDERS: dict[str, Callable[[], tuple]] = {
    "llama_gqa": _llama_gqa, "gpt2": _gpt2, "t5": _t5, "bart": _bart, "whisper": _whisper, "qwen2": _qwen2,
}


def build(name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, tuple, dict, int]:
    """(model in eval mode, example args, example kwargs, number of attention layers run on these inputs).

    Weights come from ``torch.manual_seed(0)``; so do the example inputs, so every call returns the same
    model and inputs. Floating inputs (whisper's ``input_features``) are cast to ``dtype`` with the model.
    The kwargs include ``use_cache=False`` and ``return_dict=True``.
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {ZOO}")
    torch.manual_seed(0)
    model, args, kwargs, n_attn = _BUILDERS[name]()
    impl = model.config._attn_implementation
    if impl != "eager":
        raise RuntimeError(f"{name}: expected eager attention, the config resolved to {impl!r}")
    model = model.to(dtype).eval()
    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in kwargs.items()}
    kwargs.update(use_cache=False, return_dict=True)
    return model, args, kwargs, n_attn


def reference(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The eager model's logits (``outputs.logits``) under ``torch.no_grad()``."""
    with torch.no_grad():
        return model(*args, **kwargs).logits


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits of a model's outputs: ``.logits`` of a ModelOutput (or anything with that attribute),
    ``["logits"]`` of a dict, else the first tensor leaf of the pytree (a Program returns the model's
    output structure; for these models logits is the first field)."""
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, dict) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    for leaf in pytree.tree_leaves(outputs):
        if isinstance(leaf, torch.Tensor):
            return leaf
    raise TypeError(f"no tensor in outputs of type {type(outputs).__name__}")
