"""Errors raised by mmcompile.

Every error a user can cause has its own type and one message that names what is wrong and what to
do about it. All derive from :class:`MMCompileError`, so ``except mmc.MMCompileError`` catches them.
"""


class MMCompileError(Exception):
    """Base class of every error mmcompile raises on purpose."""


class CaptureError(MMCompileError):
    """torch.export could not capture the model; the message gives the likely cause and source line."""


class VerificationError(MMCompileError):
    """A Program broke one of its invariants (see ``Program.verify``)."""


class PipelineError(MMCompileError):
    """The pass pipeline is malformed (unknown pass, cycle, missing requirement) or a pass failed."""


class PassContractError(PipelineError):
    """A pass broke its contract: returned no PassReport, or changed the graph while reporting no change."""


class BackendError(MMCompileError):
    """A backend is unknown, not installed, or failed to lower a Program."""


class ModelSpecError(MMCompileError):
    """A model spec such as ``llama:tiny`` or ``hf:PATH`` could not be resolved."""


class ShapeError(MMCompileError):
    """Inputs fall outside the shapes a Program or Generator was compiled for."""
