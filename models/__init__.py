"""Reference model families, built from a spec string with random weights.

``build("llama:tiny")``, ``build("llama:7b", dtype=torch.bfloat16, device="cuda")``,
``build("hf:/path/to/checkpoint")`` (a local transformers config or checkpoint directory),
``build("py:my_models.py:make_model")`` (a factory in a Python file).
"""

from mmcompile.models.specs import FAMILIES, build, parse_spec  # noqa: F401
