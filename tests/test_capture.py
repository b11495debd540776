"""Tests of mmcompile.capture and the Program it returns (mmcompile/capture.py, mmcompile/program.py).

Our tiny Llama (prefill, decode, dynamic sequence length), transformers models built from tiny configs,
Program views (printer, op counts, networkx, state inputs), clone(), input checks and capture errors.
"""

import os

import networkx as nx
import pytest
import torch
from torch.export import Dim

import mmcompile as mmc
from mmcompile.testing import assert_close

aten = torch.ops.aten
TINY = mmc.models.build("llama:tiny").config
B, CACHE_LEN = 2, 16


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("MMCOMPILE_VERIFY", raising=False)


@pytest.fixture(scope="module")
def llama():
    return mmc.models.build("llama:tiny")


def _cache(model, seed=None, batch=B, length=CACHE_LEN):
    """A KV cache: zeros, or (seed given) random contents standing in for an earlier prefill."""
    cache = model.empty_cache(batch, length)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        cache = [(torch.randn(k.shape, generator=g), torch.randn(v.shape, generator=g)) for k, v in cache]
    return cache


def _clone_cache(cache):
    return [(k.clone(), v.clone()) for k, v in cache]


def _prefill_args(model, S=8, batch=B):
    tokens = torch.randint(0, TINY.vocab_size, (batch, S), generator=torch.Generator().manual_seed(S))
    input_pos = torch.arange(S).expand(batch, S).contiguous()
    return tokens, input_pos, _cache(model, batch=batch)


def _decode_args(model):
    tokens = torch.tensor([[7], [42]])
    input_pos = torch.tensor([[5], [9]])  # rows at different positions
    return tokens, input_pos, _cache(model, seed=1)


@pytest.fixture(scope="module")
def prefill(llama):
    args = _prefill_args(llama)
    return mmc.capture(llama, args), args


@pytest.fixture(scope="module")
def decode(llama):
    args = _decode_args(llama)
    return mmc.capture(llama, args), args


def _assert_matches_eager(prog, model, tokens, input_pos, cache):
    """prog and the eager model, each on its own copy of the cache: same logits, same updated cache."""
    prog_cache, eager_cache = _clone_cache(cache), _clone_cache(cache)
    out = prog(tokens, input_pos, prog_cache)
    with torch.no_grad():
        ref = model(tokens, input_pos, eager_cache)
    assert_close(out, ref, msg="logits: ")
    assert_close(prog_cache, eager_cache, msg="cache after the step: ")
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(prog_cache, cache)), "the cache was not updated"


# ---------------------------------------------------------------------------------------------- our Llama


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_llama_capture_matches_eager_and_verifies(request, llama, phase):
    prog, args = request.getfixturevalue(phase)
    missing = [n for n in prog.graph.nodes if n.op != "output" and "val" not in n.meta]
    # Only side-effect nodes that return nothing (export's runtime dtype/shape asserts) have no value.
    assert all(op.startswith("_assert") for op in {str(n.target.__name__) for n in missing}), missing
    assert all(isinstance(n.meta["val"], torch.Tensor) for n in prog.placeholders())
    prog.verify(run=True)
    _assert_matches_eager(prog, llama, *args)


def test_capture_does_not_touch_the_example_inputs(llama):
    tokens, input_pos, cache = _prefill_args(llama)
    mmc.capture(llama, (tokens, input_pos, cache))
    assert all(not k.any() and not v.any() for k, v in cache)


def test_llama_state_inputs_are_exactly_the_cache(prefill):
    prog, (tokens, input_pos, cache) = prefill
    placeholders = prog.placeholders()
    state = prog.state_inputs()
    assert [n.name for n in placeholders[:2]] == ["tokens", "input_pos"]
    assert state == placeholders[2:]
    state_values = [prog.example_inputs[placeholders.index(n)] for n in state]
    cache_tensors = [t for kv in cache for t in kv]
    assert len(state_values) == len(cache_tensors) == 2 * TINY.n_layers
    assert all(a is b for a, b in zip(state_values, cache_tensors))


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_llama_op_counts_keep_sdpa_whole(request, phase):
    prog, _ = request.getfixturevalue(phase)
    counts = prog.op_counts()
    assert counts["aten.scaled_dot_product_attention.default"] == TINY.n_layers
    assert counts["aten.mm.default"] > 0
    assert counts["aten.embedding.default"] == 1
    assert counts["aten.copy_.default"] == 2 * TINY.n_layers  # one cache write-back per k and v
    assert "aten.linear.default" not in counts  # decomposed to the core set
    assert sum(counts.values()) == sum(1 for n in prog.graph.nodes if n.op == "call_function")


