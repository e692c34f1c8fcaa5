"""Local text generation with Hugging Face `transformers` (provider `local`).

Importing this module is cheap: `torch` and `transformers` are imported the first time a model is
used, in a worker thread, so the event loop keeps serving while they (and the weights) load.

Admission comes first: each model has an `AdmissionQueue` (`runners/admission.py`) that bounds
running and waiting requests and shares the queue fairly across API keys. A request takes its
permit before the model loads or its prompt is tokenized, so a refusal under overload costs
microseconds; only checks that cost next to nothing (the model exists, `max_tokens` against the
context, a prompt too long to fit whatever its tokens) run before it.

Each generation runs `model.generate` in its own thread. A streamer hands the new token ids to the
event loop (a locked deque plus at most one pending wake-up, see `_Job`); the async side turns them into
text with `IncrementalDetokenizer` and applies stop sequences with `StopMatcher`. Stopping (a stop
sequence, a cancelled or closed consumer, shutdown) sets a `threading.Event` that a
`StoppingCriteria` checks after every token.

Sampling never touches torch's global RNG: a logits processor samples with a per-request
`torch.Generator` and hands `generate` a one-hot distribution that greedy decoding picks, so a
seed gives the same tokens however many requests run at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import functools
import importlib.util
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pluggably.core.backend import Backend
from pluggably.core.errors import (
    FieldViolation,
    InvalidArgument,
    ModelNotFound,
    ResourceExhausted,
    Unavailable,
)
from pluggably.core.params import ProviderOptionsPolicy
from pluggably.core.textstream import IncrementalDetokenizer, StopMatcher
from pluggably.core.types import (
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
from pluggably.runners.admission import AdmissionQueue, Permit

if TYPE_CHECKING:
    from pluggably.core.params import ParameterSpec

logger = logging.getLogger(__name__)

DEFAULT_PROVIDER = "local"

#: Every text parameter of `core.params.TEXT_PARAMETERS` is supported.
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

#: `provider_options` this backend understands (the dataplane rejects anything else).
#: `ignore_eos` (bool, like vLLM's): keep generating after end-of-sequence tokens, up to max_tokens.
PROVIDER_OPTIONS = ProviderOptionsPolicy(allowed={"ignore_eos": bool})

_DTYPE_NAMES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)
#: Temperatures below this decode greedily.
_GREEDY_BELOW_TEMPERATURE = 1e-5
#: After a failed load, requests are refused for this long before the next attempt.
_LOAD_RETRY_AFTER_S = 30.0
#: How long `aclose` waits for each generation thread.
_JOIN_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class LocalTextModel:
    """One local model folder (a `save_pretrained` layout) served under `local/<name>`."""

    name: str
    path: Path
    device: str = "auto"
    dtype: str = "auto"
    max_concurrency: int = 1
    max_queue: int = 16
    #: How long a request may wait in the model's queue before it is refused
    #: (RESOURCE_EXHAUSTED, reason MODEL_QUEUE_TIMEOUT, with a retry hint).
    queue_timeout_s: float = 30.0
    default_max_tokens: int = 256
    context_length: int | None = None
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not self.name or self.name.startswith("/") or self.name.endswith("/"):
            raise ValueError(f"invalid local model name {self.name!r}")
        if not _DEVICE_RE.match(self.device):
            raise ValueError(
                f"model {self.name!r}: device must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}"
            )
        if self.dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"model {self.name!r}: dtype must be one of {sorted(_DTYPE_NAMES)}, got {self.dtype!r}"
            )
        if self.max_concurrency < 1:
            raise ValueError(f"model {self.name!r}: max_concurrency must be >= 1")
        if self.max_queue < 0:
            raise ValueError(f"model {self.name!r}: max_queue must be >= 0")
        if not (self.queue_timeout_s > 0 and math.isfinite(self.queue_timeout_s)):
            raise ValueError(f"model {self.name!r}: queue_timeout_s must be > 0")
        if self.default_max_tokens < 1:
            raise ValueError(f"model {self.name!r}: default_max_tokens must be >= 1")
        if self.context_length is not None and self.context_length < 2:
            raise ValueError(f"model {self.name!r}: context_length must be >= 2")


# --------------------------------------------------------------------------------------------
# Runtime state
# --------------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    device: Any  # torch.device
    generation_config: Any  # the model's own GenerationConfig: never mutated, only copied
    eos_ids: frozenset[int]
    context_length: int
    encode_lock: threading.Lock
    # Prompts longer than this many characters cannot fit the context (`_check_prompt_bound`);
    # None when the tokenizer gives no sound bound.
    max_prompt_chars: int | None = None
    # False when the chat template rewrites assistant turns (drops their reasoning), so their
    # text may not reach the prompt and must not count towards the bound.
    counts_assistant_text: bool = True


class _Slot:
    """One configured model: its admission control and (once used) the loaded model."""

    def __init__(self, cfg: LocalTextModel, provider: str) -> None:
        self.cfg = cfg
        self.provider = provider
        self.admission = AdmissionQueue(
            f"{provider}/{cfg.name}",
            max_concurrency=cfg.max_concurrency,
            max_queue=cfg.max_queue,
            queue_timeout_s=cfg.queue_timeout_s,
        )
        self.loaded: _Loaded | None = None
        self.load_task: asyncio.Task[_Loaded] | None = None
        self.load_failed = False
        self.load_failed_at = 0.0  # time.monotonic() of the last failed load
        self.files: tuple[bool, int, int] | None = None  # (usable, context length, bytes on disk)
        self.sampling_defaults: dict[str, Any] | None = None  # from generation_config.json
        self.parameter_specs: list[ParameterSpec] | None = None

    @property
    def model_id(self) -> str:
        return f"{self.provider}/{self.cfg.name}"


_END = object()


@dataclass(frozen=True)
class _Failure:
    exc: BaseException


class _Job:
    """One generation thread and its channel to the event loop.

    The thread appends to a locked deque and wakes the loop only when no wake-up is already
    pending, so a consumer that falls behind drains many tokens per wake-up instead of paying a
    loop iteration per token (with a tiny model that per-token cost rivals the model's own).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, slot: _Slot, permit: Permit) -> None:
        self.loop = loop
        self.slot = slot
        self.permit = permit  # released by the generation thread when it ends
        self.stop = threading.Event()  # set: stop generating after the current token
        self.shutdown = False  # set by `aclose`: the generation ends as CANCELLED
        self.generated = 0  # tokens produced by the thread (written by the thread only)
        self.thread: threading.Thread | None = None
        self._items: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._wakeup_pending = False
        self._ready = asyncio.Event()

    def post(self, item: Any) -> None:
        """Hands `item` to the event loop (thread-safe); a closed loop stops the generation."""
        with self._lock:
            self._items.append(item)
            if self._wakeup_pending:
                return
            self._wakeup_pending = True
        try:
            self.loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # loop closed: nobody is listening any more
            self.stop.set()

    async def take(self) -> list[Any]:
        """Everything posted since the last call; waits while there is nothing."""
        while True:
            with self._lock:
                self._wakeup_pending = False
                if self._items:
                    items = list(self._items)
                    self._items.clear()
                    return items
            # No await between the check and clear(): a set() scheduled by `post` after the
            # check runs on this loop later, so it cannot be lost.
            self._ready.clear()
            await self._ready.wait()


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class TransformersTextBackend(Backend):
    """Serves local causal language models with `transformers`, one thread per generation."""

    def __init__(self, models: Sequence[LocalTextModel], provider: str = DEFAULT_PROVIDER) -> None:
        self.provider = provider
        self._slots: dict[str, _Slot] = {}
        for cfg in models:
            if cfg.name in self._slots:
                raise ValueError(f"local model {cfg.name!r} is configured twice")
            self._slots[cfg.name] = _Slot(cfg, provider)
        self._jobs: set[_Job] = set()
        self._finished_tokens = 0  # tokens generated by threads that have ended
        self._closed = False
        self._used_cuda = False

    # ---- models managed by the local backend (registry) -----------------------------------

    def ensure_model(self, cfg: LocalTextModel) -> None:
        """Serves `cfg` under its name from now on. A model already there with other settings
        is replaced when idle; while it serves requests the old settings stay until it is."""
        slot = self._slots.get(cfg.name)
        if slot is not None and (slot.cfg == cfg or self.in_use(cfg.name)):
            return
        self._slots[cfg.name] = _Slot(cfg, self.provider)
        self._report_loaded()

    def drop_model(self, name: str) -> bool:
        """Stops serving `name` and frees its weights; False (and nothing changes) while it
        serves or waits for requests."""
        if name not in self._slots:
            return True
        if self.in_use(name):
            return False
        del self._slots[name]
        self._report_loaded()
        return True

    def served_names(self) -> list[str]:
        return list(self._slots)

    def in_use(self, name: str) -> bool:
        """Whether `name` is generating, loading, or has requests waiting."""
        slot = self._slots.get(name)
        if slot is None:
            return False
        loading = slot.load_task is not None and not slot.load_task.done()
        busy = slot.admission.running > 0 or slot.admission.waiting > 0
        # A copy: generation threads remove their jobs from the set as they end.
        return loading or busy or any(job.slot is slot for job in list(self._jobs))

    def files_read(self, name: str) -> bool:
        """Whether `describe(name)` would answer without reading files."""
        slot = self._slots.get(name)
        return slot is not None and slot.files is not None

    def describe(self, name: str) -> ModelInfo | None:
        """What this runner knows of `name` (loaded, context, load failure); None if unknown."""
        slot = self._slots.get(name)
        if slot is None:
            return None
        if slot.files is None:
            self._read_files(slot)
        return self._describe(slot)

    # ---- catalogue -----------------------------------------------------------------------

    async def list_models(self) -> list[ModelInfo]:
        # Files are read once per model (routing asks for every request); the registry's
        # rescan will refresh them when it lands.
        unread = [slot for slot in self._slots.values() if slot.files is None or not slot.files[0]]
        if unread:

            def read_unread() -> None:
                for slot in unread:
                    self._read_files(slot)

            await asyncio.to_thread(read_unread)
        return [self._describe(slot) for slot in self._slots.values()]

    @staticmethod
    def _read_files(slot: _Slot) -> None:
        cfg = slot.cfg
        config = _read_json(cfg.path / "config.json")
        ok = config is not None and cfg.path.is_dir()
        context = cfg.context_length or (_context_from_config(config) if config else None) or 0
        slot.files = (ok, context, _folder_size(cfg.path) if ok else 0)

    def _describe(self, slot: _Slot) -> ModelInfo:
        assert slot.files is not None
        ok, context, size = slot.files
        state = ModelState.AVAILABLE if ok and not slot.load_failed else ModelState.ERROR
        return ModelInfo(
            provider=self.provider,
            name=slot.cfg.name,
            modality=Modality.TEXT,
            state=state,
            description=slot.cfg.description,
            context_length=context,
            size_bytes=size,
            loaded=slot.loaded is not None,
        )

    def parameters(self, model: ModelInfo) -> list[ParameterSpec]:
        from pluggably.core.params import parameters_for

        slot = self._slots.get(model.name)
        if slot is None:
            return parameters_for(Modality.TEXT, supported=SUPPORTED_TEXT_PARAMS)
        if slot.parameter_specs is None:  # built once: the dataplane asks on every request
            if slot.sampling_defaults is None:
                slot.sampling_defaults = _sampling_defaults(
                    _read_json(slot.cfg.path / "generation_config.json")
                )
            defaults: dict[str, Any] = {"max_tokens": slot.cfg.default_max_tokens}
            defaults.update(slot.sampling_defaults)
            slot.parameter_specs = parameters_for(
                Modality.TEXT, supported=SUPPORTED_TEXT_PARAMS, **defaults
            )
        return list(slot.parameter_specs)

    def provider_options(self, model: ModelInfo) -> ProviderOptionsPolicy:
        return PROVIDER_OPTIONS

    async def health(self) -> bool:
        return not self._closed

    def tokens_generated(self) -> int:
        """Tokens produced by generation threads so far, finished or running (a count for
        metrics, and for checking that cancelled work really stopped)."""
        return self._finished_tokens + sum(job.generated for job in list(self._jobs))

    def active_generations(self) -> int:
        """Generation threads still running (including ones finishing after a cancel)."""
        return len(self._jobs)

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        slot = self._slots.get(request.model)
        if slot is None:
            raise ModelNotFound(f"{self.provider}/{request.model}")
        if self._closed:
            raise Unavailable("the local backend is shutting down", reason="BACKEND_SHUTTING_DOWN")
        params = request.text
        ignore_eos = bool(request.provider_options.get("ignore_eos", False))

        # Only checks that cost next to nothing come before admission: everything after it
        # (loading, tokenizing, generating) is the work a full queue exists to refuse cheaply.
        if slot.loaded is not None:
            configured_context: int | None = slot.loaded.context_length
        else:
            configured_context = slot.cfg.context_length or _context_from_config(
                _read_json(slot.cfg.path / "config.json")
            )
        if (
            configured_context
            and params.max_tokens is not None
            and params.max_tokens > configured_context
        ):
            raise InvalidArgument(
                [
                    FieldViolation(
                        "text.max_tokens",
                        f"must be at most the context length of model {slot.model_id!r} "
                        f"({configured_context} tokens), got {params.max_tokens}",
                    )
                ]
            )

        loaded_before = slot.loaded
        if loaded_before is not None:
            _check_prompt_bound(slot, loaded_before, request)

        # Admission: at most `max_concurrency` running, at most `max_queue` waiting, fair across
        # API keys. From here the permit is released exactly once: by the generation thread when
        # it ends, by the encode thread's completion if the caller went away while it ran, or
        # below when anything fails before the thread starts.
        permit = await slot.admission.acquire()
        job: _Job | None = None
        encode_owns_permit = False
        try:
            if self._closed:  # closed while this request waited: do not load the model again
                raise Unavailable(
                    "the local backend is shutting down", reason="BACKEND_SHUTTING_DOWN"
                )
            loaded = await self._ensure_loaded(slot)
            if loaded_before is None:
                _check_prompt_bound(slot, loaded, request)
            encode = asyncio.ensure_future(
                asyncio.to_thread(_encode, loaded, request, slot.model_id)
            )
            try:
                # Shielded: a thread cannot be interrupted, so a cancelled caller keeps its slot
                # until the tokenizer is done with it, or the concurrency limit would not bound
                # the CPU spent tokenizing.
                prompt_ids = await asyncio.shield(encode)
            except asyncio.CancelledError:
                if not encode.done():
                    encode_owns_permit = True
                    encode.add_done_callback(functools.partial(_release_after, permit))
                raise
            max_new_tokens = _check_lengths(slot, loaded, request, len(prompt_ids))
            if self._closed:
                raise Unavailable(
                    "the local backend is shutting down", reason="BACKEND_SHUTTING_DOWN"
                )
            job = _Job(asyncio.get_running_loop(), slot, permit)
            gen_kwargs = _generation_kwargs(
                loaded, params, prompt_ids, max_new_tokens, job, ignore_eos
            )
            self._start(job, loaded, gen_kwargs)
        except BaseException:
            if not encode_owns_permit and (job is None or job.thread is None):
                permit.release()
            raise

        stream = self._stream(job, loaded, params, prompt_ids, max_new_tokens, ignore_eos)
        try:
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    yield chunk
        finally:
            # Never wait for the thread here: it stops within one token and then releases the
            # slot's permit itself.
            job.stop.set()

    def _start(self, job: _Job, loaded: _Loaded, gen_kwargs: dict[str, Any]) -> None:
        slot = job.slot

        def run() -> None:
            try:
                import torch

                with torch.inference_mode():
                    loaded.model.generate(**gen_kwargs)
            except BaseException as exc:  # reported to the consumer, logged there
                job.post(_Failure(exc))
            finally:
                job.post(_END)
                self._finished_tokens += job.generated
                self._jobs.discard(job)
                with contextlib.suppress(RuntimeError):  # loop closed: nothing left to release
                    job.loop.call_soon_threadsafe(job.permit.release)

        job.thread = threading.Thread(
            target=run, name=f"pluggably-generate:{slot.cfg.name}", daemon=True
        )
        self._jobs.add(job)
        try:
            job.thread.start()
        except BaseException:
            self._jobs.discard(job)
            job.thread = None
            raise

    async def _stream(
        self,
        job: _Job,
        loaded: _Loaded,
        params: TextParams,
        prompt_ids: list[int],
        max_new_tokens: int,
        ignore_eos: bool,
    ) -> AsyncGenerator[Chunk, None]:
        tokenizer = loaded.tokenizer
        detok = IncrementalDetokenizer(
            lambda ids: tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            ),
            context_ids=prompt_ids,
        )
        matcher = StopMatcher(params.stop)
        eos_ids = frozenset() if ignore_eos else loaded.eos_ids
        completion = 0
        finish: FinishReason | None = None
        stop_sequence = ""

        def feed(piece: str, out: list[str]) -> bool:
            """Runs text through the stop matcher; True when a stop sequence completed."""
            nonlocal finish, stop_sequence
            safe, matched = matcher.push(piece)
            if safe:
                out.append(safe)
            if matched is not None:
                finish, stop_sequence = FinishReason.STOP, matched
                job.stop.set()
                return True
            return False

        while finish is None:
            items = await job.take()
            texts: list[str] = []
            ids: list[int] = []
            ended = False
            for item in items:
                if item is _END:
                    ended = True
                    break
                if isinstance(item, _Failure):
                    raise self._generation_error(job.slot, item.exc)
                for token_id in item:
                    completion += 1
                    ids.append(token_id)
                    if token_id in eos_ids:
                        finish = FinishReason.STOP
                        break
                    if feed(detok.push((token_id,)), texts):
                        break
                if finish is not None:
                    break
            if finish is not None or ended:
                if not stop_sequence and not feed(detok.flush(), texts):
                    texts.append(matcher.flush())
                if finish is None:
                    if job.shutdown:
                        finish = FinishReason.CANCELLED
                    elif completion >= max_new_tokens:
                        finish = FinishReason.LENGTH
                    else:  # stopped by the model's own criteria (e.g. its stop strings)
                        finish = FinishReason.STOP
            if ids or any(texts):
                yield TextChunk("".join(texts), tuple(ids))
        yield DoneChunk(
            finish,
            Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion),
            stop_sequence,
        )

    def _generation_error(self, slot: _Slot, exc: BaseException) -> BaseException:
        if type(exc).__name__ == "OutOfMemoryError":
            logger.warning("model %s ran out of memory while generating", slot.model_id)
            return ResourceExhausted(
                f"model {slot.model_id!r} ran out of memory; retry later or with fewer tokens",
                subject=slot.model_id,
                reason="MODEL_OUT_OF_MEMORY",
                retry_after_s=1.0,
            )
        # Not a PluggablyError: the API layer reports INTERNAL (logging the cause chain) rather
        # than UNAVAILABLE, which would invite clients to retry a failure that will repeat.
        error = RuntimeError(f"generation with model {slot.model_id!r} failed")
        error.__cause__ = exc
        return error

    # ---- loading -------------------------------------------------------------------------

    async def _ensure_loaded(self, slot: _Slot) -> _Loaded:
        if slot.loaded is not None:
            return slot.loaded
        wait = slot.load_failed_at + _LOAD_RETRY_AFTER_S - time.monotonic()
        if slot.load_failed and slot.load_task is None and wait > 0:
            raise _load_failed(slot, wait)
        if slot.load_task is None:
            slot.load_task = asyncio.get_running_loop().create_task(self._load(slot))
            # Retrieved here so a load that nobody awaits any more is not reported as unhandled.
            slot.load_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        task = slot.load_task
        try:
            # Shielded: a cancelled request must not abort a load that others wait for.
            return await asyncio.shield(task)
        finally:
            if task.done() and slot.load_task is task and (task.cancelled() or task.exception()):
                slot.load_task = None  # the next request tries again

    async def _load(self, slot: _Slot) -> _Loaded:
        started = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(_load_model, slot.cfg, slot.model_id)
        except Exception:
            slot.load_failed = True
            slot.load_failed_at = time.monotonic()
            logger.exception("loading local model %s failed", slot.model_id)
            raise _load_failed(slot, _LOAD_RETRY_AFTER_S) from None
        if self._closed:
            raise Unavailable("the local backend is shutting down", reason="BACKEND_SHUTTING_DOWN")
        slot.loaded = loaded
        slot.load_failed = False
        metrics.observe_model_load(slot.model_id, time.perf_counter() - started)
        self._report_loaded()
        if loaded.device.type == "cuda":
            self._used_cuda = True
        logger.info("loaded local model %s on %s", slot.model_id, loaded.device)
        return loaded

    def _report_loaded(self) -> None:
        metrics.set_loaded_models(
            self.provider, sum(slot.loaded is not None for slot in self._slots.values())
        )

    # ---- shutdown ------------------------------------------------------------------------

    async def aclose(self) -> None:
        self._closed = True
        jobs = list(self._jobs)
        for job in jobs:
            job.shutdown = True
            job.stop.set()
        for job in jobs:
            if job.thread is not None:
                await asyncio.to_thread(job.thread.join, _JOIN_TIMEOUT_S)
                if job.thread.is_alive():
                    logger.warning(
                        "a generation thread of %s did not stop in time", job.slot.model_id
                    )
        for slot in self._slots.values():
            if slot.load_task is not None and not slot.load_task.done():
                with contextlib.suppress(BaseException):
                    await slot.load_task
            slot.loaded = None
            slot.load_task = None
        self._report_loaded()
        if self._used_cuda and "torch" in sys.modules:
            import gc

            gc.collect()
            torch = sys.modules["torch"]
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Helpers that run without torch
# --------------------------------------------------------------------------------------------


