"""An engine double for vLLM: the API surface `runners/vllm_text.py` drives, on a CPU.

vLLM cannot be installed on the machines that run this suite (multi-GB CUDA wheels, no GPU), so
the runner is tested against this double, installed under vLLM's own module names
(`install()` puts `vllm`, `vllm.engine.arg_utils`, `vllm.v1.engine.async_llm`,
`vllm.sampling_params`, ... into `sys.modules`): the runner's real import statements and calls
run unchanged, and a misspelt class, field or keyword fails here as it would against vLLM.

Why it mirrors the real API: every name, signature and default below was copied from vLLM's
source (the v1 engine: `vllm/v1/engine/async_llm.py`, `vllm/sampling_params.py`,
`vllm/outputs.py`, `vllm/engine/arg_utils.py`, `vllm/v1/engine/input_processor.py`,
`vllm/v1/engine/output_processor.py`), and its behaviour follows what vLLM documents and does:

- `AsyncLLM.from_engine_args(AsyncEngineArgs(...))` is synchronous and slow (it loads weights and
  starts the engine core); `max_model_len` is the model's `max_position_embeddings` unless set
  (2048 when the config names none), and a larger value is refused as vLLM refuses it.
- The engine core steps on its own, in the background, one token per running request per step
  (continuous batching), whether or not a consumer reads; outputs wait in a per-request
  collector that merges DELTA outputs (and replaces CUMULATIVE ones) when the consumer falls
  behind, like `RequestOutputCollector`.
- `generate(prompt, sampling_params, request_id)` validates the prompt as `InputProcessor` does
  (empty, or `max_model_len` tokens or more: `ValueError` with vLLM's message), fills an unset
  `max_tokens` with the room left, and yields `RequestOutput`s: DELTA carries the new text and
  token ids, CUMULATIVE everything so far, FINAL_ONLY only the last. A consumer that goes away
  (generator closed or cancelled) aborts the request itself, as `AsyncLLM.generate` does.
- Stop strings are searched in the detokenized text; a match truncates the text before the stop
  string (unless `include_stop_str_in_output`), ends with finish_reason "stop" and the string as
  `stop_reason`, and while running the last `len(longest stop) - 1` characters are held back
  (`output_text_buffer_length`). EOS ends with "stop" and stop_reason None (its id is in
  `token_ids`, not in the text); `max_tokens` or a full context ends with "length".
- `temperature < 1e-5` is greedy (the model's scripted answer); otherwise tokens are sampled
  with a per-request generator, seeded from `seed` when given, so a seed is reproducible however
  many requests run at once.
- `abort(request_id)` takes the request out of the batch at once; a consumer still waiting gets a
  final output with finish_reason "abort".

The "model" is scripted: greedy decoding emits `EngineSettings.script` and then EOS, sampling
draws from the script's tokens. The tokenizer is the model folder's own, through transformers,
as vLLM's `get_tokenizer()` returns it.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import json
import random
import sys
import threading
import types
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_SAMPLING_EPS = 1e-5
_MAX_TEMP = 1e-2
_DEFAULT_MAX_MODEL_LEN = 2048  # vLLM's assumption when config.json names no context length
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")

DEFAULT_SCRIPT = (
    "Once upon a time there was a little robot who liked to read. Every morning it opened a "
    "new book, and the cat never answered."
)


# ---- vllm.exceptions, vllm.v1.engine.exceptions ---------------------------------------------


class VLLMValidationError(ValueError):
    def __init__(self, message: str, *, parameter: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value


class EngineDeadError(Exception):
    def __init__(self, *args: Any, suppress_context: bool = False, **kwargs: Any) -> None:
        super().__init__("EngineCore encountered an issue. See stack trace for the root cause.")


class EngineGenerateError(Exception):
    pass


# ---- vllm.sampling_params ---------------------------------------------------------------------


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


class SamplingType(enum.IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    """vLLM's fields (the ones a text request can set), defaults and validation."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    output_text_buffer_length: int = 0

    def __post_init__(self) -> None:
        if 0 < self.temperature < _MAX_TEMP:
            self.temperature = _MAX_TEMP
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids or []))
        if self.stop and not self.include_stop_str_in_output:
            self.output_text_buffer_length = max(len(s) for s in self.stop) - 1
        self._verify_args()
        if self.temperature < _SAMPLING_EPS:
            self.top_p = 1.0
            self.top_k = 0
            self.min_p = 0.0
            if self.n > 1:
                raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def _verify_args(self) -> None:
        if self.n < 1:
            raise VLLMValidationError(f"n must be at least 1, got {self.n}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise VLLMValidationError(
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}."
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise VLLMValidationError(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}."
            )
        if self.repetition_penalty <= 0.0:
            raise VLLMValidationError(
                f"repetition_penalty must be greater than zero, got {self.repetition_penalty}."
            )
        if not 0.0 <= self.temperature <= 2.0:
            raise VLLMValidationError(
                f"temperature must be in [0, 2], got {self.temperature}.",
                parameter="temperature",
                value=self.temperature,
            )
        if not 0.0 < self.top_p <= 1.0:
            raise VLLMValidationError(
                f"top_p must be in (0, 1], got {self.top_p}.", parameter="top_p", value=self.top_p
            )
        if self.top_k < -1:
            raise VLLMValidationError(
                f"top_k must be 0 (disable), or at least 1, got {self.top_k}."
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise VLLMValidationError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise VLLMValidationError(
                f"max_tokens must be at least 1, got {self.max_tokens}.",
                parameter="max_tokens",
                value=self.max_tokens,
            )
        assert isinstance(self.stop, list)
        if any(not s for s in self.stop):
            raise VLLMValidationError("stop cannot contain an empty string.")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)


