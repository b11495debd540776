"""Seamless through Inductor: speech to speech, every phase lowered by the default backend with each distinct
layer compiled once (regions, as on the GPU), equal to eager. (The whole-graph lowering of the same phases
runs in the GPU tests; on the CPU it took two minutes of the suite for what Inductor already checks.)"""

import torch

from mmcompile.models import seamless as S
from mmcompile.runtime.seamless import SeamlessTranslator, compile_seamless


def test_speech_to_speech_through_inductor_equals_eager():
    model = S.build("tiny", seed=3)
    g = torch.Generator().manual_seed(2)
    waves = [torch.randn(10000, generator=g) * 0.1, torch.randn(6000, generator=g) * 0.2]
    want = SeamlessTranslator.from_module(model, max_batch=2).translate(waves, "speech-to-speech", tgt_lang="deu",
                                                                        max_new_tokens=8)
    compiled = compile_seamless(model, backend="inductor", max_batch=2, backend_options={"regions": "on"})
    got = compiled.translate(waves, "speech-to-speech", tgt_lang="deu", max_new_tokens=8)
    assert all(torch.equal(a, b) for a, b in zip(got.tokens, want.tokens))
    assert all(torch.equal(a, b) for a, b in zip(got.units, want.units))
    for a, b in zip(got.waveforms, want.waveforms):
        assert a.numel() == b.numel() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert compiled.generator.programs["decode"].op_counts()["aten.scaled_dot_product_attention.default"] > 0
