"""Regional compilation in the Inductor backend (mmcompile.backends.inductor_regions): repeated layers
compiled once, computing what the whole-graph compile computes."""

import pytest
import torch
from hypothesis import example, given, settings, strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import mmcompile as mmc
from mmcompile.backends.inductor_regions import plan
from mmcompile.errors import BackendError


def _llama_step(layers=3, batch=2, slots=32):
    model = mmc.models.build("llama:tiny", n_layers=layers) if layers else mmc.models.build("llama:tiny")
    cache = model.empty_cache(batch, slots)
    for kv in cache:
        for t in kv:
            t.normal_()
    tokens = torch.arange(5, 5 + batch)[:, None]
    pos = torch.arange(17, 17 + 9 * batch, 9)[:, None]
    program = mmc.optimize(mmc.capture(model, (tokens, pos, cache)), "default").program
    return model, program, [tokens, pos, *[t for kv in cache for t in kv]]


def _run(compiled, inputs):
    inputs = [t.clone() for t in inputs]
    with torch.no_grad():
        out = compiled.run_flat(inputs)
    return out, inputs  # the outputs, and the state inputs as the step left them


def test_a_decode_step_is_cut_into_before_layers_and_after_with_each_cache_write_in_its_layer():
    model, program, _ = _llama_step(layers=3)
    found, why = plan(program.graph_module)
    assert why == "" and found.layers == 3 and found.parent == "layers"
    names = [r.name for r in found.regions]
    assert names == ["before", "layer0", "layer1", "layer2", "after"]
    layers = found.regions[1:4]
    assert len({r.key for r in layers}) == 1  # one structure: compiled once
    for i, region in enumerate(layers):
        writes = [n for n in region.nodes if n.target is torch.ops.aten.copy_.default]
        assert sorted(w.args[0].name for w in writes) == [f"cache_{i}_0", f"cache_{i}_1"]
    # the weights are inputs of the layer regions, not constants baked into them
    assert all(any(n.op == "get_attr" for n in r.inputs) for r in layers)
    assert not any(n.target is torch.ops.aten.copy_.default for n in found.regions[-1].nodes)


def test_regions_compute_what_the_whole_graph_computes_and_compile_each_layer_once():
    _, program, inputs = _llama_step(layers=3)
    whole = mmc.lower(program, "inductor", regions="off")
    cut = mmc.lower(program, "inductor", regions="on")
    assert whole.regions == [] and cut.regions[0].endswith("3 compiled")  # before, one layer, after
    assert len(cut._fn.compiled) == 3
    (out_w, state_w), (out_c, state_c) = _run(whole, inputs), _run(cut, inputs)
    for a, b in zip(out_w + state_w, out_c + state_c):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.equal(state_c[2], inputs[2])  # the cache was written in place, through the layer region


@settings(max_examples=1, deadline=None)
@example(layers=4, kv_heads=2, batch=2)  # and one drawn at random each run
@given(layers=st.integers(2, 4), kv_heads=st.sampled_from([1, 2, 4]), batch=st.integers(1, 2))
def test_transformers_llama_generates_what_eager_and_generate_do_with_regions(layers, kv_heads, batch):
    """A transformers Llama compiled layer by layer generates the eager Generator's tokens, which are
    model.generate's, over depths, grouped-query head counts and batch sizes."""
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128)
    torch.manual_seed(layers * 10 + kv_heads)
    model = LlamaForCausalLM(cfg).eval()
    prompts = torch.randint(3, 256, (batch, 7))
    ref = mmc.compile_generator(model, backend="eager", max_batch=batch, max_seq_len=64).generate(prompts,
                                                                                                  max_new_tokens=24)
    gen = mmc.compile_generator(model, backend="inductor", max_batch=batch, max_seq_len=64,
                                backend_options={"regions": "on"})
    assert torch.equal(gen.generate(prompts, max_new_tokens=24), ref)
    with torch.no_grad():
        hf = model.generate(prompts, max_new_tokens=24, do_sample=False, attention_mask=torch.ones_like(prompts))
    assert torch.equal(ref, hf[:, 7:] if ref.shape[1] == 24 else hf)


