"""Model and parameter resources to their wire form."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format, struct_pb2

from pluggably.core.errors import FieldViolation
from pluggably.core.params import ParameterSpec, ParamType
from pluggably.core.types import (
    CircuitState,
    Modality,
    ModelFormat,
    ModelInfo,
    ModelSource,
    ModelState,
)
from pluggably.v1 import model_pb2

if TYPE_CHECKING:
    from pluggably.catalog.downloads import DownloadJob

_MODALITY_TO_PB = {
    Modality.TEXT: model_pb2.MODALITY_TEXT,
    Modality.IMAGE: model_pb2.MODALITY_IMAGE,
    Modality.MESH: model_pb2.MODALITY_MESH,
}
MODALITY_FROM_PB = {v: k for k, v in _MODALITY_TO_PB.items()}
# Longer than any real `provider/model` id (Hugging Face caps repo ids at 96 characters); the
# bound keeps ids that end up quoted in errors, logs and metric labels small.
MAX_MODEL_ID_CHARS = 256
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_STATE_TO_PB = {
    ModelState.AVAILABLE: model_pb2.MODEL_STATE_AVAILABLE,
    ModelState.DOWNLOADING: model_pb2.MODEL_STATE_DOWNLOADING,
    ModelState.NOT_DOWNLOADED: model_pb2.MODEL_STATE_NOT_DOWNLOADED,
    ModelState.ERROR: model_pb2.MODEL_STATE_ERROR,
    ModelState.UNAVAILABLE: model_pb2.MODEL_STATE_UNAVAILABLE,
    ModelState.DELETING: model_pb2.MODEL_STATE_DELETING,
    ModelState.UNSERVABLE: model_pb2.MODEL_STATE_UNSERVABLE,
}
STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}
_FORMAT_TO_PB = {
    None: model_pb2.MODEL_FORMAT_UNSPECIFIED,
    ModelFormat.TRANSFORMERS: model_pb2.MODEL_FORMAT_TRANSFORMERS,
    ModelFormat.DIFFUSERS: model_pb2.MODEL_FORMAT_DIFFUSERS,
    ModelFormat.GGUF: model_pb2.MODEL_FORMAT_GGUF,
    ModelFormat.SAFETENSORS: model_pb2.MODEL_FORMAT_SAFETENSORS,
}
_SOURCE_TO_PB = {
    ModelSource.CONFIG: model_pb2.MODEL_SOURCE_CONFIG,
    ModelSource.DOWNLOAD: model_pb2.MODEL_SOURCE_DOWNLOAD,
    ModelSource.DISCOVERY: model_pb2.MODEL_SOURCE_DISCOVERY,
}
_CIRCUIT_TO_PB = {
    None: model_pb2.CIRCUIT_STATE_UNSPECIFIED,
    CircuitState.CLOSED: model_pb2.CIRCUIT_STATE_CLOSED,
    CircuitState.OPEN: model_pb2.CIRCUIT_STATE_OPEN,
    CircuitState.HALF_OPEN: model_pb2.CIRCUIT_STATE_HALF_OPEN,
}
_PARAM_TYPE_TO_PB = {
    ParamType.INTEGER: model_pb2.PARAMETER_TYPE_INTEGER,
    ParamType.NUMBER: model_pb2.PARAMETER_TYPE_NUMBER,
    ParamType.STRING: model_pb2.PARAMETER_TYPE_STRING,
    ParamType.BOOLEAN: model_pb2.PARAMETER_TYPE_BOOLEAN,
    ParamType.STRING_LIST: model_pb2.PARAMETER_TYPE_STRING_LIST,
}


def check_model_id(value: str, field: str, violations: list[FieldViolation]) -> None:
    """Records why `value` cannot name a model, without quoting it: it may be anything."""
    if not value.strip():
        violations.append(
            FieldViolation(field, "required: a model id such as 'local/tiny-random-llama'")
        )
    elif len(value) > MAX_MODEL_ID_CHARS:
        violations.append(
            FieldViolation(field, f"at most {MAX_MODEL_ID_CHARS} characters, got {len(value)}")
        )
    elif not value.isprintable():
        violations.append(
            FieldViolation(
                field,
                "must be printable: no control, format, unassigned or separator characters "
                "other than space",
            )
        )


def _count(value: int, limit: int = _INT32_MAX) -> int:
    """A non-negative count clamped into its wire field: model listings come from providers'
    APIs, and one odd number there must not fail every ListModels call."""
    return min(max(int(value or 0), 0), limit)


def model_to_pb(info: ModelInfo) -> model_pb2.Model:
    caps = info.capabilities
    model = model_pb2.Model(
        id=info.id,
        provider=info.provider,
        name=info.name,
        description=info.description,
        modality=_MODALITY_TO_PB[info.modality],
        state=_STATE_TO_PB[info.state],
        aliases=list(info.aliases),
        context_length=_count(info.context_length),
        size_bytes=_count(info.size_bytes, _INT64_MAX),
        loaded=info.loaded,
        capabilities=model_pb2.ModelCapabilities(
            streaming=caps.streaming,
            tools=caps.tools,
            image_input=caps.vision,
            json_object=caps.json_object,
            json_schema=caps.json_schema,
            max_output_tokens=_count(caps.max_output_tokens),
        ),
        state_reason=info.state_reason,
        circuit_state=_CIRCUIT_TO_PB[info.circuit],
    )
    local = info.local
    if local is not None:
        model.format = _FORMAT_TO_PB[local.format]
        model.source = _SOURCE_TO_PB[local.source]
        model.source_repo = local.source_repo
        model.source_revision = local.source_revision
        model.resolved_revision = local.resolved_revision
        model.local_path = local.path
        model.pinned = local.pinned
        if local.created_at is not None:
            model.create_time.FromNanoseconds(int(local.created_at * 1e9))
        if local.last_used_at is not None:
            model.last_use_time.FromNanoseconds(int(local.last_used_at * 1e9))
    return model


_DOWNLOAD_STATE_TO_PB = {
    "queued": model_pb2.DOWNLOAD_STATE_QUEUED,
    "running": model_pb2.DOWNLOAD_STATE_RUNNING,
    "succeeded": model_pb2.DOWNLOAD_STATE_SUCCEEDED,
    "failed": model_pb2.DOWNLOAD_STATE_FAILED,
    "cancelled": model_pb2.DOWNLOAD_STATE_CANCELLED,
}
DOWNLOAD_STATE_FROM_PB = {v: k for k, v in _DOWNLOAD_STATE_TO_PB.items()}


def download_to_pb(job: DownloadJob, provider: str = "local") -> model_pb2.Download:
    out = model_pb2.Download(
        id=job.id,
        model=f"{provider}/{job.name}",
        repo_id=job.repo_id,
        revision=job.revision,
        requested_revision=job.requested_revision,
        state=_DOWNLOAD_STATE_TO_PB[job.state],
        downloaded_bytes=job.downloaded_bytes,
        total_bytes=job.total_bytes,
        downloaded_files=job.downloaded_files,
        total_files=job.total_files,
        bytes_per_second=job.bytes_per_second,
        allow_patterns=job.allow_patterns,
        ignore_patterns=job.ignore_patterns,
    )
    out.create_time.FromNanoseconds(int(job.created_at * 1e9))
    out.update_time.FromNanoseconds(int(job.updated_at * 1e9))
    if job.eta_s is not None and math.isfinite(job.eta_s):
        out.eta.FromNanoseconds(int(job.eta_s * 1e9))
    if job.error is not None:
        from pluggably.api.status import to_status

        out.error.CopyFrom(to_status(job.error, ""))
    return out


def parameter_to_pb(spec: ParameterSpec) -> model_pb2.ParameterSpec:
    out = model_pb2.ParameterSpec(
        name=spec.name,
        type=_PARAM_TYPE_TO_PB[spec.type],
        description=spec.description,
        supported=spec.supported,
        exclusive_minimum=spec.exclusive_minimum,
    )
    default = _finite_json(spec.default)
    if default is None:
        out.default_value.null_value = struct_pb2.NULL_VALUE
    else:
        json_format.ParseDict(default, out.default_value)
    if spec.minimum is not None:
        out.minimum = spec.minimum
    if spec.maximum is not None:
        out.maximum = spec.maximum
    return out


def _finite_json(value: Any) -> Any:
    """`value` with non-finite numbers as null: a default from a model's config may be NaN or
    infinite, which `google.protobuf.Value` cannot carry to JSON clients."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_finite_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    return value
