"""The mmcompile command line, end to end through a subprocess (argument errors in this process)."""

import subprocess

import pytest
import torch


def mmcompile(*args, timeout=600):
    return subprocess.run(["mmcompile", *args], capture_output=True, text=True, timeout=timeout)


def run_in_process(args, capsys):
    """``mmcompile ARGS`` in this process: (exit status, stderr) as the command would give them."""
    from mmcompile.cli import main

    said = ""
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's usage errors (2), or a message that Python prints, exiting with 1
        rc, said = (e.code, "") if isinstance(e.code, int) else (1, str(e.code))
    return rc, capsys.readouterr().err + said


def test_passes_lists_every_registered_pass_with_its_doc():
    r = mmcompile("passes")
    assert r.returncode == 0, r.stderr
    for name in ("canonicalize", "fold_constants", "eliminate_dead_code"):
        assert name in r.stdout
    assert "Remove side-effect-free nodes" in r.stdout
    assert "fp8_scales" in r.stdout and "error_budget" in r.stdout  # each pass's options, for --pass-option


def test_compile_llama_tiny_default_backend_prints_summary_and_backend_options_reach_the_backend():
    r = mmcompile("compile", "llama:tiny", "--max-new-tokens", "12", "--backend-option", "regions=on",
                  "--backend-option", 'inductor_config={"max_autotune": false}')
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "backend inductor" in out
    assert "decode tokens/s" in out and "compile time" in out
    assert "canonicalize" in out and "fold_views" in out  # op counts per pass
    assert "matches eager token for token: yes" in out
    assert "CUDA graphs: off" in out and "need a CUDA device" in out
    # the options reached the backend (a misspelt or malformed option: the table below)
    assert "decode step regions: 2 layers of layers in 1 distinct structure" in out


