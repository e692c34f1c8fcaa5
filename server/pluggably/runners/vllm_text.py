"""Local text generation with vLLM's engine (provider `local`), for GPU hosts.

Written against vLLM's engine API (the v1 `AsyncLLM`), the way vLLM's own OpenAI server drives it:

- `AsyncLLM.from_engine_args(AsyncEngineArgs(model=..., ...))` builds the engine. It blocks for as
  long as the weights take to load and the engine-core process to start, so it runs in a worker
  thread the first time a model is used; the engine starts its output loop on the event loop at
  the first `generate`. Importing this module never imports vLLM (nor torch), and it imports
  without vLLM installed.
- Chat messages are rendered with the model's chat template by the engine's tokenizer
  (`engine.get_tokenizer()`, `apply_chat_template(..., add_generation_prompt=True)`) and sent as
  token ids (`{"prompt_token_ids": ...}`, vLLM's `TokensPrompt`). Tokenizing here rather than in
  the engine gives the prompt length up front: a prompt that leaves no room in `max_model_len` is
  INVALID_ARGUMENT before any engine work, and vLLM never adds a second BOS to a rendered chat.
- `TextParams` become `SamplingParams`. `max_tokens` is always set (vLLM's default is 16).
  Parameters the request leaves unset take the model's `generation_config.json` values
  (temperature, top_p, top_k, min_p, repetition_penalty), as vLLM's server does; the engine
  itself would fall back to SamplingParams' defaults instead, and GetModelParameters reports
  these same values. Temperature 0 is greedy; `seed` is per request; stop strings are left out
  of the text (`include_stop_str_in_output=False`).
- Output is requested as deltas (`RequestOutputKind.DELTA`): each `RequestOutput` becomes one
  `TextChunk(text, token_ids)` and the finished one a `DoneChunk` (finish reason, usage from
  `prompt_token_ids` and the ids received, the matched stop string from `stop_reason`).
- A consumer that goes away (generator closed, task cancelled) aborts its request in the engine
  at once (`engine.abort(request_id)`), so the engine stops it at its next step.

vLLM batches continuously, so a model admits many requests at once (`max_concurrency`, default
256); the per-model `AdmissionQueue` bounds what waits beyond that, fairly across API keys. Each
model gets an engine of its own, sized by `gpu_memory_utilization`: the fractions of models
served together must add up to at most 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import itertools
import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pluggably.core.backend import Backend
from pluggably.core.errors import (
    FieldViolation,
    InvalidArgument,
    ModelNotFound,
    PluggablyError,
    Unavailable,
)
from pluggably.core.params import ParameterSpec, ProviderOptionsPolicy, parameters_for
from pluggably.core.types import (
    Capabilities,
    Chunk,
    DoneChunk,
    FinishReason,
    GenerationRequest,
    Modality,
    ModelInfo,
    ModelState,
    TextChunk,
    TextParams,
    Usage,
)
from pluggably.observability import metrics
from pluggably.runners.admission import AdmissionQueue

log = logging.getLogger(__name__)

#: Every text parameter of `core.params.TEXT_PARAMETERS` maps onto a SamplingParams field.
SUPPORTED_TEXT_PARAMS: tuple[str, ...] = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)

#: `provider_options` this backend understands: `ignore_eos` is SamplingParams' own.
PROVIDER_OPTIONS = ProviderOptionsPolicy(allowed={"ignore_eos": bool})

_DTYPES = frozenset({"auto", "half", "float16", "bfloat16", "float", "float32"})
#: Keys of generation_config.json that vLLM's server takes as sampling defaults
#: (`ModelConfig.get_diff_sampling_param`).
_GENERATION_CONFIG_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)
#: After a failed engine start, requests are refused for this long before the next attempt.
_LOAD_RETRY_AFTER_S = 30.0
#: vLLM's finish reasons (`CompletionOutput.finish_reason`) and ours.
_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
}
_MAX_ENGINE_MESSAGE = 300


@dataclass(frozen=True)
class LocalVllmModel:
    """One model folder (a `save_pretrained` layout) served by a vLLM engine as `local/<name>`.

    `tensor_parallel_size`, `gpu_memory_utilization`, `max_model_len` and `dtype` go to
    `AsyncEngineArgs` as they are (None: vLLM's own choice, the model's context for
    `max_model_len`). `max_concurrency` requests run in the engine's batch at once; up to
    `max_queue` more wait at most `queue_timeout_s`.
    """

    name: str
    path: Path
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    dtype: str = "auto"
    max_concurrency: int = 256
    description: str = ""
    default_max_tokens: int = 256
    max_queue: int = 256
    queue_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not self.name or self.name.startswith("/") or self.name.endswith("/"):
            raise ValueError(f"invalid local model name {self.name!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"model {self.name!r}: tensor_parallel_size must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"model {self.name!r}: gpu_memory_utilization must be in (0, 1]")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"model {self.name!r}: max_model_len must be >= 2")
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"model {self.name!r}: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}"
            )
        if self.max_concurrency < 1:
            raise ValueError(f"model {self.name!r}: max_concurrency must be >= 1")
        if self.max_queue < 0:
            raise ValueError(f"model {self.name!r}: max_queue must be >= 0")
        if not (self.queue_timeout_s > 0 and math.isfinite(self.queue_timeout_s)):
            raise ValueError(f"model {self.name!r}: queue_timeout_s must be > 0")
        if self.default_max_tokens < 1:
            raise ValueError(f"model {self.name!r}: default_max_tokens must be >= 1")


@dataclass(frozen=True)
class _VllmTypes:
    """The vLLM classes a request needs, imported once an engine exists."""

    sampling_params: Any  # vllm.SamplingParams
    delta: Any  # vllm.sampling_params.RequestOutputKind.DELTA


class _Slot:
    """One configured model: its admission control and (once used) its engine."""

    def __init__(self, cfg: LocalVllmModel, provider: str) -> None:
        self.cfg = cfg
        self.model_id = f"{provider}/{cfg.name}"
        self.admission = AdmissionQueue(
            self.model_id,
            max_concurrency=cfg.max_concurrency,
            max_queue=cfg.max_queue,
            queue_timeout_s=cfg.queue_timeout_s,
        )
        self.engine: Any = None
        self.tokenizer: Any = None
        self.types: _VllmTypes | None = None
        self.max_model_len: int | None = None  # the engine's, once it runs
        self.load_task: asyncio.Task[Any] | None = None
        self.load_error = ""
        self.load_failed_at = 0.0
        # Engine request ids of generations in flight (aborted on shutdown).
        self.active: set[str] = set()
        # HF fast tokenizers must not encode from several threads at once.
        self.encode_lock = threading.Lock()
        self.files: tuple[bool, int, int] | None = None  # (usable, context length, bytes)
        self.sampling_defaults: dict[str, Any] | None = None
        self.parameter_specs: list[ParameterSpec] | None = None

    def context_length(self) -> int | None:
        """The context the engine enforces, else the configured or the model's own."""
        if self.max_model_len:
            return self.max_model_len
        if self.cfg.max_model_len:
            return self.cfg.max_model_len
        return self.files[1] if self.files is not None and self.files[1] else None

    def defaults(self) -> dict[str, Any]:
        if self.sampling_defaults is None:
            self.sampling_defaults = _sampling_defaults(
                _read_json(self.cfg.path / "generation_config.json")
            )
        return self.sampling_defaults


