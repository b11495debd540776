"""Seamless's tasks end to end: speech and text in, text and speech out, every phase compiled.

The tasks (``TASKS``):

- ``speech-to-text``: a 16 kHz waveform -> log-mel features -> speech encoder -> the text decoder's
  cross-attention cache -> target-language tokens (greedy or beam search);
- ``text-to-text``: source tokens -> text encoder -> the same decoding;
- ``speech-to-speech`` and ``text-to-speech``: the translation above, then the text decoder's states
  over the translated tokens -> text-to-unit model -> speech units -> unit HiFi-GAN -> a waveform.

The phases are the model's pieces with static shapes: ``speech_encoder`` and ``text_encoder`` (inputs
padded to a bucket of frames or tokens), ``cross`` (fills the decoder cache's cross-attention keys,
values and source mask once per request), the decoder's prefill and decode step (a ``Generator``,
with CUDA graphs where ``capture_decode_loop`` proves them safe), ``decoder_hidden`` (the decoder's
states over the finished translation), ``t2u_characters``, ``t2u_units``, ``unit_durations`` and
``vocode``. The lengths that depend on data — how many frames each character and each unit lasts — are
read back between phases, and the next phase's inputs are gathered by index on the device, padded to a
bucket. Batches are padded to ``max_batch`` rows.

``compile_seamless`` captures, optimizes (default pipeline) and lowers every phase, compiling a phase
again for each new bucket the first time it is needed; ``SeamlessTranslator.from_module`` runs the same
code eagerly — the reference the compiled one is checked against. ``read_wav`` / ``write_wav`` use the
standard library's ``wave`` module (16-bit PCM).
"""

from __future__ import annotations

import dataclasses
import time
import wave
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from mmcompile.errors import ShapeError
from mmcompile.runtime.cuda_graphs import graphed
from mmcompile.runtime.generator import Generator, compile_generator, timed

__all__ = ["TASKS", "SeamlessTranslator", "Translation", "compile_seamless", "read_wav", "write_wav", "bucket"]

TASKS = ("speech-to-text", "speech-to-speech", "text-to-text", "text-to-speech")
PHASES = ("speech_encoder", "text_encoder", "cross", "decoder_hidden", "t2u_characters", "t2u_units",
          "unit_durations", "vocode")


@dataclasses.dataclass
class Translation:
    """What ``translate`` returns: ``tokens`` — per row, the translated text tokens (no start, language or
    end token); for speech output also ``units`` (per row, the vocoder's speech units) and ``waveforms``
    (per row, float samples in [-1, 1] at ``sample_rate``)."""

    tokens: list[Tensor]
    units: list[Tensor] | None = None
    waveforms: list[Tensor] | None = None
    sample_rate: int = 16000


def bucket(n: int, minimum: int = 16) -> int:
    """The padded length for ``n``: the next power of two, at least ``minimum``."""
    size = minimum
    while size < n:
        size *= 2
    return size


class Phase(nn.Module):
    """One method of the model as a module (what capture takes)."""

    def __init__(self, model: nn.Module, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args):
        return getattr(self.model, self.method)(*args)


class _PerShape:
    """A phase compiled once per distinct input shape (the translator pads inputs to buckets first) and, on
    a GPU with ``graph_pool`` set, replayed as a CUDA graph when ``capture_decode_loop`` proved it
    capturable: these phases run once per request, so launching their kernels one by one costs more than
    computing them."""

    def __init__(self, name: str, module: nn.Module, compile_fn: Callable, progress: Callable[[str], None],
                 graph_pool=None):
        self.name, self.module, self.compile_fn, self.progress = name, module, compile_fn, progress
        self.compiled: dict = {}
        self.graphs: dict = {}
        self.graph_pool = graph_pool

    def _key(self, args) -> tuple:
        flat, _ = torch.utils._pytree.tree_flatten(args)
        return tuple(tuple(t.shape) for t in flat if isinstance(t, Tensor))

    def __call__(self, *args):
        key = self._key(args)
        if key not in self.compiled:
            self.progress(f"compile {self.name} {list(key[0])}")
            self.compiled[key] = self.compile_fn(self.module, args)
            self.graphs[key] = graphed(self.compiled[key], args, self.graph_pool)
        return self.graphs[key](*args)

    @property
    def programs(self) -> list:
        return [c.program for c in self.compiled.values() if hasattr(c, "program")]