# ---- vllm.outputs -------------------------------------------------------------------------------


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: Any
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | None,
        prompt_logprobs: Any,
        outputs: list[CompletionOutput],
        finished: bool,
        metrics: Any = None,
        lora_request: Any = None,
        encoder_prompt: str | None = None,
        encoder_prompt_token_ids: list[int] | None = None,
        num_cached_tokens: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.prompt_logprobs = prompt_logprobs
        self.outputs = outputs
        self.finished = finished
        self.metrics = metrics
        self.lora_request = lora_request
        self.encoder_prompt = encoder_prompt
        self.encoder_prompt_token_ids = encoder_prompt_token_ids
        self.num_cached_tokens = num_cached_tokens

    def add(self, next_output: RequestOutput, aggregate: bool) -> None:
        """Merges a later output into this one (vLLM's collector does this for a slow reader)."""
        self.finished |= next_output.finished
        for next_completion in next_output.outputs:
            for i, completion in enumerate(self.outputs):
                if completion.index == next_completion.index:
                    if aggregate:
                        completion.text += next_completion.text
                        completion.token_ids = [*completion.token_ids, *next_completion.token_ids]
                        completion.finish_reason = next_completion.finish_reason
                        completion.stop_reason = next_completion.stop_reason
                    else:
                        self.outputs[i] = next_completion
                    break
            else:
                self.outputs.append(next_completion)


# ---- vllm.engine.arg_utils ----------------------------------------------------------------------


@dataclass
class AsyncEngineArgs:
    """The fields of vLLM's (much longer) dataclass that a local model sets."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int | None = 0
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    trust_remote_code: bool = False
    disable_log_stats: bool = False
    enable_log_requests: bool = False


# ---- the engine ---------------------------------------------------------------------------------


@dataclass
class EngineSettings:
    """What a test controls: the engine's pace and script, and faults."""

    step_s: float = 0.002
    script: str = DEFAULT_SCRIPT
    #: Raised by `from_engine_args` (a failed start: out of GPU memory, a bad folder, ...).
    fail_with: BaseException | None = None
    #: False: an engine that does not expose `model_config` (the runner cannot know the limit
    #: and must rely on the engine's own validation).
    expose_model_config: bool = True


