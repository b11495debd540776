"""Classifier-free guidance and allowed tokens in the Generator (LogitsRule), against a recomputation."""

import pytest
import torch

import mmcompile as mmc
from mmcompile.errors import ShapeError
from mmcompile.runtime.sampling import LogitsRule, SamplingConfig


@pytest.fixture(scope="module")
def model():
    return mmc.models.build("llama:tiny", seed=3)


def _last_logits(model, seq):
    with torch.no_grad():
        cache = model.empty_cache(1, len(seq))
        return model(torch.tensor([seq]), torch.arange(len(seq))[None], cache)[0, -1].float()


def _guided_reference(model, prompt, negative, steps, scale, allowed):
    """Greedy guided decoding, slow and obvious: both rows recomputed from scratch every step."""
    seq, neg = list(prompt), list(negative)
    for _ in range(steps):
        c, u = _last_logits(model, seq), _last_logits(model, neg)
        g = u + scale * (c - u)
        g[[t for t in range(g.numel()) if t not in allowed]] = float("-inf")
        t = int(g.argmax())
        seq.append(t)
        neg.append(t)
    return seq


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_guided_generation_equals_the_recomputed_reference(model, backend):
    prompts, negative, allowed = [[1, 2, 3, 4, 5, 6], [9, 8, 7]], [[3]], range(10, 60)
    gen = mmc.compile_generator(model, backend=backend, max_batch=4, max_seq_len=48)
    out = gen.generate(prompts, 12, guidance_scale=2.5, negative_input_ids=negative, allowed_tokens=allowed)
    for row, p in zip(out, prompts):
        ref = _guided_reference(model, p, negative[0], 12, 2.5, set(allowed))
        assert row[: len(ref)].tolist() == ref
    # and without guidance the same Generator decodes as before (the rule is off)
    plain = gen.generate(prompts[:1], 8)
    assert torch.equal(plain, mmc.Generator.from_module(model, max_batch=4, max_seq_len=48).generate(prompts[:1], 8))


def test_sampling_gives_both_rows_of_a_pair_the_same_token_and_respects_the_allowed_set(model):
    gen = mmc.Generator.from_module(model, max_batch=2, max_seq_len=48)
    fed = []
    step = gen.decode_fn

    def spy(tokens, pos, cache):
        fed.append(tokens[:, 0].clone())
        return step(tokens, pos, cache)

    gen.decode_fn = spy
    allowed = set(range(100, 140))
    out = gen.generate([[5, 6, 7]], 10, guidance_scale=4.0, negative_input_ids=[[1]], allowed_tokens=range(100, 140),
                       sampling=SamplingConfig(temperature=1.0, seed=0))
    assert set(out[0, 3:].tolist()) <= allowed
    assert len(fed) == 9 and all(int(t[0]) == int(t[1]) for t in fed)  # the pair is fed one token


def test_the_rule_is_the_guidance_formula_and_refuses_bad_sets():
    logits = torch.randn(4, 10)
    rule = LogitsRule(10, "cpu", paired=True)
    rule.set(3.0, [1, 2, 7])
    out = rule(logits)
    expected = logits[2:] + 3.0 * (logits[:2] - logits[2:])
    assert torch.equal(out[:, [1, 2, 7]], expected[:, [1, 2, 7]])
    assert torch.isinf(out[:, [0, 3, 4, 5, 6, 8, 9]]).all()
    chosen = rule.choose(logits, SamplingConfig())
    assert torch.equal(chosen[:2], chosen[2:])
    with pytest.raises(ValueError, match="empty"):
        rule.set(1.0, [])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rule.set(1.0, [3, 10])
    with pytest.raises(ValueError, match="allows no token"):
        rule.set(1.0, torch.zeros(10, dtype=torch.bool))


def test_guidance_requests_that_cannot_work_are_refused_with_the_reason(model):
    gen = mmc.Generator.from_module(model, max_batch=2, max_seq_len=32)
    with pytest.raises(ValueError, match="needs negative_input_ids"):
        gen.generate([[1, 2]], 4, guidance_scale=2.0)
    with pytest.raises(ShapeError, match="need max_batch >= 4"):
        gen.generate([[1, 2], [3, 4]], 4, guidance_scale=2.0, negative_input_ids=[[1]])
    with pytest.raises(ValueError, match="only used with guidance_scale"):
        gen.generate([[1, 2]], 4, negative_input_ids=[[1]])
    with pytest.raises(ValueError, match="beam search does not take"):
        gen.generate([[1, 2]], 4, num_beams=2, guidance_scale=2.0, negative_input_ids=[[1]])
    odd = mmc.Generator.from_module(model, max_batch=3, max_seq_len=32)
    with pytest.raises(ShapeError, match="an even number"):
        odd.generate([[1, 2]], 4, guidance_scale=2.0, negative_input_ids=[[1]])
