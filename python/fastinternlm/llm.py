"""The user-facing runtime: load a checkpoint, then generate, chat, stream, or score.

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

import dataclasses
import queue
import threading
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .chat import IM_END, encode_chat
from .checkpoint import check_quant_args, load_checkpoint, stack_rows
from .model import Layer, Transformer
from .sampling import SamplingParams
from .tokenizer import Tokenizer, load_tokenizer

NTK_MODES = ("hf", "fixed")
# Tokens per prefill forward: bounds activation memory for long prompts. On CUDA larger
# chunks keep the GEMMs and attention tiles big enough to fill the GPU (a 2048-token chunk
# of a 7B model needs ~0.3 GB of activations).
PREFILL_CHUNK = 512
PREFILL_CHUNK_CUDA = 2048


def prefill_chunk(device: torch.device) -> int:
    return PREFILL_CHUNK_CUDA if device.type == "cuda" else PREFILL_CHUNK


@dataclasses.dataclass
class Generation:
    """One prompt's result."""
    text: str
    token_ids: List[int]            # generated ids (the stop token included when one ended it)
    finish_reason: str              # "stop" (a stop token), "stop_string", "length", or from the
                                    # engine "cancelled", "timeout", "error"
    prompt_tokens: int
    time_to_first_token: float      # seconds from the call to the first sampled token
    decode_tokens_per_s: float      # tokens after the first, per second of decoding
    error: Optional[str] = None     # what went wrong, when finish_reason is "error"