def _pad(x: Tensor, sizes: Sequence[int], value=0) -> Tensor:
    """``x`` padded at the end of its leading dims to ``sizes`` with ``value``."""
    out = torch.full((*sizes, *x.shape[len(sizes):]), value, dtype=x.dtype, device=x.device)
    out[tuple(slice(0, n) for n in x.shape[:len(sizes)])] = x
    return out


class SeamlessTranslator:
    """Seamless's four tasks over ``phases`` (callables named as in ``PHASES``) and a decoder Generator."""

    def __init__(self, config, phases: dict[str, Callable], generator: Generator, *, chars=None,
                 dtype: torch.dtype = torch.float32, compile_seconds: float = 0.0):
        from mmcompile.models.seamless import SubwordChars

        missing = [p for p in PHASES if p not in phases]
        if missing:
            raise ValueError(f"phases missing: {missing}")
        self.config, self.phases, self.generator = config, phases, generator
        self.max_batch, self.device, self.dtype = generator.max_batch, generator.device, dtype
        self.chars = chars or SubwordChars.random(config)
        self.compile_seconds = compile_seconds
        self.timings: dict[str, float] = {}
        if generator.cache[-1][0].shape[-1] != config.max_source_len:
            raise ShapeError("the Generator's cache and the config disagree on max_source_len")

    @classmethod
    def from_module(cls, model, *, max_batch: int = 1, max_seq_len: int | None = None, chars=None) -> "SeamlessTranslator":
        """The tasks run eagerly, as written: the reference the compiled ones are checked against."""
        from mmcompile.models.seamless import CrossAttentionState, TextDecoderLM

        model.eval()
        lm = TextDecoderLM(model)
        gen = Generator.from_module(lm, max_batch=max_batch, max_seq_len=max_seq_len or model.config.max_seq_len)
        hidden, cross = TextDecoderLM(model, output="hidden"), CrossAttentionState(model)
        phases = {name: getattr(model, method) for name, method in _METHODS.items()}
        phases.update(cross=cross, decoder_hidden=hidden)
        return cls(model.config, phases, gen, chars=chars, dtype=next(model.parameters()).dtype)

    # ------------------------------------------------------------------ pieces
    def _timed(self, name: str, fn, *args):
        return timed(self.timings, self.device, name, fn, *args)

    def _check_batch(self, n: int, per_row: int = 1) -> None:
        if n == 0:
            raise ValueError("nothing to translate: give at least one input")
        if n * per_row > self.max_batch:
            what = f"{n} inputs x {per_row} beams" if per_row > 1 else f"{n} inputs"
            raise ShapeError(f"{what} exceed the batch of {self.max_batch} the translator was compiled for; "
                             "recompile with a larger max_batch")

    def features(self, waveform: Tensor) -> Tensor:
        """Log-mel features of one waveform [T] (``models.seamless.fbank``)."""
        from mmcompile.models.seamless import fbank

        return fbank(waveform.float().cpu(), self.config)

    def source_states(self, frames: int) -> int:
        """Encoder states of an utterance of ``frames`` feature rows (the adaptor shortens it)."""
        from mmcompile.models.seamless import adaptor_lengths

        n = torch.tensor(frames)
        for _ in range(self.config.adaptor_layers):
            n = adaptor_lengths(n, self.config.adaptor_kernel, self.config.adaptor_stride)
        return int(n)

    def _check_source(self, states: int, what: str) -> None:
        limit = self.config.max_source_len
        if states > limit:
            raise ShapeError(f"{what} gives {states} encoder states, more than max_source_len={limit} the translator "
                             "was compiled for; shorten the input or rebuild with a larger max_source_len")

    def encode_speech(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Feature rows [T_i, F] -> encoder states [B, S, D] and mask [B, S] (B = max_batch, padded)."""
        longest = max(f.shape[0] for f in features)
        self._check_source(self.source_states(longest), f"speech of {longest} feature frames")
        T = bucket(longest, 32)
        x = torch.zeros(self.max_batch, T, self.config.feature_dim, dtype=self.dtype, device=self.device)
        mask = torch.zeros(self.max_batch, T, dtype=torch.bool, device=self.device)
        for i, f in enumerate(features):
            x[i, :f.shape[0]] = f.to(self.device, self.dtype)
            mask[i, :f.shape[0]] = True
        return self._timed("speech_encoder", self.phases["speech_encoder"], x, mask)

    def encode_text(self, tokens: list[Tensor]) -> tuple[Tensor, Tensor]:
        longest = max(t.numel() for t in tokens)
        self._check_source(longest, f"a source of {longest} tokens")
        S = bucket(longest)
        x = torch.full((self.max_batch, S), self.config.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(self.max_batch, S, dtype=torch.bool, device=self.device)
        for i, t in enumerate(tokens):
            x[i, :t.numel()] = t.to(self.device)
            mask[i, :t.numel()] = True
        return self._timed("text_encoder", self.phases["text_encoder"], x, mask)

    def _write_cross(self, states: Tensor, mask: Tensor, rows: int, per_row: int = 1) -> None:
        """Rows 0..rows-1 of the encoder's output, each repeated ``per_row`` times (beams), into the cache."""
        limit = self.config.max_source_len
        n = min(states.shape[1], limit)  # states past the limit are padding (encode_* checked the lengths)
        s = states[:rows, :n].repeat_interleave(per_row, 0)
        m = mask[:rows, :n].repeat_interleave(per_row, 0)
        self._timed("cross", self.phases["cross"], _pad(s, (self.max_batch, limit)),
                    _pad(m, (self.max_batch, limit), False), self.generator.cache)

    def _decode(self, rows: int, lang: str, max_new_tokens: int, num_beams: int, sampling=None) -> list[Tensor]:
        cfg = self.config
        if lang not in cfg.languages:
            raise ValueError(f"unknown target language {lang!r}; this model knows {', '.join(cfg.languages)}")
        prompts = [torch.tensor([cfg.eos_id, cfg.languages[lang]], device=self.device)] * rows
        t0 = time.perf_counter()
        if num_beams > 1:
            out = self.generator.generate(prompts, max_new_tokens, num_beams=num_beams, pad_token_id=cfg.pad_id)
        else:
            out = self.generator.generate(prompts, max_new_tokens, stop_tokens=[cfg.eos_id], pad_token_id=cfg.pad_id,
                                          sampling=sampling)
        self.timings["decode"] = self.timings.get("decode", 0.0) + time.perf_counter() - t0
        tokens = []
        for row in out[:, 2:]:
            ends = (row == cfg.eos_id).nonzero()
            tokens.append(row[: int(ends[0]) if len(ends) else row.numel()])
        return tokens

    def speak(self, tokens: list[Tensor], states: Tensor, mask: Tensor, lang: str, speaker: int = 0
              ) -> tuple[list[Tensor], list[Tensor]]:
        """Translated tokens (and the source's encoder states, to attend to) -> speech units and waveforms."""
        cfg, B, dev = self.config, len(tokens), self.device
        if lang not in cfg.vocoder_languages:
            raise ValueError(f"the vocoder has no language {lang!r}; it knows {', '.join(cfg.vocoder_languages)}")
        if not 0 <= speaker < cfg.vocoder_speakers:
            raise ValueError(f"speaker {speaker} is outside the vocoder's {cfg.vocoder_speakers} speakers")
        self._write_cross(states, mask, B)
        # the decoder's states over [eos, lang, tokens...]
        seqs = [torch.cat([torch.tensor([cfg.eos_id, cfg.languages[lang]], device=dev), t.to(dev)]) for t in tokens]
        N = min(bucket(max(s.numel() for s in seqs)), self.generator.max_seq_len)  # a bucket, or the whole cache
        ids = _pad(torch.stack([_pad(s, (N,), cfg.pad_id) for s in seqs]), (self.max_batch,), cfg.pad_id)
        positions = torch.arange(N, device=dev).expand(self.max_batch, N).contiguous()
        hidden = self._timed("decoder_hidden", self.phases["decoder_hidden"], ids, positions, self.generator.cache)
        lengths = torch.tensor([s.numel() for s in seqs] + [0] * (self.max_batch - B), device=dev)
        token_mask = torch.arange(N, device=dev)[None] < lengths[:, None]
        speaking = token_mask.clone()
        speaking[:, :2] = False  # the start and language tokens have no characters
        speaking &= ids != cfg.eos_id
        char_index, char_ids, char_mask = self.chars.layout(ids, speaking)
        C = bucket(char_index.shape[1])
        char_index, char_ids = _pad(char_index, (self.max_batch, C)), _pad(char_ids, (self.max_batch, C))
        char_mask = _pad(char_mask, (self.max_batch, C), False)
        chars, durations = self._timed("t2u_characters", self.phases["t2u_characters"], hidden, token_mask,
                                       char_index.to(dev), char_ids.to(dev), char_mask.to(dev))
        units = self._units(chars, durations)
        return units, self._vocode(units, lang, speaker)

    def _repeat(self, durations: Tensor) -> tuple[Tensor, Tensor]:
        from mmcompile.models.seamless import repeat_index

        index, mask = repeat_index(durations)
        F = bucket(index.shape[1])
        return _pad(index, (self.max_batch, F)), _pad(mask, (self.max_batch, F), False)

    def _units(self, chars: Tensor, durations: Tensor) -> list[Tensor]:
        index, mask = self._repeat(durations)
        units = self._timed("t2u_units", self.phases["t2u_units"], chars, index, mask)
        pad = self.config.unit_pad_id
        return [u[m & (u != pad)] for u, m in zip(units, mask)]

    def _vocode(self, units: list[Tensor], lang: str, speaker: int) -> list[Tensor]:
        cfg, dev, B = self.config, self.device, len(units)
        U = bucket(max(max(u.numel() for u in units), 1))
        ids = torch.zeros(self.max_batch, U, dtype=torch.long, device=dev)
        unit_mask = torch.zeros(self.max_batch, U, dtype=torch.bool, device=dev)
        for i, u in enumerate(units):
            ids[i, :u.numel()], unit_mask[i, :u.numel()] = u, True
        durations = self._timed("unit_durations", self.phases["unit_durations"], ids, unit_mask)
        index, mask = self._repeat(durations)
        lang_ids = torch.full((self.max_batch,), cfg.vocoder_languages[lang], dtype=torch.long, device=dev)
        speakers = torch.full((self.max_batch,), speaker, dtype=torch.long, device=dev)
        wave = self._timed("vocode", self.phases["vocode"], ids, index, mask, lang_ids, speakers)
        frames = mask.sum(1)
        return [wave[i, : int(frames[i]) * cfg.samples_per_frame].float() for i in range(B)]

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def translate(self, inputs, task: str = "speech-to-text", *, tgt_lang: str = "eng", max_new_tokens: int = 32,
                  num_beams: int = 1, speaker: int = 0, sampling=None) -> Translation:
        """Translate a batch. ``inputs``: for speech tasks waveforms ([T] float tensors at the model's sample
        rate) or feature rows ``[T, F]``; for text tasks token-id tensors. Decoding is greedy unless
        ``num_beams > 1`` (beam search) or ``sampling`` is given (``dict(temperature=, top_k=, top_p=,
        seed=)``, as ``Generator.generate`` takes it)."""
        if num_beams > 1 and sampling is not None:
            raise ValueError("beam search is deterministic: give num_beams or sampling, not both")
        if task.endswith("speech") and tgt_lang not in self.config.vocoder_languages:
            raise ValueError(f"the vocoder has no language {tgt_lang!r}; it speaks "
                             f"{', '.join(self.config.vocoder_languages)}")
        if task.endswith("speech") and not 0 <= speaker < self.config.vocoder_speakers:
            raise ValueError(f"speaker {speaker} is outside the vocoder's {self.config.vocoder_speakers} speakers")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; one of {', '.join(TASKS)}")
        if isinstance(inputs, Tensor):
            inputs = list(inputs) if inputs.dim() > 1 and task.startswith("text") else [inputs]
        inputs = list(inputs)
        self._check_batch(len(inputs), num_beams)
        self.timings = {}
        if task.startswith("speech"):
            feats = [x if x.dim() == 2 else self._timed("features", self.features, x) for x in inputs]
            for f in feats:
                if f.dim() != 2 or f.shape[1] != self.config.feature_dim or f.shape[0] == 0:
                    raise ShapeError(f"speech features must be [frames, {self.config.feature_dim}], got {tuple(f.shape)}")
            states, mask = self.encode_speech(feats)
        else:
            for t in inputs:
                if t.dim() != 1 or t.numel() == 0 or t.dtype not in (torch.long, torch.int):
                    raise ShapeError(f"text input must be a non-empty 1-D tensor of token ids, got {t.dtype} "
                                     f"{tuple(t.shape)}")
                if int(t.max()) >= self.config.vocab_size or int(t.min()) < 0:
                    raise ShapeError(f"token ids must lie in [0, {self.config.vocab_size})")
            states, mask = self.encode_text(inputs)
        self._write_cross(states, mask, len(inputs), num_beams)
        tokens = self._decode(len(inputs), tgt_lang, max_new_tokens, num_beams, sampling)
        out = Translation(tokens=tokens, sample_rate=self.config.sample_rate)
        if task.endswith("speech"):
            out.units, out.waveforms = self.speak(tokens, states, mask, tgt_lang, speaker)
        return out


_METHODS = {"speech_encoder": "encode_speech", "text_encoder": "encode_text", "t2u_characters": "t2u_characters",
            "t2u_units": "t2u_units", "unit_durations": "unit_durations", "vocode": "vocode"}


def compile_seamless(model, *, backend: str = "inductor", max_batch: int = 1, max_seq_len: int | None = None,
                     passes="default", chars=None, progress: Callable[[str], None] | None = None,
                     **generator_options) -> SeamlessTranslator:
    """Compile Seamless's phases: the text decoder's prefill and decode step through ``compile_generator``
    and every other phase through capture, ``passes`` and ``backend`` — each the first time a request
    needs its bucket. ``generator_options`` go to ``compile_generator`` (``cuda_graphs``, ...)."""
    from mmcompile.compile import compile as compile_module
    from mmcompile.models.seamless import CrossAttentionState, TextDecoderLM
    from mmcompile.pipeline import resolve

    step = progress or (lambda stage: None)
    t0 = time.perf_counter()
    model.eval()
    gen = compile_generator(TextDecoderLM(model), backend=backend, max_batch=max_batch,
                            max_seq_len=max_seq_len or model.config.max_seq_len, passes=passes, progress=progress,
                            **generator_options)

    names = [p.name for p in resolve(passes)]
    names += [] if "capture_decode_loop" in names else ["capture_decode_loop"]  # the proof graphs need

    def compile_fn(module, args):  # every phase lowers with the text decoder's backend options
        with torch.no_grad():
            return compile_module(module, args, passes=names, backend=backend,
                                  backend_options=generator_options.get("backend_options"))

    # the phases replay as CUDA graphs where the decode step does
    pool = gen.graph_pool
    phases = {name: _PerShape(name, Phase(model, method), compile_fn, step, pool) for name, method in _METHODS.items()}
    phases["cross"] = _PerShape("cross", CrossAttentionState(model), compile_fn, step, pool)
    phases["decoder_hidden"] = _PerShape("decoder_hidden", TextDecoderLM(model, output="hidden"), compile_fn, step, pool)
    out = SeamlessTranslator(model.config, phases, gen, chars=chars, dtype=next(model.parameters()).dtype,
                             compile_seconds=time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------- WAV

def read_wav(path, sample_rate: int = 16000) -> Tensor:
    """A 16-bit PCM WAV file as float samples [T] in [-1, 1], channels averaged. The file must already be
    at ``sample_rate``: resample it first (e.g. ``sox in.wav -r 16000 out.wav``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist")
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise ValueError(f"{path} is not a readable WAV file ({e})") from None
    if width != 2:
        raise ValueError(f"{path} has {8 * width}-bit samples; write it as 16-bit PCM")
    if rate != sample_rate:
        raise ValueError(f"{path} is sampled at {rate} Hz; the model reads {sample_rate} Hz audio: resample it "
                         f"first (e.g. sox {path.name} -r {sample_rate} out.wav)")
    samples = torch.frombuffer(bytearray(raw), dtype=torch.int16).float() / 32768.0
    return samples.view(-1, channels).mean(1)


def write_wav(path, samples: Tensor, sample_rate: int = 16000) -> Path:
    """Float samples [T] in [-1, 1] as a mono 16-bit PCM WAV file."""
    path = Path(path)
    pcm = (samples.detach().float().cpu().clamp(-1, 1) * 32767).round().to(torch.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.numpy().tobytes())
    return path
