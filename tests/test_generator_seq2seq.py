"""Encoder-decoder generation: transformers BART, mBART and Marian models given as they are.

The Generator captures two phases through ``Seq2SeqStep``: prefill (the encoder over the source and the first
decoder step, which computes the cross-attention cache) and the decode step (which reads that cache).
``rewrite_kv_cache`` turns the decoder's growing self-attention cache into static buffers and the
cross-attention cache into buffers written once by prefill and kept. Every test checks tokens against the
model's own ``generate``.
"""

from __future__ import annotations

import functools

import pytest
import torch

import mmcompile as mmc
from mmcompile.errors import ModelSpecError, ShapeError
from mmcompile.integrations import transformers as hfi
from mmcompile.rewrite import val

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
             init_std=0.3)  # a wide init: random tiny models then pick different tokens for different sources


def build(kind: str):
    torch.manual_seed(0)
    if kind == "bart":
        cfg = transformers.BartConfig(**SMALL, forced_eos_token_id=None, forced_bos_token_id=None)
        return transformers.BartForConditionalGeneration(cfg).eval()
    if kind == "mbart":
        cfg = transformers.MBartConfig(**SMALL, decoder_start_token_id=2, forced_eos_token_id=None)
        return transformers.MBartForConditionalGeneration(cfg).eval()
    if kind == "marian":
        cfg = transformers.MarianConfig(**{**SMALL, "init_std": 1.0}, decoder_start_token_id=1, pad_token_id=0,
                                        scale_embedding=False)
        return transformers.MarianMTModel(cfg).eval()
    if kind == "t5":
        cfg = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    raise ValueError(kind)


def sources(*lengths: int) -> list[torch.Tensor]:
    return [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]


def reference(model, source: torch.Tensor, new: int, beams: int = 1) -> torch.Tensor:
    """transformers' own generate for one source: greedy (or beam search), exactly ``new`` tokens."""
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=new, min_new_tokens=new,
              num_beams=beams, forced_eos_token_id=None, forced_bos_token_id=None)
    if beams > 1:
        kw.update(length_penalty=0.0, early_stopping=True)
    with torch.no_grad():
        return model.generate(source[None], **kw)[0]


@functools.lru_cache(maxsize=None)
def generator(kind: str, backend: str = "eager") -> mmc.runtime.Generator:
    # through Inductor each distinct layer is compiled once (regions="on", as on the GPU): the encoder's and
    # the decoder's layers, with the cross-attention caches written in the decoder's layer regions
    options = {"backend_options": {"regions": "on"}} if backend == "inductor" else {}
    return mmc.compile_generator(build(kind), backend=backend, max_batch=3, max_seq_len=48, max_source_len=24,
                                 prefill_buckets=[8, 24], **options)


# ---------------------------------------------------------------------------------------- token for token
@pytest.mark.parametrize("kind, backend", [("bart", "eager"), ("bart", "inductor"), ("bart", "onnxruntime"),
                                           ("mbart", "eager"), ("marian", "eager")])
def test_greedy_batch_of_different_sources_equals_generate(kind, backend):
    gen = generator(kind, backend)
    model = build(kind)
    srcs = sources(5, 11, 17)  # three source lengths, two prefill buckets
    out = gen.generate(srcs, max_new_tokens=33)
    refs = [reference(model, s, 33) for s in srcs]
    assert len({tuple(r.tolist()) for r in refs}) > 1, "the test model gives every source the same tokens"
    for i, ref in enumerate(refs):
        assert out[i].tolist() == ref.tolist(), f"row {i}"
    assert out.shape == (3, 34)  # the decoder start token and 33 new tokens, as transformers returns them
    # one source at a time, in a fresh call, gives the same tokens (the buffers keep nothing from before)
    assert gen.generate(srcs[1:2], max_new_tokens=33)[0].tolist() == refs[1].tolist()
    if backend == "inductor":
        from mmcompile.runtime.generator import _unwrap

        assert _unwrap(gen.decode_fn).regions[0].startswith("regions: 2 layers")


def test_beam_search_equals_generate():
    gen, model = generator("bart"), build("bart")
    srcs = sources(6, 13)
    for i, s in enumerate(srcs):  # 3 beams fill max_batch=3: one source per call
        out = gen.generate([s], max_new_tokens=12, num_beams=3)
        assert out[0].tolist() == reference(model, s, 12, beams=3).tolist(), f"source {i}"
    with pytest.raises(ShapeError, match="exceeds max_batch=3"):
        gen.generate(srcs, max_new_tokens=12, num_beams=3)
    assert "beam_decode" in gen.programs  # beams read their self-attention cache through the row table


def test_stream_yields_the_generated_tokens():
    gen = generator("bart")
    src = sources(9)
    streamed = torch.stack(list(gen.stream(src, max_new_tokens=10)), dim=1)
    assert streamed[0].tolist() == gen.generate(src, max_new_tokens=10)[0, 1:].tolist()