class _Sequence:
    """Host-side state of one sequence during a request."""

    def __init__(self, llm: "LLM", prompt: List[int], stops: Sequence[str], skip_special_tokens: bool = True):
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
            self.text = self.text[:min(hits)]
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
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, ntk_mode: str = "hf",
                 stop_ids: Optional[Sequence[int]] = None, chat_template=None, cuda_graph: bool = True):
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
            if IM_END in tokenizer._by_content:  # chat models end a turn with <|im_end|>
                stop_ids.add(tokenizer.token_to_id(IM_END))
        self.stop_ids = set(stop_ids)
        # A model vocabulary padded past the tokenizer's: those ids have no text, never sample them.
        self._vocab_limit = min(self.config.vocab_size, tokenizer.vocab_size)
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
        # Decode steps replay a captured CUDA graph (one per batch size, captured on first
        # use); on the CPU, or with cuda_graph=False, they run eagerly.
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self._graphs = {}
        self._graph_pool = None
        self._engine = None
        self._engine_lock = threading.Lock()

    def _decode_graph(self, batch: int):
        graph = self._graphs.get(batch)
        if graph is None:
            from .cuda_graph import DecodeGraph
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            bases_for = self._bases_for if self.ntk_mode == "hf" else None
            graph = self._graphs[batch] = DecodeGraph(self.model, batch, bases_for, self._graph_pool)
        return graph

    # ---- rotary bases ------------------------------------------------------------------
    def _base(self, length: int) -> float:
        c = self.config
        if c.rope_scaling is None:
            return c.rope_theta
        return ops.ntk_base(c.rope_theta, c.rope_scaling.factor, c.max_position_embeddings, length, c.head_dim)

    def _bases_for(self, positions: torch.Tensor) -> torch.Tensor:
        """float32 base per sequence for tokens at `positions` ("hf": L = position + 1),
        computed on the device in float64 with ops.ntk_base's formula (no host sync)."""
        c = self.config
        if c.rope_scaling is None:
            return torch.full(positions.shape, c.rope_theta, dtype=torch.float32, device=positions.device)
        length = positions.double() + 1
        f, m, d = c.rope_scaling.factor, c.max_position_embeddings, c.head_dim
        scaled = c.rope_theta * (f * length / m - (f - 1)).pow(d / (d - 2))
        return torch.where(length > m, scaled, torch.full_like(scaled, c.rope_theta)).float()

    # ---- inputs ------------------------------------------------------------------------
    def _encode_chat(self, query_or_messages, history=(), system=None) -> List[int]:
        if self.chat_template is not None:
            return self.chat_template.encode(query_or_messages, history, system)
        return encode_chat(self.tokenizer, query_or_messages, history, system)

    def _prompts(self, prompt) -> Tuple[List[List[int]], bool]:
        """-> (list of prompt ids, whether one prompt was given)."""
        def is_ids(x):
            return isinstance(x, (list, tuple)) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x)

        def is_messages(x):
            return isinstance(x, (list, tuple)) and x and all(isinstance(m, dict) for m in x)

        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt)], True
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"a token-id prompt tensor must be 1-D int32/int64, got {prompt.dtype} {tuple(prompt.shape)}")
            return [prompt.tolist()], True
        if is_ids(prompt):
            return [list(prompt)], True
        if is_messages(prompt):
            return [self._encode_chat(list(prompt))], True
        if isinstance(prompt, (list, tuple)) and prompt:
            out = []
            for n, p in enumerate(prompt):
                if isinstance(p, str):
                    out.append(self.tokenizer.encode(p))
                elif is_ids(p):
                    out.append(list(p))
                elif is_messages(p):
                    out.append(self._encode_chat(list(p)))
                else:
                    raise TypeError(f"prompt[{n}] must be a str, a list of token ids or a list of messages, "
                                    f"got {type(p).__name__}")
            return out, False
        raise TypeError("prompt must be a str, a list of str, a list of token ids, or a list of "
                        f"{{'role', 'content'}} messages, got {type(prompt).__name__}")

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
                raise ValueError(f"prompt {n} has {len(ids)} tokens, and with max_new_tokens {max_new_tokens} needs "
                                 f"{need} cache positions (prompt + max_new_tokens - 1) > max_seq_len "
                                 f"{self.model.max_seq_len}")

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

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: Optional[int] = None, stop: Union[None, str, Sequence[str]] = None,
                 stream: bool = False, **options: Any):
        """Generate from a str, a list of str, token ids (a list or a 1-D tensor), a list of
        lists of ids, or OpenAI-style messages. Returns a Generation (one prompt) or a list
        of them; with stream=True an iterator of text deltas (one prompt) or of
        (prompt index, delta) pairs. Every prompt is one engine request (options:
        deadline_s, stop_token_ids, skip_special_tokens; see Engine.submit); all are
        checked before any is queued. A stream that is closed or dropped before its end
        cancels its requests."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        unknown = set(options) - {"deadline_s", "stop_token_ids", "skip_special_tokens"}
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
        SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        prompts, single = self._prompts(prompt)
        self._check_request(prompts, max_new_tokens)
        engine = self.engine
        kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop, **options)
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
        requests = []
        try:
            if single:
                requests.append(engine.submit(prompts[0], **kwargs))
                yield from requests[0]
                return
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
        finally:
            for r in requests:
                r.cancel()

    def chat(self, query: str, history: Optional[Sequence[Tuple[str, str]]] = None,
             system: Optional[str] = None, **sampling: Any) -> Tuple[str, List[Tuple[str, str]]]:
        """One chat turn with InternLM2's prompt format (see chat.py); returns the response
        and the history with this turn appended. Sampling defaults to the remote code's
        chat defaults (temperature 0.8, top_p 0.8, up to 1024 new tokens). The previous
        turns' keys and values stay in the engine's slot, so a next turn prefills only its
        new tokens (see engine.py: KV reuse)."""
        ids, kwargs = self._chat_request(query, history, system, sampling)
        result = self.generate(ids, **kwargs)
        return result.text, list(history or []) + [(query, result.text)]

    def stream_chat(self, query: str, history: Optional[Sequence[Tuple[str, str]]] = None,
                    system: Optional[str] = None, **sampling: Any) -> Iterator[str]:
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
        ids = self._encode_chat(query, list(history or []), system)
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

    def _kwargs(self, max_new_tokens=None, do_sample=True, temperature=0.8, top_p=0.8, meta_instruction=None,
                **extra):
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


def load(path, device=None, dtype=None, max_seq_len: Optional[int] = None, max_batch: int = 1,
         ntk_mode: str = "hf", progress: bool = True, quant: Optional[str] = None, group_size: int = 128,
         quant_head: bool = False, cuda_graph: bool = True) -> LLM:
    """Load an InternLM2/2.5 (or Llama-family) checkpoint directory, or a llama-architecture
    GGUF file (`path` ending in .gguf; see gguf_loader.py, where dtype None means float32
    on the CPU and float16 on CUDA).

    device: None means CUDA when available, else the CPU. dtype: None means the
    checkpoint's (float16/bfloat16; float32 runs on the CPU only). max_seq_len: the KV
    cache length per sequence, default min(max_position_embeddings, 32768) on CUDA and
    min(max_position_embeddings, 4096) on the CPU. max_batch: KV-cache slots, i.e. how
    many prompts one generate call can take. ntk_mode: "hf" or "fixed" (module docs).

    quant: None keeps the checkpoint's weights (a pre-quantized AWQ, GPTQ or
    `fastinternlm quantize` checkpoint loads as int4 by itself); "int4" quantizes every
    decoder-layer linear round-to-nearest, asymmetric, group_size (32, 64 or 128) input
    channels per group, tensor by tensor while loading. The output head stays in the
    activation dtype unless quant_head=True; embeddings and norms always do.

    cuda_graph: on CUDA, replay each decode step as a captured CUDA graph (one per batch
    size, captured on first use); False runs every kernel eagerly from Python (the same
    tokens, much more host time per token)."""
    check_quant_args(quant, group_size, quant_head)
    if ntk_mode not in NTK_MODES:
        raise ValueError(f"ntk_mode must be one of {NTK_MODES}, got {ntk_mode!r}")
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
        dtype = getattr(torch, dtype)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and dtype == torch.float32:
        raise TypeError("dtype float32 runs on the CPU only; use float16 or bfloat16 on CUDA")
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    from .gguf_loader import is_gguf_file, load_gguf  # GGUF hook: a .gguf file, not a directory
    if is_gguf_file(path):
        if quant is not None:
            raise ValueError("quant applies to checkpoint directories; a GGUF file's Q4_0/Q4_1 tensors "
                             "load as int4 by themselves")
        return load_gguf(path, device, dtype, max_seq_len, max_batch, ntk_mode, progress, cuda_graph)
    tokenizer = load_tokenizer(path)
    config, weights = load_checkpoint(path, device, dtype, progress, quant=quant, group_size=group_size,
                                      quant_head=quant_head)
    if device.type == "cuda" and weights.tok_embeddings.dtype == torch.float32:
        raise TypeError("this checkpoint is float32; on CUDA pass dtype='float16' or 'bfloat16'")
    if max_seq_len is None:
        max_seq_len = min(config.max_position_embeddings, 32768 if device.type == "cuda" else 4096)
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    layers = []
    for lw in weights.layers:
        # Gate and up stacked so one GEMM feeds silu_and_mul; the separate copies are dropped.
        layers.append(Layer(lw.attention_norm, lw.wqkv, lw.wo, lw.ffn_norm, stack_rows(lw.w1, lw.w3), lw.w2))
        lw.w1 = lw.w3 = None
    model = Transformer(config, weights.tok_embeddings, layers, weights.norm, weights.output,
                        max_batch=max_batch, max_seq_len=max_seq_len)
    return LLM(model, tokenizer, ntk_mode=ntk_mode, cuda_graph=cuda_graph)