@dataclass
class Harness:
    settings: EngineSettings
    engines: list[AsyncLLM] = field(default_factory=list)
    build_attempts: int = 0


_harness: Harness | None = None


class _Collector:
    """vLLM's RequestOutputCollector: at most one pending output, merged while unread."""

    def __init__(self, kind: RequestOutputKind) -> None:
        self.kind = kind
        self.output: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()

    def put(self, output: RequestOutput | BaseException) -> None:
        if self.output is None or isinstance(output, BaseException):
            self.output = output
        elif isinstance(self.output, RequestOutput):
            self.output.add(output, aggregate=self.kind is RequestOutputKind.DELTA)
        self.ready.set()

    async def get(self) -> RequestOutput:
        while self.output is None:
            await self.ready.wait()
        output, self.output = self.output, None
        self.ready.clear()
        if isinstance(output, BaseException):
            raise output
        return output


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    rng: random.Random
    collector: _Collector
    out_ids: list[int] = field(default_factory=list)
    released: int = 0  # characters of text handed out so far


class AsyncLLM:
    """vLLM's `AsyncLLM`, driven by a scripted model (see the module docstring)."""

    def __init__(self, engine_args: AsyncEngineArgs, settings: EngineSettings) -> None:
        from transformers import AutoTokenizer

        self.engine_args = engine_args
        self.settings = settings
        self.built_on_thread = threading.get_ident()
        path = Path(engine_args.model)
        config = json.loads((path / "config.json").read_text())
        derived = next(
            (config[k] for k in _CONTEXT_KEYS if isinstance(config.get(k), int)),
            _DEFAULT_MAX_MODEL_LEN,
        )
        if engine_args.max_model_len is not None and engine_args.max_model_len > derived:
            raise ValueError(
                f"User-specified max_model_len ({engine_args.max_model_len}) is greater than the "
                f"derived max_model_len (max_position_embeddings={derived} in model's config.json)."
            )
        self.max_model_len = engine_args.max_model_len or derived
        if settings.expose_model_config:
            self.model_config = types.SimpleNamespace(max_model_len=self.max_model_len)
        self._tokenizer = AutoTokenizer.from_pretrained(
            engine_args.tokenizer or engine_args.model, local_files_only=True
        )
        self._script = list(self._tokenizer.encode(settings.script, add_special_tokens=False))
        self.eos_token_id: int = self._tokenizer.eos_token_id
        # What tests read: ("generate", request_id, prompt ids, the caller's SamplingParams)
        # and ("abort", request_id, internal).
        self.calls: list[tuple[Any, ...]] = []
        self.generated: dict[str, int] = {}  # tokens the engine produced, per request
        self.steps = 0
        self.max_batch = 0  # the most requests that one step advanced together
        self.dead = False
        self.shut_down = False
        self._running: dict[str, _Request] = {}
        self._step_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def from_engine_args(
        cls,
        engine_args: AsyncEngineArgs,
        start_engine_loop: bool = True,
        usage_context: Any = None,
        stat_loggers: Any = None,
    ) -> AsyncLLM:
        harness = _harness
        assert harness is not None, "install() the double first"
        harness.build_attempts += 1
        if harness.settings.fail_with is not None:
            raise harness.settings.fail_with
        engine = cls(engine_args, harness.settings)
        harness.engines.append(engine)
        return engine

    def get_tokenizer(self) -> Any:
        return self._tokenizer

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError()

    def requests_generated(self) -> list[str]:
        return [call[1] for call in self.calls if call[0] == "generate"]

    def aborted(self, *, internal: bool | None = None) -> list[str]:
        return [
            call[1]
            for call in self.calls
            if call[0] == "abort" and (internal is None or call[2] == internal)
        ]

    def sampling_params(self) -> list[SamplingParams]:
        return [call[3] for call in self.calls if call[0] == "generate"]

    async def generate(
        self,
        prompt: Any,
        sampling_params: SamplingParams,
        request_id: str,
        *,
        prompt_text: str | None = None,
        lora_request: Any = None,
        tokenization_kwargs: dict[str, Any] | None = None,
        trace_headers: Any = None,
        priority: int = 0,
        data_parallel_rank: int | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        request: _Request | None = None
        try:
            if self.dead:
                raise EngineDeadError()
            prompt_ids = self._prompt_ids(prompt)
            self._validate_prompt_len(len(prompt_ids))
            if request_id in self._running:
                raise ValueError(f"Request id {request_id} already running.")
            params = sampling_params.clone()
            if params.max_tokens is None:
                params.max_tokens = self.max_model_len - len(prompt_ids)
            seeded = params.seed is not None
            request = _Request(
                request_id=request_id,
                prompt_ids=prompt_ids,
                params=params,
                rng=random.Random(params.seed) if seeded else random.Random(),
                collector=_Collector(params.output_kind),
            )
            self.calls.append(("generate", request_id, list(prompt_ids), sampling_params))
            self.generated[request_id] = 0
            self._running[request_id] = request
            self._start_stepping()
            finished = False
            while not finished:
                out = await request.collector.get()
                finished = out.finished
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            if request is not None:
                await self.abort(request_id, internal=True)
            raise

    async def abort(self, request_id: str | Iterable[str], internal: bool = False) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            self.calls.append(("abort", rid, internal))
            request = self._running.pop(rid, None)
            if request is not None and not internal:
                request.collector.put(self._output(request, "", [], "abort", None, True))
        await asyncio.sleep(0)  # the real one awaits the engine-core IPC here

    def kill(self) -> None:
        """The engine core dies: running and later requests fail with EngineDeadError."""
        self.dead = True
        for request in list(self._running.values()):
            request.collector.put(EngineDeadError())
        self._running.clear()

    def shutdown(self) -> None:
        self.shut_down = True
        self.kill()
        task, loop = self._step_task, self._loop
        if task is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)

    # ---- the engine core ------------------------------------------------------------------------

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return list(self._tokenizer.encode(prompt, add_special_tokens=True))
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return [int(t) for t in prompt["prompt_token_ids"]]
        if isinstance(prompt, dict) and "prompt" in prompt:
            return list(self._tokenizer.encode(prompt["prompt"], add_special_tokens=True))
        raise TypeError(f"unsupported prompt type {type(prompt).__name__}")

    def _validate_prompt_len(self, prompt_len: int) -> None:
        if prompt_len == 0:
            raise VLLMValidationError("The decoder prompt cannot be empty")
        if prompt_len > self.max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {prompt_len}) is longer than the maximum model "
                f"length of {self.max_model_len}. Make sure that `max_model_len` is no smaller "
                "than the number of text tokens."
            )
        if prompt_len == self.max_model_len:
            raise VLLMValidationError(
                f"The decoder prompt (length {prompt_len}) plus the number of requested output "
                f"tokens (at least 1) is longer than the maximum model length of "
                f"{self.max_model_len}. Make sure that `max_model_len` is no smaller than the "
                "number of text tokens (prompt + requested output tokens)."
            )

    def _start_stepping(self) -> None:
        if self._step_task is None or self._step_task.done():
            self._loop = asyncio.get_running_loop()
            self._step_task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        while self._running:
            await asyncio.sleep(self.settings.step_s)
            self.steps += 1
            self.max_batch = max(self.max_batch, len(self._running))
            for request in list(self._running.values()):
                self._step(request)

    def _next_token(self, request: _Request) -> int:
        params, produced = request.params, len(request.out_ids)
        if params.temperature < _SAMPLING_EPS:
            if produced < len(self._script):
                return self._script[produced]
            return (
                self._script[produced % len(self._script)]
                if params.ignore_eos
                else self.eos_token_id
            )
        return request.rng.choice(self._script)

    def _step(self, request: _Request) -> None:
        params = request.params
        token = self._next_token(request)
        request.out_ids.append(token)
        self.generated[request.request_id] += 1
        finish: str | None = None
        stop_reason: str | None = None
        if token == self.eos_token_id and not params.ignore_eos:
            finish = "stop"
        text = self._tokenizer.decode(
            request.out_ids, skip_special_tokens=params.skip_special_tokens
        )
        assert isinstance(params.stop, list)
        if finish is None and params.stop:
            hits = [(text.find(s), s) for s in params.stop if s in text]
            if hits:
                at, stop = min(hits)
                finish, stop_reason = "stop", stop
                text = text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
        assert params.max_tokens is not None
        if finish is None and len(request.out_ids) >= params.max_tokens:
            finish = "length"
        if finish is None and len(request.prompt_ids) + len(request.out_ids) >= self.max_model_len:
            finish = "length"
        finished = finish is not None
        upto = len(text) if finished else max(len(text) - params.output_text_buffer_length, 0)
        if not finished:
            while upto > request.released and text[upto - 1] == "\ufffd":  # incomplete character
                upto -= 1
        upto = max(upto, request.released)
        delta = text[request.released : upto]
        request.released = upto
        if finished:
            del self._running[request.request_id]
        kind = params.output_kind
        if kind is RequestOutputKind.DELTA:
            output = self._output(request, delta, [token], finish, stop_reason, finished)
        elif kind is RequestOutputKind.CUMULATIVE or finished:
            output = self._output(
                request, text[:upto], list(request.out_ids), finish, stop_reason, finished
            )
        else:
            return  # FINAL_ONLY: nothing until the end
        request.collector.put(output)

    @staticmethod
    def _output(
        request: _Request,
        text: str,
        token_ids: list[int],
        finish: str | None,
        stop_reason: str | None,
        finished: bool,
    ) -> RequestOutput:
        completion = CompletionOutput(0, text, token_ids, None, None, finish, stop_reason)
        return RequestOutput(
            request_id=request.request_id,
            prompt=None,
            prompt_token_ids=list(request.prompt_ids),
            prompt_logprobs=None,
            outputs=[completion],
            finished=finished,
            num_cached_tokens=0,
        )


