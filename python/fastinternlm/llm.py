"""The user-facing runtime: generate, chat, stream, or score with a loaded model
(`fastinternlm.load`, in weights/, builds the LLM).

    llm = fastinternlm.load("path/to/internlm2_5-7b-chat")
    print(llm.generate("The capital of France is", max_new_tokens=20).text)
    response, history = llm.chat("Hello!")

How a request runs: every prompt is checked to fit before any work, then each prompt is
one request of the LLM's Engine (engine.py, created on first use), whose scheduler thread
owns the KV-cache slots: a request gets its own slot, is prefilled in chunks, and decodes
together with whatever else is running, one token per sequence per step. The one host
transfer per step is the new tokens, which the host needs for stop checks and streaming
anyway. Several threads may call generate/chat/logits on one LLM at once.

Dynamic NTK (`ntk_mode`), when a sequence grows past max_position_embeddings:
- "hf": as the HF remote code. The base follows L = last position + 1 of each forward:
  the prompt's tokens all use the base of the prompt length (one forward in HF, however
  many chunks here), each decoded token the base of its own length. Keys already cached
  keep the rotation they were written with.
- "fixed": as lmdeploy TurboMind. One base per sequence from its prompt length, used for
  every token of that sequence, generated ones included.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .chat import IM_END, encode_chat
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import TokenizerProtocol

NTK_MODES = ("hf", "fixed")


class LLM:
    # Prompts whose prefill takes seconds report their progress on stderr (PrefillProgress).
    prefill_progress = True

    def __init__(
        self,
        model: Transformer,
        tokenizer: TokenizerProtocol,
        *,
        ntk_mode: str = "hf",
        stop_ids: Optional[Sequence[int]] = None,
        chat_template=None,
        cuda_graph: bool = True,
    ):
        # GGUF hook: a model's own chat template (chat_template.ChatTemplate) replaces
        # InternLM2's prompt format for chat() and message prompts.
        self.chat_template = chat_template
        if ntk_mode not in NTK_MODES:
            raise ValueError(f"ntk_mode must be one of {NTK_MODES}, got {ntk_mode!r}")
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.ntk_mode = ntk_mode
        self.device = model.device
        self.dtype = model.dtype
        if stop_ids is None:
            stop_ids = set(self.config.eos_token_ids)
            if any(t.content == IM_END for t in tokenizer.added_tokens.values()):  # chat models end a turn with it
                stop_ids.add(tokenizer.token_to_id(IM_END))
        self.stop_ids = set(stop_ids)
        # A model vocabulary padded past the tokenizer's: those ids have no text, never sample them.
        self._vocab_limit = min(self.config.vocab_size, tokenizer.vocab_size)
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        # Decode steps replay a captured CUDA graph (one per bucket of batch sizes, captured
        # when the engine starts); on the CPU, or with cuda_graph=False, they run eagerly.
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self._graphs = {}
        self._graph_pool = None
        self._graph_stream = None
        self._engine = None
        self._engine_lock = threading.Lock()

    def _decode_graph(self, batch: int):
        # Keyed by the NTK mode too: an "hf" graph computes the bases inside and ignores
        # the ones passed to it, so a mode changed later needs its own graph.
        key = (batch, self.ntk_mode)
        graph = self._graphs.get(key)
        if graph is None:
            from .cuda_graph import DecodeGraph

            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
                self._graph_stream = torch.cuda.Stream(device=self.device)
            bases_for = self._bases_for if self.ntk_mode == "hf" else None
            graph = DecodeGraph(self.model, batch, bases_for, self._graph_pool, self._graph_stream)
            self._graphs[key] = graph
        return graph

    def _capture_decode_graphs(self) -> None:
        """Captures the graph of every decode bucket now. The engine calls this before it
        serves: a capture in the middle of serving stalls every request for its warm-up
        and capture, and CUDA work from another thread while it runs (global capture mode)
        invalidates it."""
        from .cuda_graph import decode_buckets

        with torch.inference_mode():
            for batch in decode_buckets(self.model.max_batch):
                self._decode_graph(batch)

    # ---- rotary bases ------------------------------------------------------------------
    def _base(self, length: int) -> float:
        theta, factor, max_position_embeddings, head_dim = self.config.ntk_args
        return ops.ntk_base(theta, factor, max_position_embeddings, length, head_dim)

    def _bases_for(self, positions: torch.Tensor) -> torch.Tensor:
        """float32 base per sequence for tokens at `positions` ("hf": L = position + 1),
        computed on the device in float64 with ops.ntk_base's formula (no host sync)."""
        return ops.ntk_bases(positions + 1, *self.config.ntk_args)

    # ---- inputs ------------------------------------------------------------------------
    def _encode_chat(self, query_or_messages, history=(), system=None, allow_special_tokens: bool = True) -> List[int]:
        if self.chat_template is not None:
            return self.chat_template.encode(
                query_or_messages, history, system, allow_special_tokens=allow_special_tokens
            )
        return encode_chat(
            self.tokenizer, query_or_messages, history, system, allow_special_tokens=allow_special_tokens
        )

    def _prompts(self, prompt, allow_special_tokens: bool = True) -> Tuple[List[List[int]], bool]:
        """-> (list of prompt ids, whether one prompt was given). allow_special_tokens=False
        encodes special-token strings in text and message content as plain text (a user
        typing `<|im_end|>` cannot end the turn)."""
        if not isinstance(allow_special_tokens, bool):
            raise TypeError(f"allow_special_tokens must be True or False, got {allow_special_tokens!r}")

        def encode(text):
            return self.tokenizer.encode(text, allow_special_tokens=allow_special_tokens)

        def encode_chat_(messages):
            return self._encode_chat(messages, allow_special_tokens=allow_special_tokens)

        def is_ids(x):
            return isinstance(x, (list, tuple)) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

        def is_messages(x):
            return isinstance(x, (list, tuple)) and x and all(isinstance(m, dict) for m in x)

        if isinstance(prompt, str):
            return [encode(prompt)], True
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"a token-id prompt tensor must be 1-D int32/int64, got {prompt.dtype} {tuple(prompt.shape)}"
                )
            return [prompt.tolist()], True
        if is_ids(prompt):
            return [list(prompt)], True
        if is_messages(prompt):
            return [encode_chat_(list(prompt))], True
        if isinstance(prompt, (list, tuple)) and prompt:
            out = []
            for n, p in enumerate(prompt):
                if isinstance(p, str):
                    out.append(encode(p))
                elif is_ids(p):
                    out.append(list(p))
                elif is_messages(p):
                    out.append(encode_chat_(list(p)))
                else:
                    raise TypeError(
                        f"prompt[{n}] must be a str, a list of token ids or a list of messages, got {type(p).__name__}"
                    )
            return out, False
        raise TypeError(
            "prompt must be a str, a list of str, a list of token ids, or a list of "
            f"{{'role', 'content'}} messages, got {type(prompt).__name__}"
        )

    def _check_request(self, prompts: List[List[int]], max_new_tokens: int) -> None:
        """Everything a request needs is checked here, before any work. A sequence of L
        prompt tokens and N new tokens needs L + N - 1 cache positions (the last new token
        is never run through the model), and the prompt itself L."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        vocab = self.config.vocab_size
        for n, ids in enumerate(prompts):
            if not ids:
                raise ValueError(f"prompt {n} is empty")
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"prompt {n} has token id {bad[0]} outside the vocabulary [0, {vocab})")
            need = len(ids) + max(max_new_tokens - 1, 0)
            if need > self.model.max_seq_len:
                raise ValueError(
                    f"prompt {n} has {len(ids)} tokens, and with max_new_tokens {max_new_tokens} needs "
                    f"{need} cache positions (prompt + max_new_tokens - 1) > max_seq_len "
                    f"{self.model.max_seq_len}"
                )

    # ---- public API --------------------------------------------------------------------
    @property
    def engine(self):
        """The Engine every request of this LLM runs through, created on first use (its
        scheduler thread owns the KV-cache slots: two callers never share a slot). With
        max_batch=1 concurrent requests queue; load(..., max_batch=N) runs N at once."""
        from .engine import Engine

        with self._engine_lock:
            engine = self._engine
        if engine is not None and engine.healthy:
            return engine
        try:
            return Engine(self)
        except ValueError:  # another thread created it first
            return self._engine

    def generate(
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
        stream: bool = False,
        **options: Any,
    ):
        """Generate from a str, a list of str, token ids (a list or a 1-D tensor), a list of
        lists of ids, or OpenAI-style messages. Returns a Generation (one prompt) or a list
        of them; with stream=True an iterator of text deltas (one prompt) or of
        (prompt index, delta) pairs. Every prompt is one engine request (options:
        deadline_s, stop_token_ids, skip_special_tokens; see Engine.submit); all are
        checked before any is queued. A stream that is closed or dropped before its end
        cancels its requests."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        unknown = set(options) - {"deadline_s", "stop_token_ids", "skip_special_tokens", "allow_special_tokens"}
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
        SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        # allow_special_tokens=False: special-token strings in the prompt's text are plain text.
        prompts, single = self._prompts(prompt, options.pop("allow_special_tokens", True))
        self._check_request(prompts, max_new_tokens)
        engine = self.engine
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
            **options,
        )
        if stream:
            return self._stream(engine, prompts, single, kwargs)
        requests = []
        try:
            for p in prompts:
                requests.append(engine.submit(p, **kwargs))
            results = [r.result() for r in requests]
        except BaseException:
            for r in requests:
                r.cancel()
            raise
        return results[0] if single else results

    @staticmethod
    def _stream(engine, prompts, single: bool, kwargs) -> Iterator[Union[str, Tuple[int, str]]]:
        """Yields the deltas; its return value (StopIteration.value) is what generate
        would have returned, timings included (the CLI reports them)."""
        requests = []
        try:
            if single:
                requests.append(engine.submit(prompts[0], **kwargs))
                yield from requests[0]
                return requests[0].result()
            # Several prompts: deltas in the order they are produced, tagged with the index.
            merged: "queue.Queue" = queue.Queue()
            for n, p in enumerate(prompts):
                requests.append(engine.submit(p, _listener=lambda d, n=n: merged.put((n, d)), **kwargs))
            running = len(prompts)
            while running:
                n, d = merged.get()
                if d is None:  # request n finished
                    running -= 1
                else:
                    yield n, d
            return [r.result() for r in requests]
        finally:
            for r in requests:
                r.cancel()

    def chat(
        self,
        query: str,
        history: Optional[Sequence[Tuple[str, str]]] = None,
        system: Optional[str] = None,
        **sampling: Any,
    ) -> Tuple[str, List[Tuple[str, str]]]:
        """One chat turn with InternLM2's prompt format (see chat.py); returns the response
        and the history with this turn appended. Sampling defaults to the remote code's
        chat defaults (temperature 0.8, top_p 0.8, up to 1024 new tokens). The previous
        turns' keys and values stay in the engine's slot, so a next turn prefills only its
        new tokens (see engine.py: KV reuse)."""
        ids, kwargs = self._chat_request(query, history, system, sampling)
        result = self.generate(ids, **kwargs)
        return result.text, list(history or []) + [(query, result.text)]

    def stream_chat(
        self,
        query: str,
        history: Optional[Sequence[Tuple[str, str]]] = None,
        system: Optional[str] = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Like chat, yielding the response as text deltas. For the remote code's shape
        (cumulative response and history), see `hf_chat()`."""
        ids, kwargs = self._chat_request(query, history, system, sampling)
        return self.generate(ids, stream=True, **kwargs)

    def hf_chat(self) -> "HFChat":
        """An adapter with the InternLM remote code's `model.chat(tokenizer, query, history)`
        and `model.stream_chat(...)` signatures: code written for
        `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` ports by
        replacing that line with `model = fastinternlm.load(path).hf_chat()`."""
        return HFChat(self)

    def _chat_request(self, query, history, system, sampling):
        allow = sampling.pop("allow_special_tokens", True)
        if not isinstance(allow, bool):
            raise TypeError(f"allow_special_tokens must be True or False, got {allow!r}")
        ids = self._encode_chat(query, list(history or []), system, allow_special_tokens=allow)
        kwargs = {"temperature": 0.8, "top_p": 0.8}
        kwargs.update(sampling)
        if "max_new_tokens" not in kwargs:
            # The remote code's default, shortened to what still fits this cache (the last
            # generated token needs no cache position).
            kwargs["max_new_tokens"] = max(1, min(1024, self.model.max_seq_len - len(ids) + 1))
        return ids, kwargs

    def logits(self, token_ids) -> torch.Tensor:
        """float32 [T, vocab]: the logits at every position of one forward over token_ids
        (HF's model(input_ids).logits). Runs in an engine slot of its own."""
        if isinstance(token_ids, (list, tuple, torch.Tensor)) and len(token_ids) == 0:
            raise ValueError("logits needs at least one token id, got an empty sequence")
        prompts, single = self._prompts(token_ids)
        if not single:
            raise ValueError("logits takes one sequence")
        self._check_request(prompts, 0)
        req = self.engine._submit_logits(prompts[0])
        result = req.result()
        if result.finish_reason != "length":
            raise RuntimeError(f"the logits request ended with {result.finish_reason}: {result.error}")
        return req._logits


class HFChat:
    """The InternLM2 remote code's chat API over an LLM (see LLM.hf_chat):

        response, history = model.chat(tokenizer, "Hello", history=[])
        for response, history in model.stream_chat(tokenizer, "Hi", history=history):
            print(response)       # the whole response so far, as the remote code yields it

    `tokenizer` is accepted for signature compatibility and ignored (the LLM has its own).
    Keyword arguments as in the remote code: max_new_tokens (1024), do_sample (True),
    temperature (0.8), top_p (0.8), meta_instruction (None: InternLM's default system
    prompt); others (streamer, generation_config, ...) are refused by name."""

    def __init__(self, llm: "LLM"):
        self.llm = llm

    def _kwargs(self, max_new_tokens=None, do_sample=True, temperature=0.8, top_p=0.8, meta_instruction=None, **extra):
        unknown = set(extra) - {"top_k", "min_p", "repetition_penalty", "seed", "stop"}
        if unknown:
            raise TypeError(f"unsupported keyword arguments {sorted(unknown)}")
        kw = dict(extra, temperature=temperature if do_sample else 0.0, top_p=top_p if do_sample else 1.0)
        if max_new_tokens is not None:
            kw["max_new_tokens"] = max_new_tokens
        return meta_instruction, kw

    def chat(self, tokenizer, query: str, history: Optional[Sequence[Tuple[str, str]]] = None, **kwargs):
        system, kw = self._kwargs(**kwargs)
        return self.llm.chat(query, list(history or []), system, **kw)

    def stream_chat(self, tokenizer, query: str, history: Optional[Sequence[Tuple[str, str]]] = None, **kwargs):
        system, kw = self._kwargs(**kwargs)
        history = list(history or [])
        response = ""
        for delta in self.llm.stream_chat(query, history, system, **kw):
            response += delta
            yield response, history + [(query, response)]