def _release_after(permit: Permit, task: asyncio.Future[Any]) -> None:
    """Releases `permit` once `task`, which nobody awaits any more, has ended."""
    if not task.cancelled():
        task.exception()  # retrieved, so an abandoned failure is not reported as unhandled
    permit.release()


def _load_failed(slot: _Slot, retry_after_s: float) -> Unavailable:
    # A server-side fault, so not FAILED_PRECONDITION (HTTP 400); the cause is in the log only:
    # it may name files and paths.
    return Unavailable(
        f"model {slot.model_id!r} could not be loaded; see the server log",
        reason="MODEL_LOAD_FAILED",
        retry_after_s=round(retry_after_s, 1),
        metadata={"model": slot.model_id},
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _context_from_config(config: dict[str, Any] | None) -> int | None:
    if not config:
        return None
    for section in (config, config.get("text_config")):
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


def _sampling_defaults(gen_config: dict[str, Any] | None) -> dict[str, Any]:
    """Documented defaults taken from a model's `generation_config.json`."""
    if not gen_config:
        return {"temperature": 0.0}  # transformers' default is greedy decoding
    out: dict[str, Any] = {}
    if gen_config.get("do_sample"):
        out["temperature"] = float(gen_config.get("temperature") or 1.0)
        if isinstance(gen_config.get("top_p"), int | float):
            out["top_p"] = float(gen_config["top_p"])
        if isinstance(gen_config.get("top_k"), int) and gen_config["top_k"] > 0:
            out["top_k"] = gen_config["top_k"]
    else:
        out["temperature"] = 0.0
    if isinstance(gen_config.get("repetition_penalty"), int | float):
        out["repetition_penalty"] = float(gen_config["repetition_penalty"])
    return out


def _check_prompt_bound(slot: _Slot, loaded: _Loaded, request: GenerationRequest) -> None:
    """Rejects, without tokenizing, a prompt too long to fit the context whatever its tokens.

    No token of the vocabulary stands for more than `chars_per_token` characters of the prompt
    (see `_chars_per_token`), so a prompt of N characters has at least N / chars_per_token
    tokens; one longer than (context - 1) * chars_per_token characters therefore has at least
    `context` tokens, which `_check_lengths` would refuse after tokenizing it. Chat templates
    only add text around the messages (role headers, control tokens), so counting the message
    contents alone undercounts, which keeps the bound sound; contents are counted stripped
    because templates commonly `trim` them.
    """
    limit = loaded.max_prompt_chars
    if limit is None:
        return
    if request.is_chat:
        chars = sum(
            len(m.content.strip())
            for m in request.messages
            if loaded.counts_assistant_text or m.role != "assistant"
        )
    else:
        chars = len(request.prompt or "")
    if chars > limit:
        raise InvalidArgument(
            [
                FieldViolation(
                    "messages" if request.is_chat else "prompt",
                    f"the prompt has {chars} characters, more than fit in the "
                    f"{loaded.context_length}-token context of model {slot.model_id!r} "
                    f"(at most {limit} characters), which leaves no room to generate",
                )
            ]
        )


def _chars_per_token(tokenizer: Any) -> int | None:
    """The most characters of input text that one token can stand for, or None if unbounded
    or not known.

    Read from the fast tokenizer's own description (`tokenizer.json`) and sound only where the
    pipeline never drops or merges away input: a BPE model whose alphabet covers every input
    (byte-level, where each character of a vocabulary entry is one byte and a text character is
    at least one byte, or byte fallback), normalizers that do not shrink the text by more than a
    known factor, and pre-tokenizers that keep every character. Anything else (WordPiece or
    Unigram with an unknown token that may swallow a whole word, pre-tokenizers that drop
    whitespace, `Strip`/`StripAccents`/`Precompiled` normalizers, added tokens that absorb
    neighbouring whitespace) gives None, and the prompt is tokenized to find out.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except (AttributeError, TypeError, ValueError):
        return None
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return None
    if not (_has_part(spec.get("pre_tokenizer"), "ByteLevel") or model.get("byte_fallback")):
        return None
    if (
        model.get("unk_token") is not None
        and model.get("fuse_unk")
        and not model.get("byte_fallback")
    ):
        # A run of unknown characters becomes one token. (Llama 2 sets fuse_unk too, but its
        # byte fallback turns unknown characters into byte tokens instead.)
        return None
    shrink = _normalizer_shrink(spec.get("normalizer"))
    if shrink is None or not _pre_tokenizer_keeps_text(spec.get("pre_tokenizer")):
        return None
    added = spec.get("added_tokens") or []
    if any(a.get("lstrip") or a.get("rstrip") for a in added):
        return None
    vocab = model.get("vocab") or {}
    # Entries longer than the text they cover (a `##` prefix, a `<0x0A>` byte token) only make
    # the bound looser, never wrong.
    longest = max([len(t) for t in vocab] + [len(a.get("content") or "") for a in added] + [0])
    return longest * shrink if longest > 0 else None


def _has_part(component: Any, kind: str) -> bool:
    if not isinstance(component, dict):
        return False
    if component.get("type") == kind:
        return True
    parts = component.get("pretokenizers") or component.get("normalizers") or []
    return any(_has_part(p, kind) for p in parts)


#: Normalizers that never shorten the text.
_NON_SHRINKING_NORMALIZERS = frozenset({"NFD", "NFKD", "Lowercase", "Prepend", "ByteLevel"})
#: NFC/NFKC compose characters: an output character's canonical decomposition has at most four
#: code points (e.g. U+1F82), so the text shrinks at most fourfold.
_COMPOSING_NORMALIZERS = frozenset({"NFC", "NFKC"})
_MAX_COMPOSITION = 4


def _normalizer_shrink(normalizer: Any) -> int | None:
    """How many input characters one normalized character can stand for; None if unbounded."""
    if normalizer is None:
        return 1
    if not isinstance(normalizer, dict):
        return None
    kind = normalizer.get("type")
    if kind == "Sequence":
        factor = 1
        for part in normalizer.get("normalizers") or []:
            f = _normalizer_shrink(part)
            if f is None:
                return None
            factor *= f
        return factor
    if kind in _NON_SHRINKING_NORMALIZERS:
        return 1
    if kind in _COMPOSING_NORMALIZERS:
        return _MAX_COMPOSITION
    if kind == "Replace":
        pattern = (normalizer.get("pattern") or {}).get("String")
        content = normalizer.get("content")
        if not isinstance(pattern, str) or not isinstance(content, str) or not content:
            return None  # a regex may match any length; an empty replacement deletes
        return max(1, math.ceil(len(pattern) / len(content)))
    return None


_TEXT_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"})


def _pre_tokenizer_keeps_text(pre: Any) -> bool:
    if pre is None:
        return True
    if not isinstance(pre, dict):
        return False
    kind = pre.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps_text(p) for p in pre.get("pretokenizers") or [])
    if kind in ("Split", "Punctuation"):
        return pre.get("behavior") != "Removed"
    return kind in _TEXT_KEEPING_PRE_TOKENIZERS


def _check_lengths(
    slot: _Slot, loaded: _Loaded, request: GenerationRequest, prompt_tokens: int
) -> int:
    """Validates that prompt and output fit the context; returns max_new_tokens."""
    context = loaded.context_length
    prompt_field = "messages" if request.is_chat else "prompt"
    requested = request.text.max_tokens
    if requested is not None and requested > context:
        raise InvalidArgument(
            [
                FieldViolation(
                    "text.max_tokens",
                    f"must be at most the context length of model {slot.model_id!r} ({context} tokens), "
                    f"got {requested}",
                )
            ]
        )
    if prompt_tokens >= context:
        raise InvalidArgument(
            [
                FieldViolation(
                    prompt_field,
                    f"the prompt has {prompt_tokens} tokens, which leaves no room to generate in the "
                    f"{context}-token context of model {slot.model_id!r}",
                )
            ]
        )
    if requested is None:
        return min(slot.cfg.default_max_tokens, context - prompt_tokens)
    if prompt_tokens + requested > context:
        raise InvalidArgument(
            [
                FieldViolation(
                    "text.max_tokens",
                    f"the prompt has {prompt_tokens} tokens and the context of model {slot.model_id!r} is "
                    f"{context} tokens, so max_tokens can be at most {context - prompt_tokens}, got {requested}",
                )
            ]
        )
    return requested


# --------------------------------------------------------------------------------------------
# Helpers that run in worker threads (torch / transformers imported lazily)
# --------------------------------------------------------------------------------------------


def _resolve_device(name: str, torch: Any) -> Any:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def _resolve_dtype(name: str, device: Any, torch: Any) -> Any:
    name = _DTYPE_NAMES[name]
    if name == "auto":
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            major, _minor = torch.cuda.get_device_capability(index)
            return torch.bfloat16 if major >= 8 else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    return getattr(torch, name)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Keeps transformers' tqdm bars (e.g. "Loading weights") off the server's stderr."""
    from transformers.utils import logging as hf_logging

    if hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.enable_progress_bar()
    else:
        yield


def _load_model(cfg: LocalTextModel, model_id: str) -> _Loaded:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cfg.path / "config.json").is_file():
        raise FileNotFoundError(f"{cfg.path} holds no config.json")
    device = _resolve_device(cfg.device, torch)
    dtype = _resolve_dtype(cfg.dtype, device, torch)
    tokenizer = AutoTokenizer.from_pretrained(cfg.path, local_files_only=True)
    # The first encode call may reconfigure the Rust tokenizer (turning off padding/truncation
    # stored in tokenizer.json), which must not race with decoding on the event loop later.
    tokenizer("warm-up")
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": dtype}
    direct = device.type != "cpu" and importlib.util.find_spec("accelerate") is not None
    if direct:
        kwargs["device_map"] = device  # weights go straight to the device, not through host RAM
    with _no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
    if not direct:
        model.to(device)
    model.eval()
    gen_config = copy.deepcopy(model.generation_config)

    eos = gen_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else list(eos or ()))
    if gen_config.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen_config.pad_token_id = tokenizer.pad_token_id
    if gen_config.pad_token_id is None and eos_ids:
        gen_config.pad_token_id = min(eos_ids)  # what transformers would do, without the warning

    context = cfg.context_length or _context_from_config(model.config.to_dict())
    if not context:
        context = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if not 0 < context < 10**7:  # transformers' "unknown" is a huge number
            raise RuntimeError(
                f"cannot tell the context length of {model_id}; configure context_length"
            )
    per_token = _chars_per_token(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    return _Loaded(
        model=model,
        tokenizer=tokenizer,
        device=device,
        generation_config=gen_config,
        eos_ids=eos_ids,
        context_length=context,
        encode_lock=threading.Lock(),
        max_prompt_chars=None if per_token is None else (context - 1) * per_token,
        counts_assistant_text=not (isinstance(template, str) and "</think>" in template),
    )


def _encode(loaded: _Loaded, request: GenerationRequest, model_id: str) -> list[int]:
    tokenizer = loaded.tokenizer
    with loaded.encode_lock:  # HF fast tokenizers are not safe to encode from several threads
        if not request.is_chat:
            return list(tokenizer(request.prompt or "", add_special_tokens=True)["input_ids"])
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgument(
                [
                    FieldViolation(
                        "messages",
                        f"model {model_id!r} has no chat template; send a prompt instead",
                    )
                ]
            )
        messages = []
        for m in request.messages:
            entry = {"role": m.role, "content": m.content}
            if m.name:
                entry["name"] = m.name
            messages.append(entry)
        from jinja2 import TemplateError

        try:
            try:
                ids = tokenizer.apply_chat_template(
                    messages,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                    # Control tokens typed by the client are encoded as plain text.
                    sanitize_control_tokens=True,
                )
            except NotImplementedError:  # the template writes no control tokens at all
                ids = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=False
                )
        except TemplateError as exc:
            # The template's own `raise_exception` messages are written for users.
            detail = str(exc)[:200]
            raise InvalidArgument(
                [
                    FieldViolation(
                        "messages",
                        f"the chat template of model {model_id!r} rejected the conversation: {detail}",
                    )
                ]
            ) from None
    return list(ids)