# ---- installing it under vLLM's names -------------------------------------------------------------


def install(monkeypatch: pytest.MonkeyPatch, settings: EngineSettings | None = None) -> Harness:
    """Makes `import vllm...` load this double until the test ends; returns what it records."""
    harness = Harness(settings or EngineSettings())
    modules: dict[str, dict[str, Any]] = {
        "vllm": {
            "SamplingParams": SamplingParams,
            "RequestOutput": RequestOutput,
            "CompletionOutput": CompletionOutput,
            "AsyncEngineArgs": AsyncEngineArgs,
        },
        "vllm.engine": {},
        "vllm.engine.arg_utils": {"AsyncEngineArgs": AsyncEngineArgs},
        "vllm.v1": {},
        "vllm.v1.engine": {},
        "vllm.v1.engine.async_llm": {"AsyncLLM": AsyncLLM},
        "vllm.v1.engine.exceptions": {
            "EngineDeadError": EngineDeadError,
            "EngineGenerateError": EngineGenerateError,
        },
        "vllm.sampling_params": {
            "SamplingParams": SamplingParams,
            "RequestOutputKind": RequestOutputKind,
            "SamplingType": SamplingType,
        },
        "vllm.outputs": {"RequestOutput": RequestOutput, "CompletionOutput": CompletionOutput},
        "vllm.exceptions": {"VLLMValidationError": VLLMValidationError},
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        module.__path__ = []  # a package, so its submodules resolve from sys.modules
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(sys.modules[__name__], "_harness", harness)
    return harness