def test_llama_printed_ir(prefill):
    prog, _ = prefill
    text = str(prog)
    lines = text.splitlines()
    assert lines[0].startswith("program Llama(%tokens: i64[2, 8], %input_pos: i64[2, 8], %cache_0_0: f32[2, 2, 16, 16]")
    assert lines[0].endswith(") {") and lines[-1] == "}"
    assert "  %tok_embeddings_weight: f32[256, 64] = constant tok_embeddings.weight" in lines
    assert "  %layers_0_attention_wq_weight: f32[64, 64] = constant layers.0.attention.wq.weight" in lines
    assert any(line.startswith("  %embedding: f32[2, 8, 64] = aten.embedding(%tok_embeddings_weight, %tokens")
               for line in lines)
    assert sum("aten.scaled_dot_product_attention(" in line for line in lines) == TINY.n_layers
    assert lines[-2].startswith("  return [%")
    assert repr(prog).startswith("<Program Llama: ")


def test_llama_to_networkx(prefill):
    prog, _ = prefill
    g = prog.to_networkx()
    assert nx.is_directed_acyclic_graph(g)
    assert g.number_of_nodes() == len(prog.graph.nodes)
    (emb,) = [n for n in prog.graph.nodes if n.target is aten.embedding.default]
    weight = emb.args[0]
    assert weight.op == "get_attr" and weight.target == "tok_embeddings.weight"
    assert g.has_edge(weight.name, emb.name)
    assert g.nodes[emb.name]["target"] == "aten.embedding.default"
    assert g.nodes[emb.name]["shape"] == (B, 8, TINY.dim)
    assert g.nodes[weight.name]["op"] == "get_attr"
    assert g.number_of_edges() == sum(len(n.all_input_nodes) for n in prog.graph.nodes)


# ---------------------------------------------------------------------------------------------- dynamic shapes


@pytest.fixture(scope="module")
def dynamic(llama):
    seq = Dim("seq", min=2, max=12)
    cache_spec = [(None, None)] * TINY.n_layers
    prog = mmc.capture(llama, _prefill_args(llama, S=8),
                       dynamic_shapes={"tokens": {1: seq}, "input_pos": {1: seq}, "cache": cache_spec})
    return prog


def test_dynamic_seq_runs_at_two_lengths(llama, dynamic):
    assert str(dynamic).splitlines()[0].startswith("program Llama(%tokens: i64[2, s")
    for S in (3, 11):
        _assert_matches_eager(dynamic, llama, *_prefill_args(llama, S=S))
    dynamic.verify(run=True)


@pytest.mark.parametrize("S", [1, 13])
def test_shape_error_outside_the_compiled_range(llama, dynamic, S):
    with pytest.raises(mmc.ShapeError, match=r"input tokens has size %d in dimension 1, outside the compiled "
                                             r"range \[2, 12\]" % S):
        dynamic(*_prefill_args(llama, S=S))


def test_shape_error_for_a_wrong_static_size(llama, dynamic):
    tokens, input_pos, _ = _prefill_args(llama, S=4)
    with pytest.raises(mmc.ShapeError, match=r"input cache_0_0 has size 17 in dimension 2 .* compiled for 16 \(static\)"):
        dynamic(tokens, input_pos, _cache(llama, length=17))
    with pytest.raises(mmc.ShapeError, match=r"input tokens has size 3 in dimension 0 .* compiled for 2"):
        dynamic(*_prefill_args(llama, S=4, batch=3))


def test_shape_error_for_a_wrong_dtype(llama, dynamic):
    tokens, input_pos, cache = _prefill_args(llama, S=4)
    with pytest.raises(mmc.ShapeError, match=r"input input_pos is i32\[2, 4\] but the Program was compiled for "
                                             r"i64\[2, s\d+\]"):
        dynamic(tokens, input_pos.int(), cache)
    with pytest.raises(mmc.ShapeError, match=r"input cache_1_1 is f64"):
        dynamic(tokens, input_pos, cache[:1] + [(cache[1][0], cache[1][1].double())])


def test_shape_error_for_a_different_call_structure(llama, prefill):
    prog, (tokens, input_pos, cache) = prefill
    with pytest.raises(mmc.ShapeError, match="same positional/keyword arguments"):
        prog(tokens, input_pos, cache[:1])


# ---------------------------------------------------------------------------------------------- transformers


def _hf_llama(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def _hf_gpt2(attn):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("build, attn", [(_hf_llama, "eager"), (_hf_llama, "sdpa"), (_hf_gpt2, "eager")],
                         ids=["llama-eager", "llama-sdpa", "gpt2-eager"])
def test_transformers_model_matches_eager(build, attn):
    model = build(attn)
    assert model.config._attn_implementation == attn
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    prog = mmc.capture(model, (ids,), {"use_cache": False})
    prog.verify(run=True)
    out = prog(ids, use_cache=False)
    with torch.no_grad():
        ref = model(ids, use_cache=False)
    assert type(out) is type(ref)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    other = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))  # not just the example
    with torch.no_grad():
        torch.testing.assert_close(prog(other, use_cache=False).logits, model(other, use_cache=False).logits,
                                   rtol=1e-5, atol=1e-5)
    n_sdpa = prog.op_counts()["aten.scaled_dot_product_attention.default"]
    assert n_sdpa == (2 if attn == "sdpa" else 0)


# ---------------------------------------------------------------------------------------------- clone


