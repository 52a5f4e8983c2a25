"""The in-process engine: many requests at once on one loaded model.

    engine = fastinternlm.Engine(llm)                  # starts the scheduler thread
    req = engine.submit("prompt", max_new_tokens=64)   # thread-safe, returns at once
    for delta in req: ...                              # or: async for delta in req
    print(req.result().text); engine.close()

One scheduler thread owns the model and its KV-cache slots; every other thread only
queues requests and reads their results. Each step of the scheduler:

1. drops cancelled and timed-out requests (their slots are free for this step), and
   admits waiting requests into free slots (first come, first served);
2. picks the step's prompt chunks: every request still prefilling advances by at most
   one prefill budget (`prefill_chunk`) of work, so a long prompt delays the running
   streams by at most one budget per step; a burst of N new prompts costs them N budgets
   per step for a few steps, rather than making the last of the burst wait N times as
   long for its first token (the prompt rows of one step stay within PREFILL_CHUNK,
   the activation-memory bound). The budget counts work, not tokens:
   a prompt token at position p costs 1 + p / attention_span, where the attention span
   is the context at which a token's attention does as many multiply-adds as its linear
   layers (weights per layer / (2 * heads * head_dim): 3072 for SmolLM2-135M, 26.6K for
   InternLM2.5-7B). Near position 0 the budget is that many tokens; deep into a long
   prompt, fewer (at least one per step), so the step stays about as long as the prompt
   grows. When no request is decoding there is nobody to delay, and prompts are
   prefilled in PREFILL_CHUNK pieces (the activation-memory bound) instead;
3. runs one forward over the running sequences' next tokens and those chunks together
   (Transformer.step): its linear layers read the weights once for all rows, attention
   runs per part. With CUDA graphs the decode rows replay the captured graph for the
   next power-of-two batch size instead (unused rows masked with slot -1) and the
   chunks run as a second forward;
4. runs the output head once over the decode rows and the rows of prompts that finished
   prefilling, samples every row with its own parameters and generator, and copies the
   new ids to the host: the one host synchronisation of the step, which also carries a
   per-row "logits not finite" flag.

KV reuse. A slot keeps the tokens whose keys and values it holds after its request ends.
A new request takes the free slot whose tokens share the longest prefix with its prompt
and prefills only the rest (least recently used slots are given to requests without a
match first). Rule for dynamic NTK: a slot is reused only if every key in it was rotated
with the plain rope_theta (its sequence never passed max_position_embeddings) and the new
prompt is no longer than max_position_embeddings either; otherwise a fresh prefill would
rotate the same positions with a different base, and the slot is prefilled from 0.

Invariance. A request's tokens do not depend on which other requests run: every row of
the decode step is its own sequence (attention is per slot), per-row sampling draws
from the row's own generator, and on the CPU the output head always runs with the same
number of rows (the slot count; torch's dense CPU GEMM rounds a row differently
depending on how many rows it multiplies at once, at a fixed row count it does not). The
int4 GEMM computes each row in a fixed order, so with int4 decoder weights (GGUF Q4,
AWQ/GPTQ, quant="int4") greedy tokens are identical alone and in any batch. Dense
decoder weights go through torch's GEMM, which is not row-invariant on the CPU: their
logits can differ in the last bit with the batch. On CUDA cuBLAS and the decode split
sizing depend on the batch; only the int4 GEMV rows are batch-independent there.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import itertools
import math
import threading
import time
import warnings
import weakref
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Union

import torch

from .cuda_graph import bucket_for
from .model import Chunk, DecodeRows
from .sequence import Generation, PrefillProgress, SequenceState, prefill_chunk, prefill_progress
from .sampling import SamplingParams, sample_rows

FINISH_REASONS = ("stop", "stop_string", "length", "cancelled", "timeout", "error")
# Prefill budget of a prompt per scheduler step while other requests are decoding (in
# tokens at position 0; deeper ones cost more, module docs): a step then costs about one
# decode step plus this much prompt work per arriving prompt, which bounds the running
# streams' inter-token latency. On a 2-core CPU 32 tokens of SmolLM2-135M cost about as
# much as one batched decode step of 15 sequences (docs/benchmarks.md: a 2K prompt
# arriving about doubles the streams' median token interval); on a GPU 512 tokens of a
# 7B model cost a few decode steps.
PREFILL_BUDGET_CPU = 32
PREFILL_BUDGET_CUDA = 512
_IDLE_POLL_S = 0.5  # how often an idle scheduler thread checks that its engine still exists


class EngineOverloaded(RuntimeError):
    """submit() found the waiting queue full: retry later or raise max_waiting."""


class EngineUnhealthy(RuntimeError):
    """The engine is closed or a device error stopped it; no request will run on it."""


class Request:
    """One submitted request. Iterate it (from any thread, or `async for` from asyncio)
    for text deltas; result() blocks for the Generation; cancel() ends it."""

    _ids = itertools.count(1)

    def __init__(
        self,
        engine: "Engine",
        prompt: List[int],
        max_new_tokens: int,
        params: SamplingParams,
        stops: List[str],
        stop_ids: Set[int],
        deadline_s: Optional[float],
        skip_special_tokens: bool,
        kind: str = "generate",
    ):
        self.id = next(Request._ids)
        self._engine = engine
        self.prompt = prompt
        self.prompt_tokens = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.params = params
        self.stops = stops
        self.stop_ids = stop_ids
        self.skip_special_tokens = skip_special_tokens
        self.kind = kind
        self.t_submit = time.perf_counter()
        self.deadline = None if deadline_s is None else self.t_submit + deadline_s
        self._lock = threading.Condition()
        self._chunks: List[str] = []
        self._waiters: List[Any] = []  # (loop, future) of async iterators waiting for a delta
        self._listeners: List[Any] = []  # callables(delta) (LLM.generate's merged streams)
        self._result: Optional[Generation] = None
        self._logits: Optional[torch.Tensor] = None
        self._cancel_requested = False
        self._seq: Optional[SequenceState] = None  # set by the scheduler on admission
        # perf_counter() when each token reached the host (TTFT / inter-token latency per request).
        self.token_times: List[float] = []
        self._t_first: Optional[float] = None

    # ---- consumer side -----------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._result is not None

    def __iter__(self):
        i = 0
        while True:
            with self._lock:
                while i >= len(self._chunks) and self._result is None:
                    self._lock.wait()
                if i < len(self._chunks):
                    delta = self._chunks[i]
                    i += 1
                else:
                    return
            yield delta

    async def _aiter(self):
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            with self._lock:
                if i < len(self._chunks):
                    delta, fut = self._chunks[i], None
                    i += 1
                elif self._result is not None:
                    return
                else:
                    fut = loop.create_future()
                    self._waiters.append((loop, fut))
            if fut is None:
                yield delta
            else:
                await fut

    def __aiter__(self):
        return self._aiter()

    def result(self, timeout: Optional[float] = None) -> Generation:
        with self._lock:
            if not self._lock.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            return self._result

    def cancel(self) -> None:
        """End the request now (finish_reason "cancelled"); its slot is free for the next
        scheduler step. Idempotent; a finished request stays as it finished."""
        if self.done:
            return
        self._cancel_requested = True
        self._finish_now("cancelled", None, self._seq, self._t_first)
        self._engine._wake.set()

    # ---- producer side (scheduler thread) -----------------------------------------------
    def _emit(self, delta: str) -> None:
        if not delta:
            return
        with self._lock:
            if self._result is not None:
                return
            self._chunks.append(delta)
            self._wake_waiters()
            for listener in self._listeners:
                listener(delta)

    def _wake_waiters(self) -> None:
        self._lock.notify_all()
        for loop, fut in self._waiters:
            try:
                loop.call_soon_threadsafe(_resolve, fut)
            except RuntimeError:  # that event loop is closed: nobody is waiting any more
                pass
        self._waiters.clear()

    def _finish(self, generation: Generation) -> bool:
        with self._lock:
            if self._result is not None:
                return False
            self._result = generation
            self._wake_waiters()
            for listener in self._listeners:
                listener(None)
        return True

    def _finish_now(
        self, reason: str, error: Optional[str], seq: Optional[SequenceState] = None, t_first: Optional[float] = None
    ) -> bool:
        # From another thread the sequence may be mid-step: report what was streamed, and
        # the ids that produced it.
        with self._lock:
            text = "".join(self._chunks)
        ids = list(seq.ids) if seq is not None else []
        ttft = (t_first - self.t_submit) if t_first is not None else 0.0
        return self._finish(Generation(text, ids, reason, self.prompt_tokens, ttft, 0.0, error=error))


def _resolve(fut) -> None:
    if not fut.done():
        fut.set_result(None)


class _Slot:
    def __init__(self, index: int):
        self.index = index
        self.tokens: List[int] = []  # tokens whose K/V this slot holds, positions 0..len-1
        self.theta_only = True  # every cached key rotated with rope_theta (NTK reuse rule)
        self.last_used = 0.0
        self.busy = False


class _Active:
    """A request admitted into a slot."""

    def __init__(self, engine: "Engine", req: Request, slot: _Slot, reused: int):
        llm = engine.llm
        self.req = req
        self.slot = slot
        self.prefilled = reused
        self.base = llm._base(len(req.prompt))
        # Prefill is chunked, so a long prompt's activation memory does not grow with it;
        # a long one that takes seconds says how far it got (timed from its first chunk).
        self.progress: Optional[PrefillProgress] = None
        self.seq = SequenceState(llm, req.prompt, req.stops, skip_special_tokens=req.skip_special_tokens)
        req._seq = self.seq
        self.generator = None
        if not req.params.greedy:
            seed = req.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()).item())
            self.generator = torch.Generator(device=llm.device)
            self.generator.manual_seed(seed)
        self.t_first: Optional[float] = None
        self.t_last: Optional[float] = None
        self.t_decode_start: Optional[float] = None
        self.logits_parts: List[torch.Tensor] = []

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.req.prompt)

    def position(self) -> int:
        """Position of the last sampled token (the next decode input)."""
        return len(self.req.prompt) + len(self.seq.ids) - 1


class Engine:
    """Continuous batching over the LLM's KV-cache slots (module docs). An LLM has at most
    one running engine: creating one makes it the LLM's (llm.generate, chat and logits
    then run through it); creating a second while the first runs raises ValueError.

    max_waiting: requests that may wait for a slot; past it submit raises EngineOverloaded.
    prefill_chunk: the prefill budget of each prompt per step while others decode, in
    tokens at position 0 (deeper tokens cost more, module docs; default
    PREFILL_BUDGET_CPU / PREFILL_BUDGET_CUDA).
    batch_invariant: on the CPU, run the output head at a fixed row count (the slot
    count) so a row's logits do not depend on how many rows share the step (module docs);
    False saves that padding (a 16-slot SmolLM2 head costs ~1.5x a 1-row one) at the price
    of last-bit differences between batch sizes. No effect on CUDA."""

    def __init__(self, llm, max_waiting: int = 256, prefill_chunk: Optional[int] = None, batch_invariant: bool = True):
        if not isinstance(max_waiting, int) or isinstance(max_waiting, bool) or max_waiting < 0:
            raise ValueError(f"max_waiting must be an integer >= 0, got {max_waiting!r}")
        cuda = llm.device.type == "cuda"
        if prefill_chunk is None:
            prefill_chunk = PREFILL_BUDGET_CUDA if cuda else PREFILL_BUDGET_CPU
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        with llm._engine_lock:
            # One scheduler per model: two would hand out the same KV slots.
            if llm._engine is not None and llm._engine.healthy:
                raise ValueError("this LLM already has a running Engine (llm.engine); close it before creating another")
            llm._engine = self
        self.llm = llm
        self.model = llm.model
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        c = self.llm.config
        # The context length at which a token's attention does as many multiply-adds as
        # its linear layers: 2 * weights per layer against 4 * heads * head_dim * context.
        linear = c.hidden_size * (c.qkv_rows + c.q_size + 3 * c.intermediate_size)
        self._attention_span = linear / (2 * c.num_heads * c.head_dim)
        self._slots = [_Slot(i) for i in range(self.model.max_batch)]
        self._waiting: Deque[Request] = collections.deque()
        self._active: List[_Active] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._healthy = True
        self._unhealthy_reason: Optional[str] = None
        self._seen: Optional[torch.Tensor] = None
        # On the CPU the head runs with a fixed row count (module docs: invariance).
        if not isinstance(batch_invariant, bool):
            raise TypeError(f"batch_invariant must be a bool, got {type(batch_invariant).__name__}")
        self._head_rows = self.model.max_batch if (batch_invariant and not cuda) else None
        # Every key exists from the start: stats() copies the dict while the scheduler
        # thread increments, which is safe only while no key is added.
        self._counters = collections.Counter(
            {
                k: 0
                for k in (
                    "reused_prefix_tokens",
                    "prefill_tokens",
                    "tokens_generated",
                    "requests_finished",
                    "requests_cancelled",
                    "requests_timed_out",
                    "requests_failed",
                    "steps",
                )
            }
        )
        self._ttft: Deque[float] = collections.deque(maxlen=4096)
        self._itl: Deque[float] = collections.deque(maxlen=16384)
        if llm.cuda_graph:
            try:
                llm._capture_decode_graphs()
            except Exception as exc:  # noqa: BLE001 - any capture failure has the same remedy
                # Eager decoding computes the same tokens with the same kernels, only with
                # more launch overhead per step: serve that way rather than not at all.
                llm.cuda_graph = False
                warnings.warn(
                    f"CUDA graph capture failed ({type(exc).__name__}: {exc}); the engine decodes "
                    "eagerly (the same tokens, more launch overhead per step)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._thread = threading.Thread(
            target=_scheduler_main, args=(weakref.ref(self), self._wake), name="fastinternlm-engine", daemon=True
        )
        self._thread.start()
        _LIVE.add(self)

    # ---- public API --------------------------------------------------------------------
    def submit(
        self,
        prompt,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        seed: Optional[int] = None,
        stop: Union[None, str, Sequence[str]] = None,
        deadline_s: Optional[float] = None,
        stop_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        allow_special_tokens: bool = True,
        _listener=None,
    ) -> Request:
        """Queue one request (a str, a list of token ids or a list of {"role", "content"}
        messages); returns its Request at once. Malformed or oversize requests raise
        ValueError/TypeError here; a full queue EngineOverloaded; a closed or failed
        engine EngineUnhealthy."""
        if not self.healthy:  # say so before any complaint about the request itself
            raise EngineUnhealthy(self._unhealthy_message())
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        ids = self._prompt_ids(prompt, allow_special_tokens)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.llm._check_request([ids], max_new_tokens)
        stops = _stop_strings(stop)
        if deadline_s is not None and not (
            isinstance(deadline_s, (int, float))
            and not isinstance(deadline_s, bool)
            and deadline_s > 0
            and math.isfinite(deadline_s)
        ):
            raise ValueError(f"deadline_s must be None or a finite number of seconds > 0, got {deadline_s!r}")
        if not isinstance(skip_special_tokens, bool):
            raise TypeError(f"skip_special_tokens must be a bool, got {type(skip_special_tokens).__name__}")
        vocab = self.llm.config.vocab_size
        if isinstance(stop_token_ids, (str, bytes)) or not hasattr(stop_token_ids, "__iter__"):
            raise TypeError(f"stop_token_ids must be a sequence of token ids, got {stop_token_ids!r}")
        extra = list(stop_token_ids)
        for t in extra:
            if not (isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab):
                raise ValueError(f"stop_token_ids must be token ids in [0, {vocab}), got {t!r}")
        req = Request(
            self,
            ids,
            max_new_tokens,
            params,
            stops,
            set(self.llm.stop_ids) | set(extra),
            deadline_s,
            skip_special_tokens,
        )
        if _listener is not None:  # internal: LLM.generate's merged streams (delta, then None at the end)
            req._listeners.append(_listener)
        self._enqueue(req)
        return req

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            running = len(self._active)
            waiting = len(self._waiting)
            free = sum(not s.busy for s in self._slots)
            ttft, itl = list(self._ttft), list(self._itl)
            c = dict(self._counters)
        return {
            "running": running,
            "waiting": waiting,
            "free_slots": free,
            "slots": len(self._slots),
            "reused_prefix_tokens": c.get("reused_prefix_tokens", 0),
            "prefill_tokens": c.get("prefill_tokens", 0),
            "tokens_generated": c.get("tokens_generated", 0),
            "requests_finished": c.get("requests_finished", 0),
            "requests_cancelled": c.get("requests_cancelled", 0),
            "requests_timed_out": c.get("requests_timed_out", 0),
            "requests_failed": c.get("requests_failed", 0),
            "steps": c.get("steps", 0),
            "healthy": self.healthy,
            "prefill_chunk": self.prefill_chunk,
            "ttft_s": ttft,
            "itl_s": itl,
        }

    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closed

    def close(self, timeout: Optional[float] = None) -> None:
        """Cancel everything waiting or running and stop the scheduler thread."""
        with self._lock:
            self._closed = True
            pending = list(self._waiting) + [a.req for a in self._active]
            self._waiting.clear()
        for req in pending:
            req._finish_now("cancelled", None)
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- internals: submission ---------------------------------------------------------
    def _prompt_ids(self, prompt, allow_special_tokens: bool = True) -> List[int]:
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            raise TypeError("submit takes one prompt; submit a list of prompts one by one")
        prompts, single = self.llm._prompts(prompt, allow_special_tokens)
        if not single:
            raise TypeError("submit takes one prompt (a str, a list of token ids or a list of messages)")
        return prompts[0]

    def _enqueue(self, req: Request) -> None:
        with self._lock:
            if not self.healthy:
                raise EngineUnhealthy(self._unhealthy_message())
            if len(self._waiting) >= self.max_waiting and not self._has_free_slot_locked():
                raise EngineOverloaded(
                    f"{len(self._waiting)} requests are waiting (max_waiting={self.max_waiting}) "
                    f"and all {len(self._slots)} slots are busy"
                )
            self._waiting.append(req)
        self._wake.set()

    def _has_free_slot_locked(self) -> bool:
        # Slots taken this instant by requests not yet admitted count as busy.
        return sum(not s.busy for s in self._slots) > len(self._waiting)

    def _unhealthy_message(self) -> str:
        if self._unhealthy_reason:
            return f"the engine stopped after a device error: {self._unhealthy_reason}"
        return "the engine is closed"

    def _submit_logits(self, ids: List[int]) -> Request:
        """The forward of LLM.logits, run in a slot of its own by the scheduler."""
        self.llm._check_request([ids], 0)
        req = Request(self, ids, 0, SamplingParams(), [], set(), None, True, kind="logits")
        self._enqueue(req)
        return req

    # ---- internals: the scheduler ------------------------------------------------------
    def _step(self) -> bool:
        """One scheduler step; False when there was nothing to do."""
        now = time.perf_counter()
        self._reap(now)
        self._admit(now)
        if not self._active:
            return False
        try:
            with torch.inference_mode():
                self._compute()
        except Exception as exc:  # a forward that fails poisons every sequence in flight
            self._poison(f"{type(exc).__name__}: {exc}")
        self._counters["steps"] += 1
        return True

    def _reap(self, now: float) -> None:
        """Drop finished (cancelled) requests and those past their deadline."""
        with self._lock:
            keep = collections.deque()
            for req in self._waiting:
                if req.done:
                    self._counters["requests_cancelled"] += 1
                    self._counters["requests_finished"] += 1
                elif req.deadline is not None and now > req.deadline:
                    if req._finish_now("timeout", None):
                        self._counters["requests_timed_out"] += 1
                        self._counters["requests_finished"] += 1
                else:
                    keep.append(req)
            self._waiting = keep
        for a in list(self._active):
            if a.req.done:
                self._release(a, "cancelled")
            elif a.req.deadline is not None and now > a.req.deadline:
                self._end(a, "timeout")

    def _admit(self, now: float) -> None:
        admitted = []
        with self._lock:
            free = [s for s in self._slots if not s.busy]
            batch = [self._waiting.popleft() for _ in range(min(len(free), len(self._waiting)))]
            # Requests with a reusable prefix pick their slots first, so one without a match
            # does not evict (as least recently used) the slot another request of this
            # round is about to reuse.
            matched = {id(r): self._choose_slot(free, r.prompt)[1] > 0 for r in batch if r.kind == "generate"}
            batch.sort(key=lambda r: not matched.get(id(r), False))
            for req in batch:
                slot, reused = self._choose_slot(free, req.prompt if req.kind == "generate" else None)
                free.remove(slot)
                slot.busy = True
                if reused < len(slot.tokens):
                    del slot.tokens[reused:]
                if reused == 0:
                    slot.theta_only = True
                self._counters["reused_prefix_tokens"] += reused
                a = _Active(self, req, slot, reused)
                self._active.append(a)
                admitted.append(a)
        for a in admitted:
            if a.req.params.repetition_penalty != 1.0:
                self._mark_prompt_seen(a)

    def _choose_slot(self, free: List[_Slot], prompt: Optional[List[int]]):
        """-> (slot, prompt tokens already in its cache). The longest reusable prefix wins;
        without one the least recently used slot is taken."""
        best, best_len = None, 0
        if prompt is not None and self._reusable(len(prompt)):
            for s in free:
                if not s.theta_only:
                    continue
                n = _common_prefix(s.tokens, prompt)
                # The last prompt token is always run: its logits give the first new token.
                n = min(n, len(prompt) - 1)
                if n > best_len:
                    best, best_len = s, n
        if best is None:
            return min(free, key=lambda s: (s.last_used, s.index)), 0
        return best, best_len

    def _reusable(self, prompt_len: int) -> bool:
        c = self.llm.config
        return c.rope_scaling is None or prompt_len <= c.max_position_embeddings

    def _mark_prompt_seen(self, a: _Active) -> None:
        if self._seen is None:
            self._seen = torch.zeros(
                len(self._slots), self.llm.config.vocab_size, dtype=torch.bool, device=self.llm.device
            )
        row = self._seen[a.slot.index]
        row.zero_()
        row[torch.tensor(a.req.prompt, device=self.llm.device)] = True

    def _release(self, a: _Active, reason: str) -> None:
        """Free a's slot. The slot keeps the tokens it holds K/V for (slot.tokens grows as
        the prefill and decode forwards write them), for reuse by a later request."""
        if a not in self._active:
            return
        self._active.remove(a)
        slot = a.slot
        c = self.llm.config
        if c.rope_scaling is not None:
            m = c.max_position_embeddings
            # "hf" rotates a decoded token with the base of its own length, "fixed" with
            # the prompt's: either way a key past m may have a base other than rope_theta.
            if len(a.req.prompt) > m or (self.llm.ntk_mode == "hf" and len(slot.tokens) > m):
                slot.theta_only = False
        slot.last_used = time.perf_counter()
        with self._lock:
            slot.busy = False
            self._counters["requests_finished"] += 1
            if reason == "cancelled":
                self._counters["requests_cancelled"] += 1
            elif reason == "timeout":
                self._counters["requests_timed_out"] += 1
            elif reason == "error":
                self._counters["requests_failed"] += 1

    def _end(self, a: _Active, reason: str, error: Optional[str] = None) -> None:
        """Finish a with `reason` (unless it already finished, e.g. cancelled) and free its slot."""
        seq = a.seq
        if reason in ("timeout", "cancelled", "error"):
            seq.finish_reason = reason
            try:
                seq.text += seq.decoder.flush()
            except Exception:
                pass
        now = time.perf_counter()
        rate = 0.0
        if a.t_decode_start is not None and len(seq.ids) > 1 and now > a.t_decode_start:
            rate = (len(seq.ids) - 1) / (now - a.t_decode_start)
        ttft = (a.t_first - a.req.t_submit) if a.t_first is not None else 0.0
        gen = Generation(seq.text, list(seq.ids), reason, len(a.req.prompt), ttft, rate, error=error)
        finished_here = a.req._finish(gen)
        self._release(a, reason if finished_here else "cancelled")

    def _poison(self, message: str) -> None:
        with self._lock:
            self._healthy = False
            self._unhealthy_reason = message
            pending = list(self._waiting)
            self._waiting.clear()
            for s in self._slots:  # what the failed forward wrote is unknown
                s.tokens = []
        for a in list(self._active):
            self._end(a, "error", f"the engine failed: {message}")
        for req in pending:
            req._finish_now("error", f"the engine failed: {message}")

    def _compute(self) -> None:
        llm, model = self.llm, self.model
        dev = llm.device
        decoding = [a for a in self._active if not a.prefilling and a.req.kind == "generate"]
        # ---- the step's prompt chunks: a budget per prompt, rows bounded per step ----
        rows_left = prefill_chunk(dev)  # the activation-memory bound on a step's prompt rows
        planned: List[_Active] = []
        chunks: List[Chunk] = []
        for a in self._active:
            if rows_left <= 0:
                break
            if not a.prefilling:
                continue
            prompt = a.req.prompt
            start = a.prefilled
            n = min(rows_left, len(prompt) - start)
            if decoding:
                n = min(n, self._chunk_tokens(float(self.prefill_chunk), start))
            rows_left -= n
            if a.progress is None and start == 0 and llm.prefill_progress:
                a.progress = prefill_progress(len(prompt), dev)
            tokens = torch.tensor(prompt[start : start + n], dtype=torch.int64, device=dev)
            planned.append(a)
            chunks.append(Chunk(tokens, a.slot.index, start, a.base))
        # ---- one forward: the batched decode rows and the chunks together ----
        decode_rows = None
        decode_logits = None
        if decoding:
            for a in decoding:
                if a.req.params.repetition_penalty != 1.0:
                    self._seen[a.slot.index, a.seq.ids[-1]] = True
            if llm.cuda_graph:  # the graph pads the rows and takes the bases itself
                decode_logits = self._graph_decode(decoding)
            else:
                tokens = torch.tensor([a.seq.ids[-1] for a in decoding], dtype=torch.int64, device=dev)
                slots = torch.tensor([a.slot.index for a in decoding], dtype=torch.int32, device=dev)
                positions = torch.tensor([a.position() for a in decoding], dtype=torch.int32, device=dev)
                decode_rows = DecodeRows(tokens, slots, positions, self._bases(positions, decoding))
            for a in decoding:
                a.slot.tokens.append(a.seq.ids[-1])
        hidden_rows: List[torch.Tensor] = []
        row = 0  # rows of `hidden` consumed so far
        if decode_rows is not None or chunks:
            hidden = model.step(decode_rows, chunks)
            if decode_rows is not None:
                row = len(decoding)
                hidden_rows.append(hidden[:row])
        # ---- bookkeeping of the chunks ----
        completed: List[_Active] = []
        for a, chunk in zip(planned, chunks):
            n = chunk.tokens.shape[0]
            part = hidden[row : row + n]
            row += n
            a.prefilled += n
            a.slot.tokens.extend(a.req.prompt[chunk.start : chunk.start + n])
            if a.progress is not None:
                a.progress.update(a.prefilled)
            self._counters["prefill_tokens"] += n
            if a.req.kind == "logits":
                a.logits_parts.append(model.logits(part))
                if not a.prefilling:
                    a.req._logits = torch.cat(a.logits_parts)
                    a.logits_parts = []
                    self._end(a, "length")
            elif not a.prefilling:
                completed.append(a)
                hidden_rows.append(part[-1:])
        rows: List[_Active] = decoding + completed
        if not rows:
            return
        logits = self._head(hidden_rows)
        if decode_logits is not None:
            logits = torch.cat([decode_logits, logits]) if logits is not None else decode_logits
        seen = None
        if any(a.req.params.repetition_penalty != 1.0 for a in rows):
            seen = self._seen.index_select(0, torch.tensor([a.slot.index for a in rows], device=dev))
        sampled = sample_rows(logits, [a.req.params for a in rows], [a.generator for a in rows], seen, llm._vocab_limit)
        host = sampled.tolist()  # the step's one host synchronisation
        now = time.perf_counter()
        for a, token in zip(rows, host):
            self._push(a, token, now)

    def _chunk_cost(self, start: int, n: int) -> float:
        """Cost of prompt positions start .. start+n-1 in budget units (module docs): a
        token at position p counts 1 + p / attention_span."""
        return n + (n * start + n * (n - 1) / 2) / self._attention_span

    def _chunk_tokens(self, budget: float, start: int) -> int:
        """The most tokens from position `start` whose cost fits `budget`, at least one (a
        prompt always advances): the positive root of n^2 / 2s + n (1 + (start - 1/2) / s)
        = budget, s the attention span."""
        s = self._attention_span
        b = 1 + (start - 0.5) / s
        n = int((math.sqrt(b * b + 2 * budget / s) - b) * s)
        while n > 1 and self._chunk_cost(start, n) > budget:  # float rounding at the root
            n -= 1
        return max(1, n)

    def _bases(self, positions: torch.Tensor, rows: List[_Active]) -> torch.Tensor:
        if self.llm.ntk_mode == "hf":
            return self.llm._bases_for(positions)
        return torch.tensor([a.base for a in rows], dtype=torch.float32, device=positions.device)

    def _graph_decode(self, rows: List[_Active]) -> torch.Tensor:
        """CUDA: replay the graph of the smallest bucket (cuda_graph.bucket_for) that holds
        these rows; the padding rows get slot -1, which the attention kernel skips, so they
        write nothing, and their logits are dropped. The rows are padded on the host, so
        each input is one copy to the device."""
        batch = len(rows)
        pad = bucket_for(batch, self.model.max_batch) - batch
        dev = self.llm.device
        tokens = torch.tensor([a.seq.ids[-1] for a in rows] + [0] * pad, dtype=torch.int64, device=dev)
        slots = torch.tensor([a.slot.index for a in rows] + [-1] * pad, dtype=torch.int32, device=dev)
        positions = torch.tensor([a.position() for a in rows] + [0] * pad, dtype=torch.int32, device=dev)
        bases = None
        if self.llm.ntk_mode != "hf":
            theta = float(self.llm.config.rope_theta)
            bases = torch.tensor([a.base for a in rows] + [theta] * pad, dtype=torch.float32, device=dev)
        graph = self.llm._decode_graph(batch + pad)
        return graph.run(tokens, slots, positions, bases)[:batch]

    def _head(self, hidden_rows: List[torch.Tensor]) -> Optional[torch.Tensor]:
        if not hidden_rows:
            return None
        hidden = torch.cat(hidden_rows)
        n, rows = hidden.shape[0], self._head_rows
        if rows is None:
            return self.model.logits(hidden)
        # At most one row per slot, so one padded piece; pieces of `rows` keep it general.
        pad = -n % rows
        if pad:
            hidden = torch.cat([hidden, hidden.new_zeros(pad, hidden.shape[1])])
        return torch.cat([self.model.logits(hidden[i : i + rows]) for i in range(0, n + pad, rows)])[:n]

    def _push(self, a: _Active, token: int, now: float) -> None:
        req = a.req
        if req.done:  # cancelled while the step ran
            self._release(a, "cancelled")
            return
        if token < 0:
            self._end(
                a,
                "error",
                f"the model produced non-finite logits (NaN or Inf) at generated token "
                f"{len(a.seq.ids) + 1} of request {req.id}: the weights or activations "
                f"hold invalid values",
            )
            return
        if a.t_first is None:
            a.t_first = a.t_decode_start = req._t_first = now
            self._ttft.append(now - req.t_submit)
        else:
            self._itl.append(now - a.t_last)
        a.t_last = now
        req.token_times.append(now)
        self._counters["tokens_generated"] += 1
        try:
            a.seq.push(token, req.stop_ids, req.max_new_tokens)
            delta = a.seq.delta()
        except Exception as exc:  # this request's text handling failed: only it ends
            self._end(a, "error", f"{type(exc).__name__} while handling the output of request {req.id}: {exc}")
            return
        req._emit(delta)
        if a.seq.finish_reason is not None:
            self._end(a, a.seq.finish_reason)


def _scheduler_main(ref, wake: threading.Event) -> None:
    """The scheduler loop. It holds its engine only weakly while idle, so an engine (and
    the model it holds) that nobody references any more is collected and the thread ends."""
    engine = ref()
    if engine is not None and engine.llm.device.type == "cuda" and engine.llm.device.index is not None:
        # A new thread's current device is 0: torch's current stream (which the kernels
        # launch on) and the graphs' replays are per device, so use the model's (load
        # gives every CUDA model its index).
        torch.cuda.set_device(engine.llm.device.index)
    del engine
    while True:
        engine = ref()
        if engine is None:
            return
        if engine._closed:
            with engine._lock:
                active = list(engine._active)
            for a in active:
                engine._release(a, "cancelled")
            return
        wake.clear()
        try:
            busy = engine._step()
        except Exception as exc:  # the scheduler itself must never die silently
            engine._poison(f"scheduler error {type(exc).__name__}: {exc}")
            busy = False
        timeout = _IDLE_POLL_S
        if not busy:
            deadlines = [r.deadline for r in list(engine._waiting) if r.deadline is not None]
            if deadlines:
                timeout = max(0.0, min(min(deadlines) - time.perf_counter(), timeout))
        del engine
        if not busy:
            wake.wait(timeout)


# Engines still alive at interpreter exit are closed first: a daemon thread frozen inside a
# torch op while the interpreter tears down can abort the process.
_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for engine in list(_LIVE):
        engine.close(timeout=5.0)


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _stop_strings(stop) -> List[str]:
    if stop is None:
        stops = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise TypeError(f"stop must be a str or a list of str, got {stop!r}")
    if any(s == "" for s in stops):
        raise ValueError("stop strings must not be empty")
    return stops


__all__ = [
    "Engine",
    "EngineOverloaded",
    "EngineUnhealthy",
    "FINISH_REASONS",
    "PREFILL_BUDGET_CPU",
    "PREFILL_BUDGET_CUDA",
    "Request",
]
