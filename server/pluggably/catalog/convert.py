"""Model and parameter resources to their wire form."""

from __future__ import annotations

from google.protobuf import json_format, struct_pb2

from pluggably.core.params import ParameterSpec, ParamType
from pluggably.core.types import CircuitState, Modality, ModelInfo, ModelState
from pluggably.v1 import model_pb2

_MODALITY_TO_PB = {
    Modality.TEXT: model_pb2.MODALITY_TEXT,
    Modality.IMAGE: model_pb2.MODALITY_IMAGE,
    Modality.MESH: model_pb2.MODALITY_MESH,
}
MODALITY_FROM_PB = {v: k for k, v in _MODALITY_TO_PB.items()}
_STATE_TO_PB = {
    ModelState.AVAILABLE: model_pb2.MODEL_STATE_AVAILABLE,
    ModelState.DOWNLOADING: model_pb2.MODEL_STATE_DOWNLOADING,
    ModelState.NOT_DOWNLOADED: model_pb2.MODEL_STATE_NOT_DOWNLOADED,
    ModelState.ERROR: model_pb2.MODEL_STATE_ERROR,
    ModelState.UNAVAILABLE: model_pb2.MODEL_STATE_UNAVAILABLE,
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


def model_to_pb(info: ModelInfo) -> model_pb2.Model:
    caps = info.capabilities
    return model_pb2.Model(
        id=info.id,
        provider=info.provider,
        name=info.name,
        description=info.description,
        modality=_MODALITY_TO_PB[info.modality],
        state=_STATE_TO_PB[info.state],
        aliases=list(info.aliases),
        context_length=info.context_length,
        size_bytes=info.size_bytes,
        loaded=info.loaded,
        capabilities=model_pb2.ModelCapabilities(
            streaming=caps.streaming,
            tools=caps.tools,
            image_input=caps.vision,
            json_object=caps.json_object,
            json_schema=caps.json_schema,
            max_output_tokens=caps.max_output_tokens,
        ),
        state_reason=info.state_reason,
        circuit_state=_CIRCUIT_TO_PB[info.circuit],
    )


def parameter_to_pb(spec: ParameterSpec) -> model_pb2.ParameterSpec:
    out = model_pb2.ParameterSpec(
        name=spec.name,
        type=_PARAM_TYPE_TO_PB[spec.type],
        description=spec.description,
        supported=spec.supported,
        exclusive_minimum=spec.exclusive_minimum,
    )
    if spec.default is None:
        out.default_value.null_value = struct_pb2.NULL_VALUE
    else:
        json_format.ParseDict(spec.default, out.default_value)
    if spec.minimum is not None:
        out.minimum = spec.minimum
    if spec.maximum is not None:
        out.maximum = spec.maximum
    return out