class VllmTextBackend(Backend):
    """Serves local causal language models with one vLLM engine per model."""

    def __init__(self, models: Sequence[LocalVllmModel] = (), provider: str = "local") -> None:
        self.provider = provider
        self._slots: dict[str, _Slot] = {}
        for cfg in models:
            if cfg.name in self._slots:
                raise ValueError(f"local model {cfg.name!r} is configured twice")
            self._slots[cfg.name] = _Slot(cfg, provider)
        self._request_numbers = itertools.count(1)
        self._shutdowns: set[asyncio.Future[None]] = set()
        self._closed = False

    # ---- models managed by the local backend -------------------------------------------------

    def ensure_model(self, cfg: LocalVllmModel) -> None:
        """Serves `cfg` under its name from now on. A model already there with other settings
        is replaced (its engine shut down) when idle; while busy the old settings stay."""
        slot = self._slots.get(cfg.name)
        if slot is not None and (slot.cfg == cfg or self.in_use(cfg.name)):
            return
        if slot is not None:
            self._shutdown_later(slot)
        self._slots[cfg.name] = _Slot(cfg, self.provider)

    def drop_model(self, name: str) -> bool:
        """Stops serving `name` and shuts its engine down (freeing the GPU memory it holds);
        False, and nothing changes, while it serves, loads or has requests waiting."""
        slot = self._slots.get(name)
        if slot is None:
            return True
        if self.in_use(name):
            return False
        del self._slots[name]
        self._shutdown_later(slot)
        return True

    def in_use(self, name: str) -> bool:
        slot = self._slots.get(name)
        if slot is None:
            return False
        return (
            slot.load_task is not None
            or bool(slot.active)
            or slot.admission.running > 0
            or slot.admission.waiting > 0
        )

    def served_names(self) -> list[str]:
        return list(self._slots)

    def active_generations(self) -> int:
        """Requests running in the engines now."""
        return sum(len(slot.active) for slot in self._slots.values())

    # ---- catalogue -----------------------------------------------------------------------------

    def describe(self, name: str) -> ModelInfo | None:
        """What this runner knows of `name` (engine running, context, load failure)."""
        slot = self._slots.get(name)
        if slot is None:
            return None
        if slot.files is None:
            _read_files(slot)
        return self._describe(slot)

    async def list_models(self) -> list[ModelInfo]:
        unread = [slot for slot in self._slots.values() if slot.files is None]
        if unread:

            def read_all() -> None:
                for slot in unread:
                    _read_files(slot)

            await asyncio.to_thread(read_all)
        return [self._describe(slot) for slot in self._slots.values()]

    def _describe(self, slot: _Slot) -> ModelInfo:
        assert slot.files is not None
        usable, _context, size = slot.files
        state, reason = ModelState.AVAILABLE, ""
        if slot.load_error:
            state, reason = ModelState.ERROR, slot.load_error
        elif not usable:
            state, reason = ModelState.ERROR, "the model folder holds no config.json"
        return ModelInfo(
            provider=self.provider,
            name=slot.cfg.name,
            modality=Modality.TEXT,
            state=state,
            state_reason=reason,
            description=slot.cfg.description,
            context_length=slot.context_length() or 0,
            size_bytes=size,
            loaded=slot.engine is not None,
            capabilities=Capabilities(streaming=True),
        )

    def parameters(self, model: ModelInfo) -> list[ParameterSpec]:
        slot = self._slots.get(model.name)
        if slot is None:
            return parameters_for(Modality.TEXT, supported=SUPPORTED_TEXT_PARAMS)
        if slot.parameter_specs is None:  # built once: the dataplane asks on every request
            defaults: dict[str, Any] = {"max_tokens": slot.cfg.default_max_tokens}
            # What runs when a request leaves a field unset: the model's value, else vLLM's.
            model_defaults = slot.defaults()
            defaults["temperature"] = model_defaults.get("temperature", 1.0)
            defaults["top_p"] = model_defaults.get("top_p", 1.0)
            defaults["repetition_penalty"] = model_defaults.get("repetition_penalty", 1.0)
            if model_defaults.get("top_k", 0) > 0:
                defaults["top_k"] = model_defaults["top_k"]
            slot.parameter_specs = parameters_for(
                Modality.TEXT, supported=SUPPORTED_TEXT_PARAMS, **defaults
            )
        return list(slot.parameter_specs)

    def provider_options(self, model: ModelInfo) -> ProviderOptionsPolicy:
        return PROVIDER_OPTIONS

    async def health(self) -> bool:
        if self._closed:
            return False
        for slot in list(self._slots.values()):
            check = getattr(slot.engine, "check_health", None)
            if check is None:
                continue
            try:
                await check()
            except Exception:
                return False
        return True

    # ---- generation ----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        slot = self._slots.get(request.model)
        if slot is None:
            raise ModelNotFound(f"{self.provider}/{request.model}")
        if self._closed:
            raise Unavailable("the local backend is shutting down", reason="BACKEND_SHUTTING_DOWN")
        params = request.text
        context = slot.context_length()
        if context and params.max_tokens is not None and params.max_tokens > context:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "text.max_tokens",
                        f"must be at most the context length of model {slot.model_id!r} "
                        f"({context} tokens), got {params.max_tokens}",
                    )
                ]
            )

        async with slot.admission.admit():
            engine = await self._ensure_engine(slot)
            if self._closed:  # closed while this request waited or loaded
                raise Unavailable(
                    "the local backend is shutting down", reason="BACKEND_SHUTTING_DOWN"
                )
            prompt_ids = await asyncio.to_thread(_encode, slot, request)
            max_tokens = _check_lengths(slot, request, len(prompt_ids))
            assert slot.types is not None
            sampling = _sampling_params(
                slot.types,
                params,
                slot.defaults(),
                max_tokens,
                ignore_eos=bool(request.provider_options.get("ignore_eos", False)),
            )
            # Unique per engine call: one gateway request may reach the same engine twice
            # (a retry, a fallback chain that names the model again).
            engine_request_id = (
                f"{request.request_id or uuid.uuid4().hex}-{next(self._request_numbers)}"
            )
            stream = self._stream(slot, engine, request, prompt_ids, sampling, engine_request_id)
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk

    async def _stream(
        self,
        slot: _Slot,
        engine: Any,
        request: GenerationRequest,
        prompt_ids: list[int],
        sampling: Any,
        request_id: str,
    ) -> AsyncGenerator[Chunk, None]:
        outputs = engine.generate({"prompt_token_ids": prompt_ids}, sampling, request_id)
        slot.active.add(request_id)
        prompt_tokens = len(prompt_ids)
        cached_tokens = 0
        completion_tokens = 0
        produced = False
        finished = False
        final: Any = None  # the finished request's CompletionOutput
        try:
            try:
                async for out in outputs:
                    if out.prompt_token_ids is not None:
                        prompt_tokens = len(out.prompt_token_ids)
                    if isinstance(getattr(out, "num_cached_tokens", None), int):
                        cached_tokens = out.num_cached_tokens
                    completion = out.outputs[0] if out.outputs else None
                    if out.finished:
                        # Set before yielding: a consumer that leaves after the last text
                        # needs no abort.
                        finished, final = True, completion
                    if completion is None:
                        continue
                    token_ids = tuple(completion.token_ids)
                    completion_tokens += len(token_ids)
                    if completion.text or token_ids:
                        produced = True
                        yield TextChunk(completion.text, token_ids)
            except PluggablyError:
                raise
            except Exception as exc:
                error = self._engine_error(slot, request, exc, produced)
                if isinstance(error, PluggablyError):
                    raise error from None
                raise error from exc
            if not finished:
                # Every engine stream ends with a finished output; one that does not is a
                # failure, never a normal end.
                raise RuntimeError(
                    f"the vLLM engine of {slot.model_id!r} ended a stream unfinished"
                )
        finally:
            slot.active.discard(request_id)
            if not finished:
                with contextlib.suppress(Exception):
                    await engine.abort(request_id)
            with contextlib.suppress(Exception):
                await outputs.aclose()

        reason: str = getattr(final, "finish_reason", None) or "stop"
        if reason == "error":
            raise RuntimeError(f"the vLLM engine of {slot.model_id!r} failed the request")
        stop_reason = getattr(final, "stop_reason", None)
        yield DoneChunk(
            _FINISH_REASONS.get(reason, FinishReason.STOP),
            Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_prompt_tokens=cached_tokens,
            ),
            stop_sequence=stop_reason if isinstance(stop_reason, str) else "",
        )

    def _engine_error(
        self, slot: _Slot, request: GenerationRequest, exc: Exception, produced: bool
    ) -> BaseException:
        if _has_class(exc, "EngineDeadError"):
            log.warning(
                "the vLLM engine of %s has died; it restarts on the next request", slot.model_id
            )
            # The next request builds a new engine rather than failing on the dead one forever.
            self._shutdown_later(slot)
            slot.max_model_len = None
            return Unavailable(
                f"the engine of model {slot.model_id!r} stopped; retry later",
                reason="ENGINE_DEAD",
                retry_after_s=1.0,
                metadata={"model": slot.model_id},
            )
        client_error = None if produced else _client_error(exc)
        if client_error is not None:
            # vLLM writes these for clients (its server returns them as HTTP 400).
            text = str(client_error).strip().splitlines()[0][:_MAX_ENGINE_MESSAGE]
            field = "messages" if request.is_chat else "prompt"
            parameter = getattr(client_error, "parameter", None)
            if "prompt" not in text.lower() and parameter in SUPPORTED_TEXT_PARAMS:
                field = f"text.{parameter}"
            return InvalidArgument(
                [FieldViolation(field, f"model {slot.model_id!r} rejected the request: {text}")]
            )
        # Not a PluggablyError: the API layer reports INTERNAL and logs the cause chain.
        return RuntimeError(f"generation with model {slot.model_id!r} failed")

    # ---- the engine ----------------------------------------------------------------------------

    async def _ensure_engine(self, slot: _Slot) -> Any:
        if slot.engine is not None:
            return slot.engine
        if slot.load_task is None:
            wait = slot.load_failed_at + _LOAD_RETRY_AFTER_S - time.monotonic()
            if slot.load_error and wait > 0:
                raise _load_failed(slot, wait)
            slot.load_task = asyncio.get_running_loop().create_task(self._load(slot))
            # Retrieved here so a start that nobody awaits any more is not reported as unhandled.
            slot.load_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        # Shielded: a request cancelled while the engine starts must not stop a start that
        # others wait for (nor leave a half-built engine holding GPU memory).
        return await asyncio.shield(slot.load_task)

    async def _load(self, slot: _Slot) -> Any:
        started = time.perf_counter()
        try:
            engine, tokenizer, types, max_model_len = await _start_engine(slot.cfg)
        except Exception as exc:
            slot.load_error = _first_line(exc)
            slot.load_failed_at = time.monotonic()
            log.warning("starting the vLLM engine of %s failed: %s", slot.model_id, slot.load_error)
            raise _load_failed(slot, _LOAD_RETRY_AFTER_S) from None
        finally:
            slot.load_task = None
        if self._closed:
            await asyncio.to_thread(_shutdown_engine, engine)
            raise Unavailable("the local backend is shutting down", reason="BACKEND_SHUTTING_DOWN")
        slot.engine, slot.tokenizer, slot.types = engine, tokenizer, types
        slot.max_model_len = max_model_len
        slot.load_error = ""
        metrics.observe_model_load(slot.model_id, time.perf_counter() - started)
        log.info("started a vLLM engine for %s (max_model_len %s)", slot.model_id, max_model_len)
        return engine

    def _shutdown_later(self, slot: _Slot) -> None:
        """Shuts the slot's engine down in a thread (it joins the engine-core process)."""
        engine, slot.engine = slot.engine, None
        if engine is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            _shutdown_engine(engine)
            return
        future = loop.run_in_executor(None, _shutdown_engine, engine)
        self._shutdowns.add(future)
        future.add_done_callback(self._shutdowns.discard)

    async def aclose(self) -> None:
        self._closed = True
        for slot in list(self._slots.values()):
            engine = slot.engine
            if engine is None:
                continue
            # Running generations end as CANCELLED (vLLM sends a final "abort" output).
            for request_id in list(slot.active):
                with contextlib.suppress(Exception):
                    await engine.abort(request_id)
            slot.engine = None
            await asyncio.to_thread(_shutdown_engine, engine)
        if self._shutdowns:
            await asyncio.gather(*self._shutdowns, return_exceptions=True)


