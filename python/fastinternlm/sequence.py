"""What a request is made of, shared by llm.py (the public calls) and engine.py (the
scheduler that runs them): the prefill chunking rule, the progress report of long
prefills, a sequence's host-side state (its ids, streamed text, stop strings) and the
Generation it ends in."""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import List, Optional, Sequence

import torch

# Tokens per prefill forward: bounds activation memory for long prompts. On CUDA larger
# chunks keep the GEMMs and attention tiles big enough to fill the GPU (a 2048-token chunk
# of a 7B model needs ~0.3 GB of activations).
PREFILL_CHUNK = 512
PREFILL_CHUNK_CUDA = 2048


def prefill_chunk(device: torch.device) -> int:
    return PREFILL_CHUNK_CUDA if device.type == "cuda" else PREFILL_CHUNK


# A prompt of at least PROGRESS_MIN_TOKENS tokens whose prefill runs longer than
# PROGRESS_AFTER_S reports on stderr, at most once a second. Shorter prompts never do: in a
# service their prefill is spread over many scheduler steps among other requests' work,
# and a line per request would be noise.
PROGRESS_AFTER_S = 2.0
PROGRESS_MIN_TOKENS = 8192


def prefill_progress(total: int, device: torch.device) -> Optional["PrefillProgress"]:
    """A PrefillProgress for a prompt of `total` tokens, or None if it is too short to report."""
    return PrefillProgress(total, device) if total >= PROGRESS_MIN_TOKENS else None


class PrefillProgress:
    """ "prefill: done/total tokens, rate" on stderr for prefills that take seconds (a
    1M-token prompt takes minutes). On CUDA the host runs ahead of the device, so the
    device is synchronised before each report (at most once a second: no measurable cost)."""

    def __init__(self, total: int, device: torch.device, stream=None):
        self.total, self.device = total, device
        self.stream = sys.stderr if stream is None else stream
        self.t0 = self.last = time.perf_counter()
        self.shown = False

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.t0 < PROGRESS_AFTER_S or (now - self.last < 1.0 and done < self.total):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            now = time.perf_counter()
        self.last, self.shown = now, True
        elapsed = now - self.t0
        end = "\n" if done >= self.total else ""
        print(
            f"\rprefill: {done}/{self.total} tokens, {elapsed:.1f} s, {done / elapsed:.0f} tokens/s",
            end=end,
            file=self.stream,
            flush=True,
        )


@dataclasses.dataclass
class Generation:
    """One prompt's result."""

    text: str
    token_ids: List[int]  # generated ids (the stop token included when one ended it)
    finish_reason: str  # "stop" (a stop token), "stop_string", "length", or from the
    # engine "cancelled", "timeout", "error"
    prompt_tokens: int
    time_to_first_token: float  # seconds from the call to the first sampled token
    decode_tokens_per_s: float  # tokens after the first, per second of decoding
    error: Optional[str] = None  # what went wrong, when finish_reason is "error"


class SequenceState:
    """Host-side state of one sequence during a request."""

    def __init__(self, llm, prompt: List[int], stops: Sequence[str], skip_special_tokens: bool = True):
        self.prompt = prompt
        self.ids: List[int] = []
        self.decoder = llm.tokenizer.stream(skip_special_tokens=skip_special_tokens)
        self.text = ""
        self.emitted = 0
        self.stops = stops
        self.finish_reason: Optional[str] = None
        self.ttft = 0.0  # set when the request finishes
        self.rate = 0.0

    def push(self, token: int, stop_ids: set, max_new_tokens: int) -> None:
        self.ids.append(token)
        before = len(self.text)
        if token in stop_ids:
            self.text += self.decoder.flush()
            self.finish_reason = "stop"
        else:
            self.text += self.decoder.push(token)
            if len(self.ids) >= max_new_tokens:
                self.text += self.decoder.flush()
                self.finish_reason = "length"
        # Only a stop string that ends in the new text can be new: search from just
        # before it, so long generations do not rescan their whole text every token.
        hits = [at for s in self.stops for at in [self.text.find(s, max(0, before - len(s) + 1))] if at >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop_string"

    def delta(self) -> str:
        """New text that can be shown: while running, hold back a tail that could still
        grow into a stop string, so streamed text never shows what the final text drops."""
        end = len(self.text)
        if self.finish_reason is None:
            for s in self.stops:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        end = min(end, len(self.text) - n)
                        break
        out = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return out