@functools.cache
def _torch_classes() -> Any:
    """Classes that subclass transformers types, defined on first use."""
    import torch
    from transformers import (
        LogitsProcessor,
        MinPLogitsWarper,
        StoppingCriteria,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )
    from transformers.generation.streamers import BaseStreamer

    class QueueStreamer(BaseStreamer):
        """Hands each new token id to the event loop; the first `put` is the prompt."""

        def __init__(self, job: _Job) -> None:
            self._job = job
            self._prompt_seen = False

        def put(self, value: Any) -> None:
            if not self._prompt_seen:
                self._prompt_seen = True
                return
            ids = value.reshape(-1).tolist()
            self._job.generated += len(ids)
            self._job.post(ids)

        def end(self) -> None:
            pass  # the thread posts the end marker itself, also on errors

    class EventStoppingCriteria(StoppingCriteria):
        def __init__(self, event: threading.Event) -> None:
            self._event = event

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full(
                (input_ids.shape[0],),
                self._event.is_set(),
                dtype=torch.bool,
                device=input_ids.device,
            )

    class PresenceFrequencyPenalty(LogitsProcessor):
        """OpenAI's presence and frequency penalties, over the generated tokens only."""

        def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
            self._prompt_length = prompt_length
            self._presence = presence
            self._frequency = frequency

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            generated = input_ids[:, self._prompt_length :]
            if generated.shape[1] == 0:
                return scores
            counts = torch.zeros_like(scores)
            counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            return (
                scores - self._frequency * counts - self._presence * (counts > 0).to(scores.dtype)
            )

    class SeededSampler(LogitsProcessor):
        """Warps and samples with its own generator, then leaves only the chosen token."""

        def __init__(self, warpers: list[Any], seed: int | None) -> None:
            self._warpers = warpers
            self._seed = seed
            self._generator: Any = None

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            for warper in self._warpers:
                scores = warper(input_ids, scores)
            if self._generator is None:
                self._generator = torch.Generator(device=scores.device)
                if self._seed is None:
                    self._generator.seed()
                else:
                    self._generator.manual_seed(self._seed % (2**64))
            probs = torch.softmax(scores.float(), dim=-1)
            chosen = torch.multinomial(probs, num_samples=1, generator=self._generator)
            out = torch.full_like(scores, -math.inf)
            return out.scatter_(1, chosen, 0.0)

    return {
        "QueueStreamer": QueueStreamer,
        "EventStoppingCriteria": EventStoppingCriteria,
        "PresenceFrequencyPenalty": PresenceFrequencyPenalty,
        "SeededSampler": SeededSampler,
        "TemperatureLogitsWarper": TemperatureLogitsWarper,
        "TopKLogitsWarper": TopKLogitsWarper,
        "TopPLogitsWarper": TopPLogitsWarper,
        "MinPLogitsWarper": MinPLogitsWarper,
        "TypicalLogitsWarper": TypicalLogitsWarper,
    }