# ------------------------------------------------------------------------------------------------
# vLLM itself: imported only here, in worker threads
# ------------------------------------------------------------------------------------------------


def _build_engine(cfg: LocalVllmModel) -> Any:
    """`AsyncLLM.from_engine_args(AsyncEngineArgs(...))`: blocks until the engine runs."""
    arg_utils = importlib.import_module("vllm.engine.arg_utils")
    async_llm = importlib.import_module("vllm.v1.engine.async_llm")
    args = arg_utils.AsyncEngineArgs(
        model=str(cfg.path),
        tensor_parallel_size=cfg.tensor_parallel_size,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_model_len=cfg.max_model_len,
        dtype=cfg.dtype,
        # vLLM logs throughput every few seconds otherwise; the gateway has its own metrics.
        disable_log_stats=True,
    )
    return async_llm.AsyncLLM.from_engine_args(args)


def _vllm_types() -> _VllmTypes:
    vllm = importlib.import_module("vllm")
    sampling = importlib.import_module("vllm.sampling_params")
    return _VllmTypes(sampling_params=vllm.SamplingParams, delta=sampling.RequestOutputKind.DELTA)


async def _start_engine(cfg: LocalVllmModel) -> tuple[Any, Any, _VllmTypes, int | None]:
    def build() -> tuple[Any, _VllmTypes]:
        if not (cfg.path / "config.json").is_file():
            raise FileNotFoundError(f"{cfg.path} holds no config.json")
        types = _vllm_types()
        return _build_engine(cfg), types

    engine, types = await asyncio.to_thread(build)
    try:
        tokenizer = engine.get_tokenizer()
        if inspect.isawaitable(tokenizer):  # vLLM before 0.11: a coroutine
            tokenizer = await tokenizer
        max_model_len = _engine_max_model_len(engine) or cfg.max_model_len
    except BaseException:
        await asyncio.to_thread(_shutdown_engine, engine)
        raise
    return engine, tokenizer, types, max_model_len


