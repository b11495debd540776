"""Chameleon's tasks end to end: the decoder's Generator and the VQ-GAN's encoder and decoder together.

Text and images share one token stream. An image is ``boi``, the token of each of its N codes, ``eoi``
(N = grid², 1024 for 512 x 512 pixels; the codes come from the VQ-GAN encoder, and code ``c`` is token
``config.image_token_table()[c]``). The tasks:

- ``text-to-text``: the prompt's tokens, then text (image codes and the image markers are not allowed);
- ``image-to-text`` (captioning): the image's tokens, then the prompt's tokens, then text;
- ``text-to-image``: the prompt and ``boi``, then exactly N tokens restricted to image codes, decoded
  to pixels by the VQ-GAN decoder. Classifier-free guidance runs the conditioned row and an
  unconditioned row (the negative prompt, by default nothing, and ``boi``) as two rows of one batch
  through one decode step — one CUDA graph on a GPU, K steps per graph when greedy — and chooses from
  ``u + guidance_scale * (c - u)``;
- ``text-image-to-image``: as text-to-image with the input image's tokens after the prompt.

``compile_chameleon`` compiles every phase (decoder prefill and decode step through
``compile_generator``; VQ encode and decode through capture, the default pipeline and the backend);
``ChameleonGenerator.from_modules`` runs the same tasks eagerly, the reference the compiled one is
checked against.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from mmcompile.errors import ShapeError
from mmcompile.runtime.generator import Generator, compile_generator, timed

__all__ = ["TASKS", "ChameleonGenerator", "ImageGeneration", "compile_chameleon", "save_image", "load_image"]

TASKS = ("text-to-text", "image-to-text", "text-to-image", "text-image-to-image")


@dataclasses.dataclass
class ImageGeneration:
    """What ``generate_image`` returns: ``pixels`` [B, 3, R, R] in [-1, 1], the image ``codes`` [B, N]
    (codebook indices) and the decoder's ``tokens`` [B, prompt + N]."""

    pixels: Tensor
    codes: Tensor
    tokens: Tensor


