"""The user-facing runtime: load a checkpoint, then generate, chat, stream, or score.

    llm = fastinternlm.load("path/to/internlm2_5-7b-chat")
    print(llm.generate("The capital of France is", max_new_tokens=20).text)
    response, history = llm.chat("Hello!")

How a request runs (`_generate`): every prompt is checked to fit before any work; each
prompt gets its own KV-cache slot and is prefilled in chunks (bounded activation memory);
then all sequences decode together, one token each per step. The decode step reads its
inputs (tokens, slots, positions, rotary bases) from device tensors that are updated in
place, and the one host transfer per step is the new tokens, which the host needs for
stop checks and streaming anyway.

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
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from . import ops
from .chat import IM_END, encode_chat
from .checkpoint import check_quant_args, load_checkpoint, stack_rows
from .model import Layer, Transformer
from .sampling import SamplingParams, sample
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
    finish_reason: str              # "stop" (a stop token), "stop_string" or "length"
    prompt_tokens: int
    time_to_first_token: float      # seconds from the call to the first sampled token
    decode_tokens_per_s: float      # tokens after the first, per second of decoding


class _Sequence:
    """Host-side state of one sequence during a request."""

    def __init__(self, llm: "LLM", prompt: List[int], stops: Sequence[str]):
        self.prompt = prompt
        self.ids: List[int] = []
        self.decoder = llm.tokenizer.stream(skip_special_tokens=True)
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

    def _decode_graph(self, batch: int):
        graph = self._graphs.get(batch)
        if graph is None:
            from .cuda_graph import DecodeGraph
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            bases_for = self._bases_for if self.ntk_mode == "hf" else None
            graph = self._graphs[batch] = DecodeGraph(self.model, batch, bases_for, self._graph_pool)
        return graph

    def _sample(self, logits, params, generator, seen):
        if self._vocab_limit < logits.shape[-1]:
            logits[:, self._vocab_limit:] = float("-inf")
        return sample(logits, params, generator, seen)

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
        """Everything a request needs is checked here, before any work."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if len(prompts) > self.model.max_batch:
            raise ValueError(f"{len(prompts)} prompts exceed max_batch={self.model.max_batch} "
                             f"(pass max_batch to fastinternlm.load)")
        vocab = self.config.vocab_size
        for n, ids in enumerate(prompts):
            if not ids:
                raise ValueError(f"prompt {n} is empty")
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"prompt {n} has token id {bad[0]} outside the vocabulary [0, {vocab})")
            need = len(ids) + max_new_tokens
            if need > self.model.max_seq_len:
                raise ValueError(f"prompt {n} has {len(ids)} tokens + max_new_tokens {max_new_tokens} = {need} "
                                 f"> max_seq_len {self.model.max_seq_len}")

    # ---- the core loop -----------------------------------------------------------------
    def _prefill(self, ids: List[int], slot: int, base: float) -> torch.Tensor:
        """Fill `slot`'s cache with the prompt; returns the last position's hidden state [1, hidden]."""
        tokens = torch.tensor(ids, dtype=torch.int64, device=self.device)
        hidden = None
        chunk = prefill_chunk(self.device)
        for start in range(0, len(ids), chunk):
            hidden = self.model.prefill(tokens[start:start + chunk], slot, start, base)
        return hidden[-1:]

    @torch.inference_mode()
    def _run(self, prompts: List[List[int]], max_new_tokens: int, params: SamplingParams,
             stops: Sequence[str], stop_ids: set) -> Iterator[List[_Sequence]]:
        """Yields the sequences after every step; the last yield has all of them finished."""
        t_start = time.perf_counter()
        seqs = [_Sequence(self, p, stops) for p in prompts]
        batch = len(prompts)
        prompt_bases = [self._base(len(p)) for p in prompts]
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(batch, self.config.vocab_size, dtype=torch.bool, device=self.device)
            for n, p in enumerate(prompts):
                seen[n, torch.tensor(p, device=self.device)] = True

        hidden = torch.cat([self._prefill(p, n, prompt_bases[n]) for n, p in enumerate(prompts)])
        tokens = self._sample(self.model.logits(hidden), params, generator, seen)
        host = tokens.tolist()
        ttft = time.perf_counter() - t_start
        for s, t in zip(seqs, host):
            s.push(t, stop_ids, max_new_tokens)
        yield seqs

        slots = torch.arange(batch, dtype=torch.int32, device=self.device)
        positions = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=self.device)
        if self.ntk_mode == "fixed":
            bases = torch.tensor(prompt_bases, dtype=torch.float32, device=self.device)
        graph = self._decode_graph(batch) if self.cuda_graph else None
        t_decode, steps = time.perf_counter(), 0
        while not all(s.finish_reason for s in seqs):
            if seen is not None:
                seen.scatter_(1, tokens[:, None], True)
            if graph is not None:
                logits = graph.run(tokens, slots, positions, None if self.ntk_mode == "hf" else bases)
            else:
                if self.ntk_mode == "hf":
                    bases = self._bases_for(positions)
                logits = self.model.decode(tokens, slots, positions, bases)
            tokens = self._sample(logits, params, generator, seen)
            positions += 1
            host = tokens.tolist()
            steps += 1
            for s, t in zip(seqs, host):
                if s.finish_reason is None:
                    s.push(t, stop_ids, max_new_tokens)
            yield seqs
        decode_time = time.perf_counter() - t_decode
        for s in seqs:
            s.ttft = ttft
            s.rate = (len(s.ids) - 1) / decode_time if steps and decode_time > 0 else 0.0

    def _request(self, prompt, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty, seed,
                 stop):
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        prompts, single = self._prompts(prompt)
        self._check_request(prompts, max_new_tokens)
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
        run = self._run(prompts, max_new_tokens, params, stops, self.stop_ids)
        return run, prompts, single

    @staticmethod
    def _result(s: _Sequence) -> Generation:
        return Generation(s.text, list(s.ids), s.finish_reason, len(s.prompt), s.ttft, s.rate)

    # ---- public API --------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: Optional[int] = None, stop: Union[None, str, Sequence[str]] = None,
                 stream: bool = False):
        """Generate from a str, a list of str, token ids (a list or a 1-D tensor), a list of
        lists of ids, or OpenAI-style messages. Returns a Generation (one prompt) or a list
        of them; with stream=True an iterator of text deltas (one prompt) or of
        (prompt index, delta) pairs."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        run, prompts, single = self._request(prompt, max_new_tokens, temperature, top_k, top_p, min_p,
                                             repetition_penalty, seed, stop)
        if stream:
            return self._stream(run, single)
        seqs = None
        for seqs in run:
            pass
        results = [self._result(s) for s in seqs]
        return results[0] if single else results

    @staticmethod
    def _stream(run, single: bool) -> Iterator[Union[str, Tuple[int, str]]]:
        """Yields the deltas; its return value (StopIteration.value) is what generate
        would have returned, timings included (the CLI reports them)."""
        seqs: List[_Sequence] = []
        for seqs in run:
            for n, s in enumerate(seqs):
                d = s.delta()
                if d:
                    yield d if single else (n, d)
        results = [LLM._result(s) for s in seqs]
        return results[0] if single else results

    def chat(self, query: str, history: Optional[Sequence[Tuple[str, str]]] = None,
             system: Optional[str] = None, **sampling: Any) -> Tuple[str, List[Tuple[str, str]]]:
        """One chat turn with InternLM2's prompt format (see chat.py); returns the response
        and the history with this turn appended. Sampling defaults to the remote code's
        chat defaults (temperature 0.8, top_p 0.8, up to 1024 new tokens)."""
        ids, kwargs = self._chat_request(query, history, system, sampling)
        result = self.generate(ids, **kwargs)
        return result.text, list(history or []) + [(query, result.text)]

    def stream_chat(self, query: str, history: Optional[Sequence[Tuple[str, str]]] = None,
                    system: Optional[str] = None, **sampling: Any) -> Iterator[str]:
        """Like chat, yielding the response as text deltas."""
        ids, kwargs = self._chat_request(query, history, system, sampling)
        return self.generate(ids, stream=True, **kwargs)

    def _chat_request(self, query, history, system, sampling):
        ids = self._encode_chat(query, list(history or []), system)
        kwargs = {"temperature": 0.8, "top_p": 0.8}
        kwargs.update(sampling)
        if "max_new_tokens" not in kwargs:
            # The remote code's default, shortened to what still fits this cache.
            kwargs["max_new_tokens"] = max(1, min(1024, self.model.max_seq_len - len(ids)))
        return ids, kwargs

    @torch.inference_mode()
    def logits(self, token_ids) -> torch.Tensor:
        """float32 [T, vocab]: the logits at every position of one forward over token_ids
        (HF's model(input_ids).logits). Uses slot 0 of the cache."""
        if isinstance(token_ids, (list, tuple, torch.Tensor)) and len(token_ids) == 0:
            raise ValueError("logits needs at least one token id, got an empty sequence")
        prompts, single = self._prompts(token_ids)
        if not single:
            raise ValueError("logits takes one sequence")
        self._check_request(prompts, 0)
        (ids,) = prompts
        tokens = torch.tensor(ids, dtype=torch.int64, device=self.device)
        base = self._base(len(ids))
        chunk = prefill_chunk(self.device)
        out = [self.model.logits(self.model.prefill(tokens[s:s + chunk], 0, s, base))
               for s in range(0, len(ids), chunk)]
        return torch.cat(out)


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
    chat_template = None
    if getattr(tokenizer, "chat_template", None):  # tokenizer.json checkpoints: their own chat format
        from .chat_template import ChatTemplate
        chat_template = ChatTemplate(tokenizer.chat_template, tokenizer)
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
    return LLM(model, tokenizer, ntk_mode=ntk_mode, cuda_graph=cuda_graph, chat_template=chat_template)
