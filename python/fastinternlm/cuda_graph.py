"""The decode step captured once as a CUDA graph and replayed for every token.

At batch 1 a decode step is ~10 small kernels per layer (hundreds per token). Launched
one by one from Python, each costs 5-20 us of host time, far more than the kernels
themselves take on the GPU; replaying a captured graph issues them all with one call.

Everything the step reads lives in static device tensors that are written before each
replay (tokens, slots, positions and, unless the graph computes them, rotary bases), and
the logits land in one static output tensor that the next replay overwrites. Nothing in
the step syncs with the host (model.decode is written that way), so the only host
round trip per token is the caller's read of the sampled ids.

Eager decoding (model.decode) stays available and computes the same function with the
same kernels; tests check that both give the same tokens.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from . import _C
from .model import Transformer


def decode_buckets(max_batch: int) -> List[int]:
    """The batch sizes graphs are captured for: the powers of two below max_batch, and
    max_batch. A step of b rows replays the smallest bucket >= b (bucket_for), its spare
    rows padded; a graph per batch size would multiply the captures and their memory."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch]


def bucket_for(batch: int, max_batch: int) -> int:
    """The smallest of decode_buckets(max_batch) that holds `batch` rows."""
    b = 1
    while b < batch:
        b *= 2
    return min(b, max_batch)


class DecodeGraph:
    """model.decode for a fixed batch size, captured when constructed.

    bases_for: optional callable positions -> float32 bases [batch], captured inside the
    graph (dynamic NTK computes each sequence's base from its position on the device); when
    None, `run` takes the bases as an input.
    pool: a memory pool handle shared with other graphs of the same model
    (torch.cuda.graph_pool_handle()), so graphs for several batch sizes reuse one pool.
    stream: the stream to capture on (graphs sharing a pool should share it); a new one on
    the model's device when None. Never torch's default capture stream: that one is made
    once, on whichever device was current then, and a capture on a stream of another
    device than the model's records nothing (an empty graph whose replay does nothing)."""

    def __init__(
        self,
        model: Transformer,
        batch: int,
        bases_for: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        pool=None,
        stream: Optional["torch.cuda.Stream"] = None,
    ):
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {model.device}")
        if not isinstance(batch, int) or not 1 <= batch <= model.max_batch:
            raise ValueError(f"batch must be an integer in [1, max_batch={model.max_batch}], got {batch!r}")
        # The model's device is made current for the warm-up and the capture: torch's
        # current stream and the library handles it creates are per device.
        with torch.cuda.device(model.device):
            self._build(model, batch, bases_for, pool, stream)

    def _build(self, model, batch, bases_for, pool, stream) -> None:
        dev = torch.device("cuda", torch.cuda.current_device())  # the model's, with its index
        if stream is None:
            stream = torch.cuda.Stream(device=dev)
        if stream.device != dev:
            raise ValueError(f"stream must be on the model's device {dev}, got one on {stream.device}")
        self.model = model
        self.batch = batch
        self.bases_for = bases_for
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=dev)
        # Slot -1 while warming up and capturing: the attention kernel skips a sequence
        # whose slot is out of range, so those runs write nothing into the live KV cache.
        self.slots = torch.full((batch,), -1, dtype=torch.int32, device=dev)
        self.positions = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.bases = torch.full((batch,), float(model.config.rope_theta), dtype=torch.float32, device=dev)

        def step() -> torch.Tensor:
            bases = self.bases_for(self.positions) if self.bases_for is not None else self.bases
            return model.decode(self.tokens, self.slots, self.positions, bases)

        # Warm up on a side stream (torch's recommended pattern): lazy initialisation
        # (cuBLAS handles and workspaces, kernel attributes) must not happen during capture.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        # Whether the captured kernels use programmatic launch: the switch is on and the
        # device has it (compute capability 9.0+; below, the kernels launch plainly).
        self.programmatic_launch = bool(_C.programmatic_launch()) and torch.cuda.get_device_capability(dev)[0] >= 9
        try:
            self.graph, self.logits = self._capture(step, pool, stream)
        except RuntimeError:
            if not self.programmatic_launch:
                raise
            # A driver that cannot capture programmatic (PDL) launches into a graph: capture
            # this graph without them (the kernels are correct either way, only slower).
            torch.cuda.synchronize(dev)
            _C.set_programmatic_launch(False)
            try:
                self.graph, self.logits = self._capture(step, pool, stream)
            finally:
                _C.set_programmatic_launch(True)
            self.programmatic_launch = False
        torch.cuda.synchronize(dev)

    @staticmethod
    def _capture(step, pool, stream):
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(stream.device)
        try:
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = step()
        finally:
            # A capture that fails at its end (an invalidated capture raises in capture_end)
            # leaves torch.cuda.graph without restoring the current stream: later eager work
            # of this thread would run on the capture stream, unordered with other threads'.
            torch.cuda.set_stream(current)
        return graph, logits

    def run(
        self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, bases: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """One decode step: the same arguments as model.decode (device tensors of `batch`
        rows). Returns the static float32 logits [batch, vocab], valid until the next run."""
        for name, t in (("tokens", tokens), ("slots", slots), ("positions", positions)):
            if t.shape != (self.batch,):
                raise ValueError(f"{name} must have shape ({self.batch},), got {tuple(t.shape)}")
        self.tokens.copy_(tokens, non_blocking=True)
        self.slots.copy_(slots, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        if self.bases_for is None:
            if bases is None:
                raise ValueError("this graph takes the rotary bases as an input: pass bases")
            self.bases.copy_(bases, non_blocking=True)
        self.graph.replay()
        return self.logits


__all__ = ["DecodeGraph", "bucket_for", "decode_buckets"]