def _generation_kwargs(
    loaded: _Loaded,
    params: TextParams,
    prompt_ids: list[int],
    max_new_tokens: int,
    job: _Job,
    ignore_eos: bool,
) -> dict[str, Any]:
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    c = _torch_classes()
    base = loaded.generation_config
    gc = copy.deepcopy(base)

    sample_by_default = bool(base.do_sample)
    wants_sampling = any(v is not None for v in (params.top_p, params.top_k, params.seed))
    if params.temperature is not None:
        temperature = params.temperature
    elif sample_by_default or wants_sampling:
        temperature = (
            base.temperature if sample_by_default and base.temperature is not None else 1.0
        )
    else:
        temperature = 0.0
    # Below this a temperature only overflows the softmax (vLLM uses the same cut-off).
    greedy = temperature < _GREEDY_BELOW_TEMPERATURE

    processors: list[Any] = []
    if params.presence_penalty or params.frequency_penalty:
        processors.append(
            c["PresenceFrequencyPenalty"](
                len(prompt_ids), params.presence_penalty or 0.0, params.frequency_penalty or 0.0
            )
        )
    if not greedy:
        top_k = (
            params.top_k
            if params.top_k is not None
            else (base.top_k if sample_by_default else None)
        )
        top_p = (
            params.top_p
            if params.top_p is not None
            else (base.top_p if sample_by_default else None)
        )
        warpers: list[Any] = []
        if temperature != 1.0:
            warpers.append(c["TemperatureLogitsWarper"](temperature))
        if top_k:
            warpers.append(c["TopKLogitsWarper"](top_k=top_k))
        if top_p is not None and top_p < 1.0:
            warpers.append(c["TopPLogitsWarper"](top_p=top_p))
        if sample_by_default and base.min_p is not None:
            warpers.append(c["MinPLogitsWarper"](min_p=base.min_p))
        if sample_by_default and base.typical_p is not None and base.typical_p < 1.0:
            warpers.append(c["TypicalLogitsWarper"](mass=base.typical_p))
        processors.append(c["SeededSampler"](warpers, params.seed))

    # `generate` itself always decodes greedily: sampling (if any) happened in SeededSampler.
    # Sampling-only fields are reset to their neutral values so transformers neither applies
    # them nor warns about them.
    gc.do_sample = False
    gc.temperature = 1.0
    gc.top_p = 1.0
    gc.top_k = 50
    gc.min_p = None
    gc.typical_p = 1.0
    gc.num_beams = 1
    gc.num_return_sequences = 1
    # An explicit max_length (not max_new_tokens) keeps transformers from warning about models
    # whose generation_config.json sets max_length.
    gc.max_length = len(prompt_ids) + max_new_tokens
    gc.max_new_tokens = None
    gc.min_length = None
    gc.min_new_tokens = None
    gc.max_time = None
    gc.stop_strings = None
    if params.repetition_penalty is not None:
        gc.repetition_penalty = params.repetition_penalty
    if ignore_eos:
        gc.eos_token_id = []  # not None: None would be refilled from the model's config
    gc.return_dict_in_generate = False
    gc.output_scores = False
    gc.output_logits = False

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=loaded.device)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "generation_config": gc,
        "logits_processor": LogitsProcessorList(processors),
        "stopping_criteria": StoppingCriteriaList([c["EventStoppingCriteria"](job.stop)]),
        "streamer": c["QueueStreamer"](job),
        "tokenizer": loaded.tokenizer,  # only used if the model's own config has stop strings
    }