def test_compile_with_prompt_ids_batch_and_eager_backend(tmp_path):
    r = mmcompile("compile", "llama:tiny", "--backend", "eager", "--prompt-ids", "1,2,3;4,5,6,7,8",
                  "--max-new-tokens", "5", "--dump-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "matches eager token for token: yes" in r.stdout + r.stderr
    assert "batch 2" in r.stdout + r.stderr
    assert (tmp_path / "decode.txt").read_text().startswith("program llama.decode(")


def test_pass_options_reach_the_pass(tmp_path):
    """--pass-option PASS.KEY=VALUE: int4 in groups of 32 instead of the default 128 (the packed weights'
    names say their group size in the dumped program)."""
    r = mmcompile("compile", "llama:tiny", "--backend", "eager", "--max-new-tokens", "3", "--quantize", "int4",
                  "--pass-option", "quantize_linear.group_size=32", "--dump-dir", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    program = (tmp_path / "decode.txt").read_text()
    assert "int4_g32" in program and "int4_g128" not in program


def test_compile_hf_checkpoint_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    r = mmcompile("compile", f"hf:{tmp_path}", "--backend", "eager", "--max-new-tokens", "4", "--prompt-len", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "matches eager token for token: yes" in r.stdout + r.stderr


def test_explain_shows_diff_and_report():
    r = mmcompile("explain", "llama:tiny", "--pass", "canonicalize")
    assert r.returncode == 0, r.stderr
    assert "--- before canonicalize" in r.stdout and "+++ after canonicalize" in r.stdout
    assert "canonicalize: " in r.stdout and "fold_views=" in r.stdout


def test_explain_notes_why_fold_constants_left_weights_alone():
    r = mmcompile("explain", "llama:tiny", "--pass", "fold_constants", "--phase", "prefill")
    assert r.returncode == 0, r.stderr
    assert "did not change the IR" in r.stdout
    assert "layout ops only" in r.stdout


@pytest.mark.parametrize("args,code,message", [
    (["compile", "llama:huge"], 1, "unknown llama config 'huge'"),
    (["compile", "nonsense"], 1, "malformed model spec"),
    (["compile", "llama:tiny", "--backend", "tensorrt"], 1, "unknown backend 'tensorrt'"),
    (["compile", "llama:tiny", "--passes", "fuse_everything"], 1, "unknown pass 'fuse_everything'"),
    (["compile", "llama:tiny", "--prompt-ids", "1,x"], 2, "--prompt-ids takes comma-separated integers"),
    (["compile", "llama:tiny", "--prompt-ids", "1,999"], 1, "outside the model's vocabulary"),
    (["compile", "llama:tiny", "--max-new-tokens", "0"], 2, "expected a positive integer"),
    (["explain", "llama:tiny", "--pass", "canonicalise"], 1, "did you mean 'canonicalize'"),
    (["explain", "llama:tiny"], 2, "--pass"),
    ([], 2, "COMMAND"),
    (["compile", "llama:tiny", "--backend-option", "region=on"], 1,
     "inductor: unknown option 'region'; its options are mode, inductor_config"),
    (["compile", "llama:tiny", "--backend-option", "regions"], 2, "--backend-option takes KEY=VALUE"),
    (["compile", "llama:tiny", "--pass-option", "group_size=64"], 2, "--pass-option takes PASS.KEY=VALUE"),
    (["compile", "llama:tiny", "--pass-option", "quantize_linear.group_size=64"], 1,
     "the pipeline does not run quantize_linear (it runs canonicalize, "),
    (["compile", "llama:tiny", "--quantize", "fp8", "--pass-option", "quantize_linear.fp8_scale=tensor"], 1,
     "quantize_linear has no option 'fp8_scale'; it takes mode, layers, exclude, lm_head, embeddings, group_size"),
    (["compile", "llama:tiny", "--quantize", "int8", "--pass-option", "quantize_linear.mode=int4"], 1,
     "give the quantization mode once"),
    (["compile", "seamless:tiny", "--task", "text-to-text", "--quantize", "int8"], 1,
     "--quantize and --pass-option are not available for Seamless's tasks yet"),
])
def test_bad_arguments_give_one_clear_message(args, code, message, capsys):
    # in this process (a subprocess per case cost a torch import each): an exception escaping main() fails
    # the test with its traceback, exactly as it would have printed one
    rc, err = run_in_process(args, capsys)
    assert rc == code, err
    assert message in err


def test_help_teaches_model_specs():
    r = mmcompile("compile", "--help")
    assert r.returncode == 0
    assert "hf:PATH" in r.stdout and "examples:" in r.stdout


def test_explain_fuse_attention_on_a_transformers_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    r = mmcompile("explain", f"hf:{tmp_path}", "--pass", "fuse_attention", "--phase", "prefill")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-  %_softmax" in r.stdout and "+  %scaled_dot_product_attention" in r.stdout
    assert "fuse_attention: fused=2, fused.causal=2" in r.stdout


def test_compile_generates_with_an_unmodified_transformers_gpt2_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    # prompts holding token 0, the pad id: the eager baseline must not take them for padding
    r = mmcompile("compile", f"hf:{tmp_path}", "--backend", "eager", "--max-new-tokens", "6", "--prompt-ids",
                  "44,47,53,0,3;0,3,39,9,19")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "rewrite_kv_cache" in out and "matches eager token for token: yes" in out


def test_compile_with_int8_quantization_reports_it():
    r = mmcompile("compile", "llama:tiny", "--backend", "eager", "--max-new-tokens", "8", "--quantize", "int8")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "quantized.int8=8" in out and "quantized (int8):" in out and "of tokens equal to the float" in out


def test_explain_rewrite_kv_cache_on_a_transformers_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    r = mmcompile("explain", f"hf:{tmp_path}", "--pass", "rewrite_kv_cache")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "+  %index_put" in r.stdout and "aten.copy_(%kv_cache_0_k" in r.stdout
    assert "rewrite_kv_cache: buffers=4, layers=2, rewritten.growing=4" in r.stdout


def test_compile_to_an_artifact_then_run_it(tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "tiny-ort"
    r = mmcompile("compile", "llama:tiny", "--backend", "onnxruntime", "-o", str(out), "--batch", "2",
                  "--max-new-tokens", "6")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "manifest.json").is_file() and (out / "decode" / "model.onnx").is_file()
    r = mmcompile("run", str(out), "--prompt-ids", "1,2,3;4,5", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout + r.stderr
    assert "loaded" in text and "onnxruntime" in text and "decode" in text
    rows = [line for line in text.splitlines() if line.startswith(("1 2 3 ", "4 5 "))]
    assert len(rows) == 2 and len(rows[0].split()) == 8
    r = mmcompile("compile", "llama:tiny", "--backend", "eager", "-o", str(tmp_path / "x"))
    assert r.returncode == 1 and "use --backend inductor or onnxruntime" in r.stderr
