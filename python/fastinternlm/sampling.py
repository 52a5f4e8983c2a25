"""Token sampling on the device, without host synchronisation (so it can live inside a
captured decode step): greedy, temperature, top-k, top-p, min-p and a repetition penalty.

The draw itself uses the exponential-race form of categorical sampling, argmax(p / E)
with E ~ Exp(1) drawn from a seeded generator: one kernel pass, no cumulative sums on the
host, and reproducible for a given seed.

`sample_rows` is the batched form the engine uses: every row has its own parameters and
its own generator, the filters run once over the whole batch, and a row's noise comes
from its own generator only, so a seeded request draws the same tokens whatever other
rows share its step. It also folds a per-row "logits not finite" flag into the returned
ids (-1), so the one host transfer of the ids per step also reports NaN/Inf.

A temperature below MIN_TEMPERATURE is greedy: dividing float32 logits by such a number
overflows to inf (temperature=1e-45 turned every logit into inf and drew token 0), and
the limit of sampling as the temperature goes to 0 is the argmax anyway."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch


MIN_TEMPERATURE = 1e-5
# torch.Generator.manual_seed takes a 64-bit seed (negative ones wrap); outside that range
# pybind reports "Overflow when unpacking long long", which names no argument.
SEED_RANGE = (-(2**63), 2**64)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
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
        if self.seed is not None and not (
            isinstance(self.seed, int)
            and not isinstance(self.seed, bool)
            and SEED_RANGE[0] <= self.seed < SEED_RANGE[1]
        ):
            bad("seed", "None or an integer in [-2**63, 2**64)")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if getattr(self, name) != getattr(self, name) or abs(getattr(self, name)) == float("inf"):
                bad(name, "finite")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's rule: for every token already in the sequence, divide a positive logit by the
    penalty and multiply a negative one by it."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator] = None,
    seen: Optional[torch.Tensor] = None,
) -> torch.Tensor:
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


def sample_rows(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[Optional[torch.Generator]],
    seen: Optional[torch.Tensor] = None,
    vocab_limit: Optional[int] = None,
) -> torch.Tensor:
    """logits float32 [B, V] -> int64 ids [B] on the device; row b sampled with params[b]
    and generators[b] (None for greedy rows), seen[b] the tokens its repetition penalty
    applies to (only read when some row has a penalty). Ids >= vocab_limit are never
    drawn. A row whose logits (below vocab_limit) hold a NaN or an Inf gets id -1.
    No host synchronisation: which filters run is decided from the host-side params."""
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(
            f"need one SamplingParams and one generator per row ({batch}), got {len(params)} and {len(generators)}"
        )
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[:, :vocab_limit]
    dev = logits.device
    bad = ~torch.isfinite(logits).all(dim=-1)
    if any(p.repetition_penalty != 1.0 for p in params):
        if seen is None:
            raise ValueError("a row has a repetition penalty: pass seen")
        penalty = torch.tensor([float(p.repetition_penalty) for p in params], dtype=logits.dtype, device=dev)[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen[:, : logits.shape[-1]], penalised, logits)
    tokens = logits.argmax(dim=-1)
    rows: List[int] = [b for b, p in enumerate(params) if not p.greedy]
    if rows:
        picked = [params[b] for b in rows]
        index = torch.tensor(rows, dtype=torch.int64, device=dev)
        sub = logits.index_select(0, index)
        temperature = torch.tensor([float(p.temperature) for p in picked], dtype=sub.dtype, device=dev)[:, None]
        sub = sub / temperature
        vocab = sub.shape[-1]
        if any(p.top_k > 0 for p in picked):
            k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in picked], device=dev)
            kth = torch.sort(sub, dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            sub = sub.masked_fill(sub < kth, float("-inf"))
        probs = torch.softmax(sub, dim=-1)
        if any(p.top_p < 1.0 for p in picked):
            top_p = torch.tensor([float(p.top_p) for p in picked], dtype=probs.dtype, device=dev)[:, None]
            sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
            # As in `sample`: drop a token when the tokens ranked above it already hold top_p
            # of the mass; rows with top_p == 1 drop nothing (rounding of the sum could
            # otherwise push a tail token over 1).
            drop_sorted = ((torch.cumsum(sorted_probs, dim=-1) - sorted_probs) > top_p) & (top_p < 1.0)
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        if any(p.min_p > 0.0 for p in picked):
            min_p = torch.tensor([float(p.min_p) for p in picked], dtype=probs.dtype, device=dev)[:, None]
            probs = probs.masked_fill(probs < probs.max(dim=-1, keepdim=True).values * min_p, 0.0)
        # Each row's noise from its own generator: what a seeded row draws cannot depend on
        # which rows share the step.
        race = torch.stack(
            [torch.empty(vocab, dtype=probs.dtype, device=dev).exponential_(1.0, generator=generators[b]) for b in rows]
        )
        tokens = tokens.index_copy(0, index, (probs / race).argmax(dim=-1))
    return torch.where(bad, torch.full_like(tokens, -1), tokens)
