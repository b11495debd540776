"""capture_decode_loop: the capturability proof and its reasons (CUDA replay itself runs in test_gpu.py)."""

import pytest
import torch

import mmcompile as mmc
from mmcompile import testing


def decode_program(model, batch=1):
    cache = model.empty_cache(batch, 16)
    one = torch.zeros(batch, 1, dtype=torch.long)
    return mmc.capture(model, (one, one.clone(), cache), name="llama.decode")


def run(prog):
    after, report = testing.run_pass(prog, "capture_decode_loop")
    return after, report


def test_llama_decode_step_is_blocked_only_by_living_on_the_cpu(tiny_llama):
    after, report = run(mmc.optimize(decode_program(tiny_llama), "default").program)
    assert not report.changed and str(after) == str(mmc.optimize(decode_program(tiny_llama), "default").program)
    reasons = after.metadata["not_capturable"]
    assert after.metadata["capturable"] is False and report.stats == {"not_capturable": 1}
    assert len(reasons) == 2, reasons  # SDPA without dropout, index_put into the cache, ... are all fine
    assert reasons[0].startswith("6 input(s) are CPU tensors (tokens, input_pos, cache_0_0, ...)")
    assert reasons[1].startswith("17 constant(s) live on the CPU")  # q/k/v and gate/up stacked by fuse_linears and "move the model to the GPU" in reasons[1]
    assert [n.removeprefix("not capturable: ") for n in report.notes] == reasons


def test_random_ops_are_not_capturable():
    class Noisy(torch.nn.Module):
        def forward(self, x):
            return x + torch.randn(3)

    after, report = run(mmc.capture(Noisy(), (torch.randn(3),)))
    assert any("randn" in r and "random numbers" in r for r in after.metadata["not_capturable"])


def test_data_dependent_sizes_are_not_capturable():
    class Select(torch.nn.Module):
        def forward(self, x):
            return torch.nonzero(x > 0).float().sum()

    after, _ = run(mmc.capture(Select(), (torch.randn(5),)))
    reasons = " | ".join(after.metadata["not_capturable"])
    assert "nonzero" in reasons and "data-dependent" in reasons
    assert "dynamic shape" in reasons


def test_dynamic_prompt_length_is_not_capturable(tiny_llama):
    cache = tiny_llama.empty_cache(1, 32)
    seq = torch.export.Dim("seq", min=2, max=32)
    prog = mmc.capture(tiny_llama, (torch.zeros(1, 4, dtype=torch.long), torch.arange(4)[None], cache),
                       dynamic_shapes={"tokens": {1: seq}, "input_pos": {1: seq},
                                       "cache": [(None, None)] * tiny_llama.config.n_layers})
    after, _ = run(prog)
    assert any("dynamic shape" in r and "fixed sizes" in r for r in after.metadata["not_capturable"])


def test_generator_runs_it_on_the_decode_step_and_explains_cpu_fallback(tiny_llama):
    gen = mmc.compile_generator(tiny_llama, backend="eager", max_seq_len=32)
    assert gen.reports["decode"][-1].name == "capture_decode_loop"
    # prefill buckets carry the proof too: short ones replay as graphs on a GPU
    assert gen.reports["prefill"][-1].name == "capture_decode_loop"
    assert gen.programs["prefill"].metadata["capturable"] is False  # on the CPU, with the reason
    assert any("CPU" in r for r in gen.programs["prefill"].metadata["not_capturable"])
    assert gen.cuda_graphs == "off" and gen.cuda_graph_notes
    with pytest.raises(mmc.ShapeError, match="needs a CUDA device"):
        mmc.compile_generator(tiny_llama, backend="eager", max_seq_len=32, cuda_graphs="step")
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        mmc.compile_generator(tiny_llama, backend="eager", max_seq_len=32, cuda_graphs="always")