def test_clone_has_its_own_graph_and_shares_constants(prefill):
    prog, (tokens, input_pos, cache) = prefill
    before = str(prog)
    n_nodes = len(prog.graph.nodes)
    copy = prog.clone()
    assert str(copy) == before
    assert copy.graph is not prog.graph and copy.graph_module is not prog.graph_module

    # Negate the first output in the copy only.
    out = copy.graph.output_node()
    logits = out.args[0][0]
    with copy.graph.inserting_before(out):
        neg = copy.graph.call_function(aten.neg.default, (logits,))
    neg.meta["val"] = logits.meta["val"]
    out.args = ((neg,) + tuple(out.args[0][1:]),)
    copy.graph_module.recompile()
    copy.metadata["touched"] = True
    copy.verify()

    assert str(prog) == before and len(prog.graph.nodes) == n_nodes
    assert "touched" not in prog.metadata
    a = prog(tokens, input_pos, _clone_cache(cache))
    b = copy(tokens, input_pos, _clone_cache(cache))
    torch.testing.assert_close(b, -a)

    assert prog.constants().keys() == copy.constants().keys()
    assert all(copy.constants()[k] is v for k, v in prog.constants().items())


# ---------------------------------------------------------------------------------------------- errors


class DataDependentBranch(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x + 1
        return x - 1


def test_data_dependent_control_flow_names_the_source_line():
    with pytest.raises(mmc.CaptureError) as info:
        mmc.capture(DataDependentBranch(), (torch.randn(3),))
    msg = str(info.value)
    assert "could not capture DataDependentBranch" in msg
    assert "data-dependent" in msg
    assert os.path.basename(__file__) in msg
    assert "if x.sum() > 0:" in msg


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, y=None):
        return self.lin(x)


class Opaque:
    pass


def test_unsupported_positional_input_type():
    with pytest.raises(mmc.CaptureError, match=r"unsupported input type: the input at args\[1\] is a builtins\.object"):
        mmc.capture(TwoInputs(), (torch.randn(2, 4), object()))


def test_unsupported_nested_keyword_input_type():
    with pytest.raises(mmc.CaptureError) as info:
        mmc.capture(TwoInputs(), (torch.randn(2, 4),), {"y": [torch.zeros(1), Opaque()]})
    msg = str(info.value)
    assert "unsupported input type" in msg
    assert "kwargs['y'][1]" in msg and "Opaque" in msg
    assert "register_pytree_node" in msg


def test_wrong_argument_count_mentions_the_arguments():
    with pytest.raises(mmc.CaptureError) as info:
        mmc.capture(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4)))
    msg = str(info.value)
    assert "could not capture TwoInputs" in msg
    assert "check the arguments passed to capture()" in msg
    assert "too many positional arguments" in msg


def test_missing_argument_mentions_the_arguments():
    with pytest.raises(mmc.CaptureError, match=r"arguments passed to capture\(\)(.|\n)*missing a required argument"):
        mmc.capture(TwoInputs(), (), {"y": torch.randn(2, 4)})


def test_forward_that_raises_names_the_model_line(llama):
    tokens, input_pos, cache = _prefill_args(llama)
    with pytest.raises(mmc.CaptureError) as info:
        mmc.capture(llama, (tokens, input_pos, cache[:1]))
    msg = str(info.value)
    assert "ValueError: cache has 1 layers but the model has 2" in msg
    assert "llama.py" in msg and "raise ValueError" in msg


def test_capture_needs_a_callable():
    with pytest.raises(mmc.CaptureError, match="needs an nn.Module or a callable, got int"):
        mmc.capture(3, (torch.randn(2),))


def test_capture_of_a_plain_function():
    def mlp(x, w):
        return torch.relu(x @ w) + 1

    x, w = torch.randn(2, 3), torch.randn(3, 4)
    prog = mmc.capture(mlp, (x, w))
    prog.verify(run=True)
    torch.testing.assert_close(prog(x, w), mlp(x, w))
    x2 = torch.randn(2, 3)
    torch.testing.assert_close(prog(x2, w), mlp(x2, w))
    assert prog.op_counts()["aten.mm.default"] == 1
    assert prog.state_inputs() == [] and prog.constants() == {}


def test_capture_accepts_a_single_tensor_and_a_name():
    prog = mmc.capture(lambda x: x * 2, torch.ones(3), name="double")
    assert str(prog).startswith("program double(")
    torch.testing.assert_close(prog(torch.ones(3)), torch.full((3,), 2.0))


# ---------------------------------------------------------------------------------------------- training flag


class Dropper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(x) * 2


def test_capture_restores_training_flag_and_captures_eval_mode():
    model = Dropper().train()
    x = torch.ones(4, 8)
    prog = mmc.capture(model, (x,))
    assert model.training and model.drop.training
    torch.testing.assert_close(prog(x), x * 2)  # dropout is off in the captured graph

    model.eval()
    mmc.capture(model, (x,))
    assert not model.training and not model.drop.training


def test_capture_restores_training_flag_on_failure():
    model = DataDependentBranch().train()
    with pytest.raises(mmc.CaptureError):
        mmc.capture(model, (torch.randn(3),))
    assert model.training
