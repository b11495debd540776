"""mmcompile: make multimodal generative models fast at inference time.

    import mmcompile as mmc
    prog = mmc.capture(model, args)                      # torch.export -> Program
    result = mmc.optimize(prog, passes="default")        # pass pipeline -> optimized Program
    fast = mmc.lower(result.program, backend="inductor") # backend -> Compiled
    gen = mmc.compile_generator(model)                   # prefill + decode, static KV cache
"""

from __future__ import annotations

__version__ = "0.1.0"

import warnings as _warnings

# torch.export's pytree specs trip a deprecation inside torch itself when copied; not actionable here
_warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*", category=FutureWarning)

from mmcompile.errors import (  # noqa: F401
    BackendError, CaptureError, MMCompileError, ModelSpecError, PassContractError, PipelineError,
    ShapeError, VerificationError,
)
from mmcompile.program import Program  # noqa: F401
from mmcompile.capture import capture  # noqa: F401
from mmcompile.pipeline import Pass, PassReport, OptimizeResult, optimize, DEFAULT_PIPELINE  # noqa: F401
from mmcompile import passes  # noqa: F401  (registry + built-in passes)
from mmcompile import backends  # noqa: F401
from mmcompile.compile import lower, compile  # noqa: F401,A004
from mmcompile.artifact import load  # noqa: F401
from mmcompile import models  # noqa: F401
from mmcompile.runtime import Generator, SamplingConfig, compile_chameleon, compile_generator, compile_seamless  # noqa: F401

__all__ = [
    "capture", "optimize", "lower", "compile", "load", "compile_generator", "compile_chameleon", "compile_seamless", "Program", "Pass", "PassReport",
    "OptimizeResult", "Generator", "SamplingConfig", "passes", "backends", "models", "MMCompileError",
    "CaptureError", "PipelineError", "PassContractError", "BackendError", "ModelSpecError", "ShapeError",
    "VerificationError", "DEFAULT_PIPELINE",
]