class _Batched:
    """A compiled phase of a static batch, called with any batch up to it (padded, then sliced)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], batch: int):
        self.fn, self.batch = fn, batch

    def __call__(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if n > self.batch:
            raise ShapeError(f"{n} images exceed the batch of {self.batch} the image tokenizer was compiled for; "
                             "recompile with a larger max_batch")
        if n < self.batch:
            x = torch.cat([x, x[:1].expand(self.batch - n, *x.shape[1:])])
        return self.fn(x)[:n]


class ChameleonGenerator:
    """Chameleon's four tasks over a decoder ``Generator`` and VQ ``encode`` / ``decode`` callables."""

    def __init__(self, generator: Generator, encode: Callable[[Tensor], Tensor], decode: Callable[[Tensor], Tensor],
                 config, vq_config, *, max_batch: int, pixel_dtype: torch.dtype = torch.float32,
                 compile_seconds: float = 0.0):
        if config.image_codes != vq_config.num_embeddings:
            raise ShapeError(f"the decoder has {config.image_codes} image codes but the VQ-GAN's codebook "
                             f"{vq_config.num_embeddings} entries; pair a decoder and tokenizer of the same family size")
        self.generator, self.encode, self.decode = generator, encode, decode
        self.config, self.vq_config = config, vq_config
        self.max_batch = max_batch
        self.pixel_dtype = pixel_dtype
        self.compile_seconds = compile_seconds
        self.timings: dict[str, float] = {}  # seconds of each phase of the last task
        V = config.vocab_size
        device = generator.device
        self.code_to_token = torch.tensor(config.image_token_table(), dtype=torch.long, device=device)  # [N]
        self.token_to_code = torch.full((V,), -1, dtype=torch.long, device=device)
        self.token_to_code[self.code_to_token] = torch.arange(config.image_codes, device=device)
        self.image_mask = torch.zeros(V, dtype=torch.bool)
        self.image_mask[self.code_to_token.cpu()] = True
        self.text_mask = ~self.image_mask
        self.text_mask[[config.boi_token, config.eoi_token]] = False

    @classmethod
    def from_modules(cls, model, vq, *, max_batch: int = 1, max_seq_len: int | None = None) -> "ChameleonGenerator":
        """The tasks run eagerly, as written: the reference the compiled ones are checked against."""
        max_seq_len = max_seq_len or default_max_seq_len(model.config, vq.config)
        gen = Generator.from_module(model, max_batch=2 * max_batch, max_seq_len=max_seq_len)
        return cls(gen, vq.encode, vq.decode, model.config, vq.config, max_batch=max_batch,
                   pixel_dtype=next(vq.parameters()).dtype)

    @property
    def image_size(self) -> int:
        return self.vq_config.resolution

    @property
    def image_length(self) -> int:
        """Codes per image (grid²)."""
        return self.vq_config.grid ** 2

    # ------------------------------------------------------------------ pieces
    def _timed(self, name: str, fn, *args):
        return timed(self.timings, self.generator.device, name, fn, *args)

    def _pixels(self, images) -> Tensor:
        R = self.image_size
        x = torch.as_tensor(images)
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or tuple(x.shape[1:]) != (3, R, R) or not x.is_floating_point():
            raise ShapeError(f"images must be float pixels [B, 3, {R}, {R}] in [-1, 1] (load_image reads a file), "
                             f"got {x.dtype} {list(x.shape)}")
        return x.to(device=self.generator.device, dtype=self.pixel_dtype)

    def image_tokens(self, images) -> Tensor:
        """``boi``, the images' codes as tokens, ``eoi``: LongTensor [B, N + 2]."""
        codes = self._timed("vq_encode", self.encode, self._pixels(images))
        c = self.config
        B = codes.shape[0]
        boi = torch.full((B, 1), c.boi_token, dtype=torch.long, device=codes.device)
        eoi = torch.full((B, 1), c.eoi_token, dtype=torch.long, device=codes.device)
        return torch.cat([boi, self.code_to_token[codes.long()], eoi], dim=1)

    def _rows(self, input_ids) -> list[Tensor]:
        """Token rows (possibly empty: an image alone, or an empty negative prompt) on the device."""
        if input_ids is None:
            rows = [torch.empty(0, dtype=torch.long)]
        elif isinstance(input_ids, Tensor):
            rows = list(input_ids[None] if input_ids.dim() == 1 else input_ids)
        elif len(input_ids) and isinstance(input_ids[0], int):
            rows = [torch.tensor(input_ids, dtype=torch.long)]
        else:
            rows = [torch.as_tensor(r, dtype=torch.long) for r in input_ids] or [torch.empty(0, dtype=torch.long)]
        V = self.config.vocab_size
        for r in rows:
            if r.dim() != 1 or r.is_floating_point():
                raise ShapeError(f"token rows must be 1-D integer ids, got {r.dtype} {list(r.shape)}")
            if r.numel() and (int(r.min()) < 0 or int(r.max()) >= V):
                raise ShapeError(f"token ids outside the vocabulary [0, {V})")
        if len(rows) > self.max_batch:
            raise ShapeError(f"{len(rows)} prompts exceed max_batch={self.max_batch} this ChameleonGenerator was "
                             "compiled for")
        return [r.to(device=self.generator.device, dtype=torch.long) for r in rows]

    def _with_images(self, rows: list[Tensor], images, *, image_first: bool) -> list[Tensor]:
        """Each row with its image's tokens before (captioning) or after (editing) it; one image serves all."""
        if images is None:
            return rows
        image = self.image_tokens(images)
        if image.shape[0] not in (1, len(rows)):
            raise ShapeError(f"{image.shape[0]} images for {len(rows)} prompts; give one image, or one per prompt")
        pairs = [(image[i if image.shape[0] > 1 else 0], r) for i, r in enumerate(rows)]
        return [torch.cat([t, r] if image_first else [r, t]) for t, r in pairs]

    # ------------------------------------------------------------------ tasks
    @torch.no_grad()
    def generate_text(self, input_ids, images=None, *, max_new_tokens: int = 32, sampling=None,
                      stop_tokens=None) -> Tensor:
        """text-to-text, or image-to-text when ``images`` are given (each row: image tokens, then its prompt).
        Returns the new text tokens, LongTensor [B, T] right-padded with 0 (image codes are never generated)."""
        self.timings = {}
        rows = self._with_images(self._rows(input_ids), images, image_first=True)
        if any(r.numel() == 0 for r in rows):
            raise ShapeError("text generation needs a prompt or an image to start from")
        out = self._timed("decoder", lambda: self.generator.generate(
            rows, max_new_tokens, sampling=sampling, stop_tokens=stop_tokens, allowed_tokens=self.text_mask))
        new = [o[r.numel():r.numel() + max_new_tokens] for o, r in zip(out, rows)]
        width = max(n.numel() for n in new)
        return torch.stack([torch.cat([n, n.new_zeros(width - n.numel())]) for n in new])

    @torch.no_grad()
    def generate_image(self, input_ids, images=None, *, guidance_scale: float | None = 3.0, sampling=None,
                       negative_input_ids=None) -> ImageGeneration:
        """text-to-image, or text-image-to-image when ``images`` are given (each row: prompt, image
        tokens). Exactly one image's worth of codes is generated per row, restricted to image codes,
        then decoded to pixels. ``guidance_scale=None`` turns classifier-free guidance off."""
        self.timings = {}
        c = self.config
        rows = self._with_images(self._rows(input_ids), images, image_first=False)
        boi = torch.tensor([c.boi_token], dtype=torch.long, device=self.generator.device)
        rows = [torch.cat([r, boi]) for r in rows]
        kwargs = {}
        if guidance_scale is not None:
            negatives = self._rows(negative_input_ids)
            kwargs = dict(guidance_scale=guidance_scale, negative_input_ids=[torch.cat([n, boi]) for n in negatives])
        N = self.image_length
        out = self._timed("decoder", lambda: self.generator.generate(
            rows, N, sampling=sampling, allowed_tokens=self.image_mask, **kwargs))
        codes = self.token_to_code[torch.stack([o[r.numel():r.numel() + N] for o, r in zip(out, rows)])]
        pixels = self._timed("vq_decode", self.decode, codes)
        return ImageGeneration(pixels=pixels, codes=codes, tokens=out)

    def run(self, task: str, input_ids=None, images=None, **kwargs):
        """Run a task by name (``TASKS``): text tasks return new tokens, image tasks an ``ImageGeneration``."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        needs_image = task in ("image-to-text", "text-image-to-image")
        if needs_image and images is None:
            raise ValueError(f"task {task} needs an input image")
        if not needs_image and images is not None:
            raise ValueError(f"task {task} takes no input image; use "
                             f"{'image-to-text' if task == 'text-to-text' else 'text-image-to-image'}")
        if task in ("text-to-text", "image-to-text"):
            return self.generate_text(input_ids, images, **kwargs)
        return self.generate_image(input_ids, images, **kwargs)


def default_max_seq_len(config, vq_config, text_room: int = 256) -> int:
    """Room for an input image, a generated image and ``text_room`` text tokens, within the model's limit."""
    need = 2 * (vq_config.grid ** 2 + 2) + text_room
    return min(config.max_seq_len, -(-need // 64) * 64)


def compile_chameleon(model, vq, *, backend: str = "inductor", max_batch: int = 1, max_seq_len: int | None = None,
                      guidance: bool = True, progress: Callable[[str], None] | None = None,
                      **generator_options) -> ChameleonGenerator:
    """Compile Chameleon's phases: the decoder's prefill and decode step (``compile_generator``, with
    ``2 * max_batch`` rows when ``guidance`` so each prompt's unconditioned row shares the batch) and the
    VQ-GAN's encode and decode (capture, the default pipeline, ``backend``). ``generator_options`` go to
    ``compile_generator`` (``passes``, ``cuda_graphs``, ``pass_options``, ...)."""
    from mmcompile.compile import compile as compile_module
    from mmcompile.models import vqgan
    from mmcompile.pipeline import DEFAULT_PIPELINE
    from mmcompile.runtime.cuda_graphs import graphed

    step = progress or (lambda stage: None)
    t0 = time.perf_counter()
    param = next(model.parameters())
    device = param.device
    max_seq_len = max_seq_len or default_max_seq_len(model.config, vq.config)
    gen = compile_generator(model, backend=backend, max_batch=2 * max_batch if guidance else max_batch,
                            max_seq_len=max_seq_len, progress=progress, **generator_options)
    R, N = vq.config.resolution, vq.config.grid ** 2
    vq_dtype = next(vq.parameters()).dtype
    # the VQ-GAN's phases run once per image: on a GPU with graphs on they replay as CUDA graphs too
    pool = gen.graph_pool
    vq_passes = [*DEFAULT_PIPELINE, "capture_decode_loop"]  # the proof a graph needs
    step("compile the VQ-GAN encoder")
    pixels = torch.zeros(max_batch, 3, R, R, device=device, dtype=vq_dtype)
    backend_options = generator_options.get("backend_options")  # the VQ-GAN's phases lower as the decoder's
    encode = compile_module(vqgan.Encode(vq), (pixels,), backend=backend, passes=vq_passes,
                            backend_options=backend_options)
    programs = {**gen.programs, "vq_encode": encode.program}
    encode = graphed(encode, (pixels,), pool)
    if getattr(vq, "has_decoder", True):
        step("compile the VQ-GAN decoder")
        codes = torch.zeros(max_batch, N, dtype=torch.long, device=device)
        decode = compile_module(vqgan.Decode(vq), (codes,), backend=backend, passes=vq_passes,
                                backend_options=backend_options)
        programs["vq_decode"] = decode.program
        decode = _Batched(graphed(decode, (codes,), pool), max_batch)
    else:  # a checkpoint without the tokenizer's decoder: text tasks work, image output says why it cannot
        decode = vq.decode
    out = ChameleonGenerator(gen, _Batched(encode, max_batch), decode, model.config, vq.config,
                             max_batch=max_batch, pixel_dtype=vq_dtype, compile_seconds=time.perf_counter() - t0)
    out.programs = programs
    return out


def save_image(pixels: Tensor, path) -> Path:
    """Write one image [3, R, R] (or the first of [B, 3, R, R]) in [-1, 1] as a PNG (or any format Pillow
    knows by the file's extension)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("writing images needs Pillow: pip install pillow") from None
    x = pixels[0] if pixels.dim() == 4 else pixels
    array = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    Image.fromarray(array, mode="RGB").save(path)
    return path


def load_image(path, resolution: int) -> Tensor:
    """Read an image file as pixels [1, 3, R, R] in [-1, 1]: RGB, centre-cropped to a square, resized to
    ``resolution`` (the VQ-GAN's)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading images needs Pillow: pip install pillow") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        image = Image.open(path).convert("RGB")
    except Exception as e:  # Pillow raises several types for unreadable files
        raise ValueError(f"{path} is not an image Pillow can read: {e}") from None
    w, h = image.size
    side = min(w, h)
    image = image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    import numpy as np

    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x[None]
