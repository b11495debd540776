"""Token sampling: greedy, temperature, top-k, top-p, with a seedable generator; classifier-free
guidance and allowed-token sets applied to the logits before the choice (``LogitsRule``)."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["SamplingConfig", "sample", "LogitsRule"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature=0`` (the default) is greedy decoding.

    ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set whose probability reaches p
    (nucleus sampling); both apply after temperature. ``seed`` makes sampling reproducible.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def coerce(cls, value) -> "SamplingConfig":
        if value is None or value == "greedy":
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ValueError(f"unknown sampling option(s) {sorted(unknown)}; use temperature, top_k, top_p, seed")
            return cls(**value)
        raise TypeError(f"sampling must be a SamplingConfig, a dict or 'greedy', got {type(value).__name__}")


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] -> next tokens [B] (int64)."""
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p; the most likely always stays
        drop = (probs.cumsum(dim=-1) - probs) >= config.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


class LogitsRule:
    """What happens to a step's logits before the next token is chosen: classifier-free guidance over
    paired rows, then a set of allowed tokens.

    With ``paired=True`` the batch's ``R`` rows are two halves: row ``i < R/2`` is conditioned on its
    prompt, row ``i + R/2`` on the negative (unconditioned) prompt, and the guided logits of pair ``i``
    are ``u + scale * (c - u)`` — computed in float32 — so ``R/2`` tokens are chosen and both rows of a
    pair are fed the same one. Tokens outside ``allowed`` get ``-inf``.

    The scale and the allowed set are device tensors updated in place (``set``), so a CUDA graph
    recorded with the rule reads the values of the current request.
    """

    def __init__(self, vocab_size: int, device, *, paired: bool):
        self.paired = paired
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self.allowed = torch.ones(vocab_size, dtype=torch.bool, device=device)

    @staticmethod
    def allowed_mask(vocab_size: int, allowed_tokens, device=None) -> torch.Tensor:
        """``allowed_tokens`` (a range, a sequence of ids or a bool mask [V]) as a bool mask [V]."""
        if isinstance(allowed_tokens, torch.Tensor) and allowed_tokens.dtype == torch.bool:
            if allowed_tokens.shape != (vocab_size,):
                raise ValueError(f"allowed_tokens mask has shape {list(allowed_tokens.shape)}; the vocabulary has "
                                 f"{vocab_size} tokens")
            mask = allowed_tokens.to(device)
        else:
            ids = torch.as_tensor(list(allowed_tokens) if isinstance(allowed_tokens, range) else allowed_tokens,
                                  dtype=torch.long).reshape(-1)
            if ids.numel() == 0:
                raise ValueError("allowed_tokens is empty: no token could be generated")
            if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise ValueError(f"allowed_tokens holds ids outside the vocabulary [0, {vocab_size})")
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            mask[ids.to(device)] = True
        if not bool(mask.any()):
            raise ValueError("allowed_tokens allows no token")
        return mask

    def set(self, scale: float | None, allowed_tokens=None) -> None:
        self.scale.fill_(1.0 if scale is None else float(scale))
        if allowed_tokens is None:
            self.allowed.fill_(True)
        else:
            self.allowed.copy_(self.allowed_mask(self.allowed.numel(), allowed_tokens, self.allowed.device))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [R, V] -> [R/2, V] guided (``paired``) or [R, V], float32, disallowed tokens at -inf."""
        x = logits.float()
        if self.paired:
            half = x.shape[0] // 2
            cond, uncond = x[:half], x[half:2 * half]
            x = uncond + self.scale * (cond - uncond)
        return x.masked_fill(~self.allowed, float("-inf"))

    def choose(self, logits: torch.Tensor, config: SamplingConfig, generator=None) -> torch.Tensor:
        """The next token of every row [R] (pairs get the same token)."""
        nxt = sample(self(logits), config, generator)
        return torch.cat([nxt, nxt]) if self.paired else nxt
