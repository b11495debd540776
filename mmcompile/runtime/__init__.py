"""Runtime: the Generator that drives compiled phases over a static KV cache."""

from mmcompile.runtime.generator import GenerationStats, Generator, Seq2SeqGenerator, compile_generator  # noqa: F401
from mmcompile.runtime.sampling import SamplingConfig, sample  # noqa: F401
