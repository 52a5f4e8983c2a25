"""Token sampling on the device, without host synchronisation (so it can live inside a
captured decode step): greedy, temperature, top-k, top-p, min-p and a repetition penalty.

The draw itself uses the exponential-race form of categorical sampling, argmax(p / E)
with E ~ Exp(1) drawn from a seeded generator: one kernel pass, no cumulative sums on the
host, and reproducible for a given seed."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0      # 0: greedy
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1: off
    min_p: float = 0.0            # 0: off
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        def bad(name, want):
            raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            bad("temperature", "a number >= 0")
        if not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0):
            bad("top_k", "an integer >= 0")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", "in (0, 1]")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1):
            bad("min_p", "in [0, 1)")
        if not (isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0):
            bad("repetition_penalty", "a number > 0")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "an integer or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule: for every token already in the sequence, divide a positive logit by the
    penalty and multiply a negative one by it."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None,
           seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logits float32 [B, V] -> token ids int64 [B], on the logits' device."""
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the
        # most likely token always stays.
        drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if params.min_p > 0.0:
        threshold = probs.max(dim=-1, keepdim=True).values * params.min_p
        probs = probs.masked_fill(probs < threshold, 0.0)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
