"""Model specs: one string names a model everywhere (Python, CLI, artifacts).

    llama:tiny | llama:7b | llama:8b     our Llama reference with random weights
    chameleon:tiny | chameleon:7b | chameleon:34b
                                         the Chameleon early-fusion decoder with random weights
    seamless:tiny | seamless:large       the SeamlessM4T-v2-like speech translator with random weights
    hstu:tiny | hstu:ml20m | hstu:large  the HSTU generative recommender with random weights
    hf:PATH                              a local transformers config or checkpoint directory
    py:FILE.py:FACTORY                   FACTORY() from a Python file, returning an nn.Module

``hf:`` directories of model_type llama (or mistral without sliding window) load into
``mmcompile.models.llama`` (which follows the generation protocol), of model_type chameleon into
``mmcompile.models.chameleon`` (the decoder; ``chameleon.from_pretrained`` also returns the tokenizer), of
model_type seamless_m4t_v2 into ``mmcompile.models.seamless``; other model types load through
transformers (``pip install mmcompile[hf]``), from the directory only — nothing is downloaded — with
eager attention: the fuse_attention pass recognizes and fuses it, so the library's own attention
dispatch is not needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from mmcompile.errors import ModelSpecError

__all__ = ["build", "parse_spec", "FAMILIES"]

FAMILIES = ("llama", "chameleon", "seamless", "hstu")
_EXAMPLES = ("llama:tiny, llama:7b, llama:8b, chameleon:7b, seamless:large, hstu:ml20m, hf:/path/to/checkpoint, "
             "py:models.py:make_model")


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``family:rest``; ModelSpecError with examples when malformed."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelSpecError(f"malformed model spec {spec!r}: expected FAMILY:NAME, e.g. {_EXAMPLES}")
    family, rest = spec.split(":", 1)
    if family not in FAMILIES + ("hf", "py") or not rest:
        raise ModelSpecError(
            f"unknown model spec {spec!r}: family must be one of {', '.join(FAMILIES + ('hf', 'py'))} "
            f"followed by a name, e.g. {_EXAMPLES}"
        )
    return family, rest


def build(spec: str, *, dtype: torch.dtype | None = None, device: Any = None, seed: int = 0,
          **overrides: Any) -> torch.nn.Module:
    """Build the model a spec names, in eval mode. Random weights unless the spec points at a checkpoint."""
    family, rest = parse_spec(spec)
    if family in FAMILIES:
        import importlib

        module = importlib.import_module(f"mmcompile.models.{family}")
        if rest not in module.CONFIGS:
            raise ModelSpecError(f"unknown {family} config {rest!r}; known: {', '.join(module.CONFIGS)}")
        try:
            model = module.build(rest, dtype=dtype or torch.float32, device=device, seed=seed, **overrides)
        except ValueError as e:
            raise ModelSpecError(f"{spec}: {e}") from e
    elif family == "hf":
        model = _build_hf(rest, dtype=dtype, device=device, seed=seed)
    else:
        model = _build_py(rest, spec)
        if dtype is not None or device is not None:
            model = model.to(device=device, dtype=dtype)
    return model.eval()


def model_type(path: str) -> str | None:
    """The ``model_type`` of a local transformers directory's config.json (None when unreadable)."""
    try:
        return json.loads((Path(path).expanduser() / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def _build_hf(path: str, *, dtype, device, seed) -> torch.nn.Module:
    directory = Path(path).expanduser()
    config_file = directory / "config.json"
    if not directory.is_dir() or not config_file.is_file():
        raise ModelSpecError(
            f"hf:{path}: no config.json in {directory}; hf: takes a local transformers config or checkpoint "
            "directory (nothing is downloaded)"
        )
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"hf:{path}: config.json is not valid JSON ({e})") from e
    has_weights = any(directory.glob("*.safetensors"))
    if config.get("model_type") == "seamless_m4t_v2":
        from mmcompile.models import seamless

        if not has_weights:
            raise ModelSpecError(f"hf:{path}: a Seamless directory needs its safetensors weights (for random weights "
                                 "use seamless:tiny|large)")
        return seamless.from_pretrained(directory, dtype=dtype, device=device)
    if config.get("model_type") == "chameleon":
        from mmcompile.models import chameleon

        if not has_weights:
            raise ModelSpecError(f"hf:{path}: a Chameleon directory needs its safetensors weights (for random "
                                 "weights use chameleon:tiny|7b|34b)")
        return chameleon.from_pretrained(directory, dtype=dtype, device=device)[0]
    if config.get("model_type") in ("llama", "mistral"):
        from mmcompile.models import llama

        if has_weights:
            return llama.from_pretrained(directory, dtype=dtype, device=device)
        try:
            cfg = llama.config_from_hf(config)
        except ValueError as e:
            raise ModelSpecError(f"hf:{path}: {e}") from e
        torch.manual_seed(seed)
        model = llama.Llama(cfg)
        llama.init_weights(model, seed=seed)
        return model.to(device=device, dtype=dtype or torch.float32)
    try:
        import transformers
    except ImportError:
        raise ModelSpecError(
            f"hf:{path} is a {config.get('model_type')!r} model, which loads through transformers: "
            "pip install 'mmcompile[hf]'"
        ) from None
    if has_weights:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype,
                                                                  attn_implementation="eager")
    else:
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(directory),
                                                              attn_implementation="eager")
        if dtype is not None:
            model = model.to(dtype)
    return model.to(device) if device is not None else model


def _build_py(rest: str, spec: str) -> torch.nn.Module:
    if ":" not in rest:
        raise ModelSpecError(f"malformed model spec {spec!r}: expected py:FILE.py:FACTORY")
    file, factory = rest.rsplit(":", 1)
    if not os.path.isfile(file):
        raise ModelSpecError(f"{spec}: file {file!r} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"mmcompile_user_{Path(file).stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ModelSpecError(f"{spec}: importing {file} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise ModelSpecError(f"{spec}: {file} has no callable {factory!r}")
    model = fn()
    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(f"{spec}: {factory}() returned {type(model).__name__}, not a torch.nn.Module")
    return model
