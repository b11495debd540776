"""Runtime: the Generator that drives compiled phases over a static KV cache, and Chameleon's and Seamless's tasks."""

from mmcompile.runtime.generator import GenerationStats, Generator, Seq2SeqGenerator, compile_generator  # noqa: F401
from mmcompile.runtime.sampling import LogitsRule, SamplingConfig, sample  # noqa: F401
from mmcompile.runtime.chameleon import ChameleonGenerator, compile_chameleon  # noqa: F401
from mmcompile.runtime.seamless import SeamlessTranslator, compile_seamless  # noqa: F401
