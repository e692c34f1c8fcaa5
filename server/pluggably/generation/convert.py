"""`from_pb`/`to_pb` converters between the wire contract and the domain types.

Request validation that needs no backend (shape, ranges) happens here, so every violation of a
request is reported at once, each naming its field.
"""

from __future__ import annotations

from google.protobuf import json_format

from pluggably.core.errors import FieldViolation, InvalidArgument
from pluggably.core.params import validate_text_params
from pluggably.core.types import (
    CHAT_ROLES,
    ChatMessage,
    DoneChunk,
    FinishReason,
    GenerationRequest,
    Modality,
    ProgressChunk,
    TextChunk,
    TextParams,
    Usage,
)
from pluggably.v1 import (
    generate_service_pb2,
    generation_pb2,
    stream_service_pb2,
)

MAX_FALLBACKS = 8

_FINISH_TO_PB = {
    FinishReason.STOP: generation_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: generation_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: generation_pb2.FINISH_REASON_CANCELLED,
    FinishReason.CONTENT_FILTER: generation_pb2.FINISH_REASON_CONTENT_FILTER,
}
_OPTIONS_MODALITY = {"text": Modality.TEXT, "image": Modality.IMAGE, "mesh": Modality.MESH}


def generation_request_from_pb(
    pb: generation_pb2.GenerateRequest, request_id: str
) -> tuple[GenerationRequest, Modality | None]:
    """Validates and converts; returns the request and the modality its options ask for."""
    violations: list[FieldViolation] = []
    if not pb.model.strip():
        violations.append(FieldViolation("model", "required: a model id such as 'local/tiny-random-llama'"))
    if len(pb.fallback_models) > MAX_FALLBACKS:
        violations.append(FieldViolation("fallback_models", f"at most {MAX_FALLBACKS} models, got {len(pb.fallback_models)}"))
    for i, fallback in enumerate(pb.fallback_models):
        if not fallback.strip():
            violations.append(FieldViolation(f"fallback_models[{i}]", "must not be empty"))

    has_prompt = bool(pb.prompt)
    if pb.messages and has_prompt:
        violations.append(FieldViolation("prompt", "set either messages or prompt, not both"))
    elif not pb.messages and not has_prompt:
        violations.append(FieldViolation("messages", "required: set messages (chat) or prompt"))
    messages = []
    for i, m in enumerate(pb.messages):
        if m.role not in CHAT_ROLES:
            violations.append(FieldViolation(
                f"messages[{i}].role", f"unknown role {m.role!r}; use one of {', '.join(sorted(CHAT_ROLES))}"))
        if not m.content and m.role != "assistant":
            violations.append(FieldViolation(f"messages[{i}].content", "must not be empty"))
        messages.append(ChatMessage(role=m.role, content=m.content, name=m.name))

    option_group = pb.WhichOneof("options")
    modality = _OPTIONS_MODALITY.get(option_group) if option_group else None
    text = TextParams()
    if option_group == "text":
        t = pb.text
        text = TextParams(
            max_tokens=t.max_tokens if t.HasField("max_tokens") else None,
            temperature=t.temperature if t.HasField("temperature") else None,
            top_p=t.top_p if t.HasField("top_p") else None,
            top_k=t.top_k if t.HasField("top_k") else None,
            seed=t.seed if t.HasField("seed") else None,
            stop=tuple(t.stop),
            repetition_penalty=t.repetition_penalty if t.HasField("repetition_penalty") else None,
            presence_penalty=t.presence_penalty if t.HasField("presence_penalty") else None,
            frequency_penalty=t.frequency_penalty if t.HasField("frequency_penalty") else None,
        )
        violations.extend(validate_text_params(text))
    if violations:
        raise InvalidArgument(violations)

    return (
        GenerationRequest(
            request_id=request_id,
            model=pb.model,
            messages=tuple(messages),
            prompt=pb.prompt if has_prompt else None,
            text=text,
            provider_options={k: json_format.MessageToDict(v) for k, v in pb.provider_options.items()},
        ),
        modality,
    )


def usage_to_pb(usage: Usage) -> generation_pb2.Usage:
    return generation_pb2.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        steps=usage.steps,
    )


def _copy_done(
    chunk: DoneChunk, target: generation_pb2.StreamDone | generate_service_pb2.GenerateResponse
) -> None:
    """StreamDone and GenerateResponse name the end-of-generation fields alike."""
    target.finish_reason = _FINISH_TO_PB[chunk.finish_reason]
    target.usage.CopyFrom(usage_to_pb(chunk.usage))
    target.stop_sequence = chunk.stop_sequence


def stream_chunk_to_pb(request_id: str, model: str, chunk: object) -> stream_service_pb2.StreamGenerateResponse:
    out = stream_service_pb2.StreamGenerateResponse(id=request_id, model=model)
    if isinstance(chunk, TextChunk):
        out.text_delta.text = chunk.text
        out.text_delta.token_ids.extend(chunk.token_ids)
    elif isinstance(chunk, ProgressChunk):
        out.progress.stage = chunk.stage
        out.progress.step = chunk.step
        out.progress.total_steps = chunk.total_steps
    elif isinstance(chunk, DoneChunk):
        _copy_done(chunk, out.done)
    else:
        raise TypeError(f"unknown chunk type {type(chunk).__name__}")
    return out


class ResponseAccumulator:
    """Folds a chunk stream into one `GenerateResponse`."""

    def __init__(self, request_id: str) -> None:
        self.response = generate_service_pb2.GenerateResponse(id=request_id)
        self._text: list[str] = []

    def add(self, model: str, chunk: object) -> None:
        self.response.model = model
        if isinstance(chunk, TextChunk):
            self._text.append(chunk.text)
            self.response.token_ids.extend(chunk.token_ids)
        elif isinstance(chunk, DoneChunk):
            _copy_done(chunk, self.response)

    def result(self) -> generate_service_pb2.GenerateResponse:
        self.response.text = "".join(self._text)
        return self.response