def test_graphs_that_do_not_qualify_are_compiled_whole_and_say_why():
    _, program, _ = _llama_step(layers=1)
    assert plan(program.graph_module)[1].startswith("1 layer region(s) of layers")

    class OutOfOrder(torch.nn.Module):  # layer 1 runs before layer 0: no order to run regions in
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

        def forward(self, x):
            return self.layers[2](self.layers[0](self.layers[1](x)))

    program = mmc.capture(OutOfOrder(), (torch.randn(2, 8),))
    found, why = plan(program.graph_module)
    assert found is None and "an earlier region" in why
    compiled = mmc.lower(program, "inductor", regions="on")
    assert compiled.regions == [f"regions: off ({why})"]
    x = torch.randn(2, 8)
    torch.testing.assert_close(compiled(x), program.graph_module(x)[0] if isinstance(program.graph_module(x), tuple)
                               else program.graph_module(x))

    class Different(torch.nn.Module):  # every layer a different shape: nothing to share
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(8 + i, 9 + i) for i in range(3))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    found, why = plan(mmc.capture(Different(), (torch.randn(2, 8),)).graph_module)
    assert found is None and "no two of the 3 layers of layers have the same structure" in why

    class NoLayers(torch.nn.Module):
        def forward(self, x):
            return x.relu() + 1

    assert "no node belongs to an element of a module list" in plan(mmc.capture(NoLayers(), (torch.randn(3),)).graph_module)[1]

    with pytest.raises(BackendError, match="regions='sometimes' is not an option"):
        mmc.lower(program, "inductor", regions="sometimes")


def test_auto_is_the_default_and_cuts_only_cuda_programs(monkeypatch):
    from mmcompile.backends import inductor
    from mmcompile.backends.inductor import _region_plan

    _, program, _ = _llama_step(layers=4)
    gm = program.graph_module
    assert _region_plan(program, gm, {"regions": "auto"}) == (None, "")  # a CPU program
    assert _region_plan(program, gm, {}) == (None, "")
    assert _region_plan(program, gm, {"regions": "on"})[0].layers == 4
    assert _region_plan(program, gm, {"regions": "off"}) == (None, "")
    monkeypatch.setattr(inductor, "_devices", lambda program: {"cuda"})  # as a program on the GPU
    assert _region_plan(program, gm, {})[0].layers == 4
    assert _region_plan(program, gm, {"regions": "off"}) == (None, "")
    _, small, _ = _llama_step(layers=3)
    assert _region_plan(small, small.graph_module, {})[0] is None  # "auto" wants four layers


# ------------------------------------------------------------------ every family, cut into regions
# On CUDA every program of four or more layers is compiled region by region by default, so each model
# family the project supports is checked with regions="on" (the CPU takes it from two layers): the step
# must really be cut, and the outputs must be the reference's. Llama above; Chameleon's tasks in
# tests/models/test_chameleon_tasks.py, Seamless in tests/models/test_seamless_inductor.py, BART in
# tests/test_generator_seq2seq.py.

def _regions_of(fn) -> list[str]:
    from mmcompile.runtime.generator import _unwrap

    return getattr(_unwrap(fn), "regions", [])


def test_gpt2_generates_what_model_generate_does_with_regions():
    from test_generator_transformers import build, prompts, reference

    kind = "gpt2"  # transformer.h.N layers, Conv1D weights, a tied LM head
    model = build(kind, "sdpa")
    gen = mmc.compile_generator(model, backend="inductor", max_batch=3, max_seq_len=64,
                                backend_options={"regions": "on"})
    note = _regions_of(gen.decode_fn)
    assert note and note[0].startswith("regions: 2 layers"), note
    batch = prompts([4, 9, 14], seed=2)
    out = gen.generate(batch, max_new_tokens=32)
    for row, p in zip(out, batch):
        ref = reference(model, p, 32)
        assert torch.equal(row[: ref.numel()], ref), kind


def test_hstu_ranking_equals_eager_with_regions():
    from mmcompile.models import hstu

    model = hstu.build("tiny", n_layers=3)
    batch = hstu.example_batch(model.config, 3, 24, num_candidates=3, seed=3)
    program = mmc.optimize(mmc.capture(model, (), batch), "default").program
    cut = mmc.lower(program, "inductor", regions="on")
    assert cut.regions[0].startswith("regions: "), cut.regions
    torch.testing.assert_close(cut(**batch), mmc.lower(program, "eager")(**batch), rtol=1e-4, atol=1e-4)


def test_auto_falls_back_to_the_whole_graph_when_a_region_fails_to_compile_and_on_says_so(monkeypatch):
    from mmcompile.backends import inductor, inductor_regions

    _, program, inputs = _llama_step(layers=4)

    class Failing:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("a region Inductor cannot lower")

    monkeypatch.setattr(inductor_regions, "RegionalRunner", Failing)
    monkeypatch.setattr(inductor, "_devices", lambda program: {"cuda"})  # "auto" plans as on the GPU
    compiled = mmc.lower(program, "inductor")
    assert compiled.regions == ["regions: off (compiling a region failed (RuntimeError: a region Inductor "
                                "cannot lower); compiled whole)"]
    want, _ = _run(mmc.lower(program, "eager"), inputs)
    got, _ = _run(compiled, inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(BackendError, match="a region Inductor cannot lower"):
        mmc.lower(program, "inductor", regions="on")  # asked for explicitly: the failure is the answer