# ---------------------------------------------------------------------------------------- what the phases are
def test_cross_attention_cache_is_computed_once_and_kept():
    gen, model = generator("bart"), build("bart")
    prefill, decode = gen.programs["prefill"], gen.programs["decode"]
    # prefill writes the cross-attention buffers; decode only reads them and runs no encoder
    assert prefill.metadata["kv_cache"]["cross"]["written"] == "by this step"
    assert decode.metadata["kv_cache"]["cross"]["written"] == "no: read as kept"
    cross = [n for n in decode.placeholders() if n.name.startswith("cross_cache_")]
    assert len(cross) == 2 * model.config.decoder_layers
    assert not any(u.target is torch.ops.aten.copy_.default for n in cross for u in n.users)
    constants = " ".join(decode.constants())
    assert "encoder_layers" not in constants and "encoder_attn_k_proj" not in constants, constants
    # the buffers hold the model's own cross-attention keys for each row's source, zeros after the bucket
    src = sources(5)[0]
    gen.generate([src], max_new_tokens=2)
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=src[None])[0]
        layer = model.model.decoder.layers[0].encoder_attn
        keys = layer.k_proj(enc).view(1, 5, 4, 8).transpose(1, 2)
    torch.testing.assert_close(gen.cross[0][0][:1, :, :5], keys, rtol=1e-5, atol=1e-5)
    assert gen.source_mask[0].tolist() == [1] * 5 + [0] * 19


def test_prefill_writes_cross_buffers_only_at_the_source_slots():
    model = build("bart")
    prog = mmc.capture(hfi.Seq2SeqStep(model), (), hfi.seq2seq_prefill_example(model, 2, 8, "cpu"))
    result = mmc.optimize(prog, ["canonicalize", "fuse_attention", "rewrite_kv_cache"], verify=True,
                          rewrite_kv_cache={"max_seq_len": 16, "tokens": "decoder_input_ids", "max_source_len": 12,
                                            "inputs": ["input_ids", "attention_mask"]})
    out = result.program
    report = result.report("rewrite_kv_cache")
    assert report.stats["cross.created"] == 4 and report.stats["rewritten.created"] == 4, report
    assert "positions_added" in out.metadata["kv_cache"]  # BART's first decoder step takes no positions
    src = torch.randint(3, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    start = torch.full((2, 1), 2)
    shapes = [[list(val(n).shape) for n in out.placeholders() if n.name.startswith(p)] for p in ("kv_cache", "cross")]
    cache = [(torch.randn(shapes[0][2 * i]), torch.randn(shapes[0][2 * i + 1])) for i in range(2)]
    cross = [(torch.randn(shapes[1][2 * i]), torch.randn(shapes[1][2 * i + 1])) for i in range(2)]
    before = [t.clone() for layer in cross for t in layer]
    logits = out(start, torch.zeros_like(start), cache, cross, input_ids=src, attention_mask=mask)
    with torch.no_grad():
        ref = model(input_ids=src, attention_mask=mask, decoder_input_ids=start, use_cache=True)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=1e-5)
    cache_ref = hfi.cache_of(ref).cross_attention_cache
    for (k, v), old, layer in zip(cross, zip(before[::2], before[1::2]), cache_ref.layers):
        torch.testing.assert_close(k[:, :, :8], layer.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v[:, :, :8], layer.values, rtol=1e-5, atol=1e-5)
        assert torch.equal(k[:, :, 8:], old[0][:, :, 8:]) and torch.equal(v[:, :, 8:], old[1][:, :, 8:])


# ---------------------------------------------------------------------------------------- clear errors
def test_source_longer_than_max_source_len_is_refused():
    with pytest.raises(ShapeError, match="max_source_len=24"):
        generator("bart").generate(sources(30), max_new_tokens=4)


def test_too_many_new_tokens_is_refused():
    with pytest.raises(ShapeError, match="max_seq_len=48"):
        generator("bart").generate(sources(5), max_new_tokens=60)


def test_artifact_round_trip_through_onnxruntime(tmp_path):
    """An encoder-decoder Generator on the onnxruntime backend saves (each source bucket compiled so far, the
    decode and beam steps, the cross-attention cache's shape) and loads back with the same tokens."""
    gen, model = generator("bart", "onnxruntime"), build("bart")
    srcs = sources(5, 11, 17)
    want = gen.generate(srcs, max_new_tokens=20)
    beams = gen.generate(srcs[:1], max_new_tokens=8, num_beams=3)
    gen.save(tmp_path / "bart")
    loaded = mmc.load(tmp_path / "bart")
    assert isinstance(loaded, mmc.runtime.Seq2SeqGenerator) and loaded.max_source_len == 24
    assert torch.equal(loaded.generate(srcs, max_new_tokens=20), want)
    assert torch.equal(loaded.generate(srcs[:1], max_new_tokens=8, num_beams=3), beams)
    assert want[0].tolist() == reference(model, srcs[0], 20).tolist()


def test_saving_an_inductor_generator_says_which_backend_can(tmp_path):
    with pytest.raises(Exception, match="onnxruntime"):
        generator("bart").save(tmp_path / "g")


def test_t5_relative_position_bias_is_declined_with_the_reason():
    with pytest.raises(ModelSpecError, match="relative position bias"):
        mmc.compile_generator(build("t5"), backend="eager", max_batch=1, max_seq_len=16, max_source_len=8,
                              prefill_buckets=[8])


def test_from_module_refuses_encoder_decoder_models():
    with pytest.raises(ModelSpecError, match="compile_generator takes it"):
        mmc.runtime.Generator.from_module(build("bart"))