def _engine_max_model_len(engine: Any) -> int | None:
    value = getattr(getattr(engine, "model_config", None), "max_model_len", None)
    return value if isinstance(value, int) and value > 0 else None


def _shutdown_engine(engine: Any) -> None:
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is None:
        return
    try:
        shutdown()
    except Exception:
        log.warning("shutting a vLLM engine down failed", exc_info=True)


# ------------------------------------------------------------------------------------------------
# Requests
# ------------------------------------------------------------------------------------------------


def _encode(slot: _Slot, request: GenerationRequest) -> list[int]:
    """The prompt's token ids: a plain prompt as vLLM would encode it, or the conversation
    rendered with the model's chat template (runs in a worker thread)."""
    tokenizer = slot.tokenizer
    with slot.encode_lock:
        if not request.is_chat:
            return list(tokenizer.encode(request.prompt or "", add_special_tokens=True))
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgument(
                [
                    FieldViolation(
                        "messages",
                        f"model {slot.model_id!r} has no chat template; send a prompt instead",
                    )
                ]
            )
        messages = []
        for m in request.messages:
            entry = {"role": m.role, "content": m.text()}
            if m.name:
                entry["name"] = m.name
            messages.append(entry)
        from jinja2 import TemplateError

        try:
            rendered = tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
                # Control tokens typed by a client are encoded as plain text (transformers 5).
                sanitize_control_tokens=True,
            )
        except NotImplementedError:  # the template writes no control tokens at all
            rendered = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        except TemplateError as exc:
            # The template's own `raise_exception` messages are written for users.
            raise InvalidArgument(
                [
                    FieldViolation(
                        "messages",
                        f"the chat template of model {slot.model_id!r} rejected the "
                        f"conversation: {str(exc)[:200]}",
                    )
                ]
            ) from None
        if isinstance(rendered, str):  # a tokenizer that renders text only
            return list(tokenizer.encode(rendered, add_special_tokens=False))
        if not isinstance(rendered, list) and "input_ids" in rendered:
            rendered = rendered["input_ids"]
        return [int(token) for token in rendered]


