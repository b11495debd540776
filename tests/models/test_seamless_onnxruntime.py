"""Seamless through ONNX Runtime (CPU provider): every phase exported and run by onnxruntime, equal to
eager — including the cross-attention's source mask, which broadcasts over queries in SDPA and is
expanded for ONNX's Attention op."""

import pytest
import torch

from mmcompile.models import seamless as S
from mmcompile.runtime.seamless import SeamlessTranslator, compile_seamless

pytest.importorskip("onnxruntime")


def test_speech_to_speech_through_onnxruntime_equals_eager():
    model = S.build("tiny", seed=4)
    g = torch.Generator().manual_seed(5)
    waves = [torch.randn(9000, generator=g) * 0.1]
    want = SeamlessTranslator.from_module(model).translate(waves, "speech-to-speech", tgt_lang="spa", max_new_tokens=6)
    compiled = compile_seamless(model, backend="onnxruntime")
    got = compiled.translate(waves, "speech-to-speech", tgt_lang="spa", max_new_tokens=6)
    assert torch.equal(got.tokens[0], want.tokens[0]) and torch.equal(got.units[0], want.units[0])
    torch.testing.assert_close(got.waveforms[0], want.waveforms[0], rtol=1e-4, atol=1e-5)
