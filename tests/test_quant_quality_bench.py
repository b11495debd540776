"""bench/quant_quality.py measures perplexity on a local text with a local checkpoint and tokenizer."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(60)]


def _checkpoint(directory: Path) -> Path:
    """A tiny transformers Llama with random weights and a word-level tokenizer, as save_pretrained writes them."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(directory)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(directory)
    return directory


def test_perplexity_on_a_text_matches_the_checkpoint_run_eagerly(tmp_path):
    import quant_quality

    ckpt = _checkpoint(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (200,), generator=g)))
    out = tmp_path / "rows.jsonl"
    assert quant_quality.main(["--model", f"hf:{ckpt}", "--text", str(text), "--seq-len", "16", "--batch", "4",
                               "--prompts", "8", "--modes", "int8,int4", "--json", str(out)]) == 0
    rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["int8"]["positions"] == 8 * 16 and rows["int8"]["quantized_layers"] > 0

    # the float perplexity is the eager checkpoint's: transformers' own loss over the same windows
    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    ids = tokenizer(text.read_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0][:8 * 16]
    with torch.no_grad():
        loss = model(input_ids=ids.reshape(8, 16), labels=ids.reshape(8, 16)).loss
    want = float(torch.exp(loss))
    assert rows["int8"]["float_perplexity"] == pytest.approx(want, rel=1e-4)
    # int8 weights barely move it; int4 moves it more, and both stay finite
    assert rows["int8"]["perplexity"] == pytest.approx(want, rel=1e-2)
    assert 1 < rows["int4"]["perplexity"] < 2 * want
    assert abs(rows["int4"]["perplexity"] - want) > abs(rows["int8"]["perplexity"] - want)


def test_a_text_without_a_tokenizer_or_too_short_says_what_to_do(tmp_path):
    import quant_quality

    text = tmp_path / "t.txt"
    text.write_text("w1 w2 w3")
    with pytest.raises(SystemExit, match="needs a tokenizer"):
        quant_quality.main(["--model", "llama:tiny", "--text", str(text)])
    ckpt = _checkpoint(tmp_path / "ckpt")
    with pytest.raises(SystemExit, match="gives 0 windows of 32 tokens"):
        quant_quality.main(["--model", f"hf:{ckpt}", "--text", str(text)])


def test_the_float32_reference_compares_the_same_weights_rounded_to_the_dtype(tmp_path):
    import quant_quality

    out = tmp_path / "rows.jsonl"
    common = ["--model", "llama:tiny", "--prompts", "8", "--batch", "4", "--seq-len", "8", "--modes", "int4",
              "--json", str(out)]
    assert quant_quality.main([*common, "--dtype", "bfloat16", "--float32-reference"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in rows] == ["bfloat16, not quantized (against float32)", "int4"]
    ref, int4 = rows
    # the same weights: rounding to bf16 keeps nearly every argmax (other weights would keep about 1 in 256),
    # yet it is not the bf16 model against itself
    assert ref["top1_agreement"] > 0.9 and 0 < ref["kl"] < int4["kl"]
    assert ref["positions"] == int4["positions"] == 8 * 8 and ref["quantized_layers"] == 0
    out.unlink()
    assert quant_quality.main([*common, "--dtype", "float32", "--float32-reference"]) == 0  # nothing to compare
    assert [json.loads(line)["mode"] for line in out.read_text().splitlines()] == ["int4"]