def _check_lengths(slot: _Slot, request: GenerationRequest, prompt_tokens: int) -> int:
    """Validates that prompt and output fit the engine's context; returns max_tokens."""
    requested = request.text.max_tokens
    context = slot.context_length()
    if not context:  # nothing known to check against: the engine checks
        return requested if requested is not None else slot.cfg.default_max_tokens
    if prompt_tokens >= context:
        # vLLM refuses a prompt of max_model_len tokens or more (it leaves no room to generate).
        raise InvalidArgument(
            [
                FieldViolation(
                    "messages" if request.is_chat else "prompt",
                    f"the prompt has {prompt_tokens} tokens, which leaves no room to generate "
                    f"in the {context}-token context of model {slot.model_id!r}",
                )
            ]
        )
    room = context - prompt_tokens
    if requested is None:
        return min(slot.cfg.default_max_tokens, room)
    if requested > room:
        raise InvalidArgument(
            [
                FieldViolation(
                    "text.max_tokens",
                    f"the prompt has {prompt_tokens} tokens and the context of model "
                    f"{slot.model_id!r} is {context} tokens, so max_tokens can be at most "
                    f"{room}, got {requested}",
                )
            ]
        )
    return requested


def _sampling_params(
    types: _VllmTypes,
    params: TextParams,
    model_defaults: dict[str, Any],
    max_tokens: int,
    *,
    ignore_eos: bool,
) -> Any:
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": max_tokens,
        "output_kind": types.delta,
        "include_stop_str_in_output": False,
        "ignore_eos": ignore_eos,
    }
    for name in _GENERATION_CONFIG_DEFAULTS:
        value = getattr(params, name, None)
        if value is None:
            value = model_defaults.get(name)
        if value is not None:
            kwargs[name] = value
    for name in ("presence_penalty", "frequency_penalty", "seed"):
        value = getattr(params, name)
        if value is not None:
            kwargs[name] = value
    if params.stop:
        kwargs["stop"] = list(params.stop)
    try:
        return types.sampling_params(**kwargs)
    except (ValueError, TypeError) as exc:
        # SamplingParams validates ranges (VLLMValidationError is a ValueError).
        text = str(exc).strip().splitlines()[0][:_MAX_ENGINE_MESSAGE] if str(exc).strip() else ""
        parameter = getattr(exc, "parameter", None)
        field = f"text.{parameter}" if parameter in SUPPORTED_TEXT_PARAMS else "text"
        raise InvalidArgument([FieldViolation(field, f"vLLM rejected it: {text}")]) from None


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def _has_class(exc: BaseException, name: str) -> bool:
    """Whether `exc` or what caused it is an instance of a class called `name` (vLLM's
    exception classes are matched by name: vLLM may not be importable here)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if any(cls.__name__ == name for cls in type(seen).__mro__):
            return True
        seen = seen.__cause__
    return False


def _client_error(exc: BaseException) -> BaseException | None:
    """The request-validation error in `exc`'s chain: vLLM raises ValueError (newer versions
    VLLMValidationError, a VLLMClientError) and may wrap it in EngineGenerateError."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return None
        names = {cls.__name__ for cls in type(seen).__mro__}
        if isinstance(seen, ValueError) or names & {"VLLMClientError", "VLLMValidationError"}:
            return seen
        seen = seen.__cause__
    return None


def _first_line(exc: BaseException) -> str:
    # The exception's type and its first line: no stack, nothing from further down.
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _load_failed(slot: _Slot, retry_after_s: float) -> Unavailable:
    return Unavailable(
        f"model {slot.model_id!r} failed to load: {slot.load_error}",
        reason="MODEL_LOAD_FAILED",
        retry_after_s=round(retry_after_s, 1),
        metadata={"model": slot.model_id},
    )


def _sampling_defaults(gen_config: dict[str, Any] | None) -> dict[str, Any]:
    """The sampling values of a model's `generation_config.json` that vLLM's server applies
    (unlike transformers, vLLM ignores `do_sample`: a temperature given is used as is)."""
    out: dict[str, Any] = {}
    for key in _GENERATION_CONFIG_DEFAULTS:
        value = (gen_config or {}).get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = int(value) if key == "top_k" else float(value)
    return out


def _read_files(slot: _Slot) -> None:
    config = _read_json(slot.cfg.path / "config.json")
    usable = config is not None and slot.cfg.path.is_dir()
    slot.files = (usable, _context_from_config(config) or 0, _folder_size(slot.cfg.path))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _context_from_config(config: dict[str, Any] | None) -> int | None:
    for section in (config or {}, (config or {}).get("text_config")):
        if not isinstance(section, dict):
            continue
        for key in _CONTEXT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _folder_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size  # follows HF cache symlinks
    return total
