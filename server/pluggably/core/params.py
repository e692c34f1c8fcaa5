"""Request parameters: one table drives validation and `ModelService.GetModelParameters`.

A range written here is enforced for every backend; a backend narrows it per model only by
declaring which parameters it supports (an unsupported parameter that is set is rejected, never
silently ignored).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pluggably.core.errors import FieldViolation
from pluggably.core.types import ImageParams, MeshParams, Modality, TextParams


class ParamType(enum.Enum):
    INTEGER = "integer"
    NUMBER = "number"
    STRING = "string"
    BOOLEAN = "boolean"
    STRING_LIST = "string_list"


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    type: ParamType
    description: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    supported: bool = True


MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256

TEXT_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec(
        "text.max_tokens",
        ParamType.INTEGER,
        "Largest number of tokens to generate; with the prompt it must fit the context length.",
        minimum=1,
    ),
    ParameterSpec(
        "text.temperature",
        ParamType.NUMBER,
        "Sampling temperature; 0 means greedy decoding.",
        default=1.0,
        minimum=0,
        maximum=2,
    ),
    ParameterSpec(
        "text.top_p",
        ParamType.NUMBER,
        "Nucleus sampling probability mass.",
        default=1.0,
        minimum=0,
        maximum=1,
        exclusive_minimum=True,
    ),
    ParameterSpec(
        "text.top_k", ParamType.INTEGER, "Sample only from the k most likely tokens.", minimum=1
    ),
    ParameterSpec("text.seed", ParamType.INTEGER, "Seed for reproducible sampling."),
    ParameterSpec(
        "text.stop",
        ParamType.STRING_LIST,
        f"Up to {MAX_STOP_SEQUENCES} sequences (1 to {MAX_STOP_LENGTH} characters) that end "
        "the generation; not part of the returned text.",
        default=[],
    ),
    ParameterSpec(
        "text.repetition_penalty",
        ParamType.NUMBER,
        "Multiplicative penalty on tokens already in the prompt or output (1 = none).",
        default=1.0,
        minimum=0.01,
        maximum=10,
    ),
    ParameterSpec(
        "text.presence_penalty",
        ParamType.NUMBER,
        "Additive penalty on tokens already in the output.",
        default=0.0,
        minimum=-2,
        maximum=2,
    ),
    ParameterSpec(
        "text.frequency_penalty",
        ParamType.NUMBER,
        "Additive penalty proportional to a token's count in the output.",
        default=0.0,
        minimum=-2,
        maximum=2,
    ),
)

MAX_NEGATIVE_PROMPT_CHARS = 10_000
# Image sides are multiples of this (the latent grid of diffusion models; providers accept it).
IMAGE_SIDE_MULTIPLE = 8

IMAGE_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec(
        "image.width",
        ParamType.INTEGER,
        f"Image width in pixels, a multiple of {IMAGE_SIDE_MULTIPLE}.",
        minimum=64,
        maximum=4096,
    ),
    ParameterSpec(
        "image.height",
        ParamType.INTEGER,
        f"Image height in pixels, a multiple of {IMAGE_SIDE_MULTIPLE}.",
        minimum=64,
        maximum=4096,
    ),
    ParameterSpec("image.steps", ParamType.INTEGER, "Denoising steps.", minimum=1, maximum=500),
    ParameterSpec(
        "image.guidance_scale",
        ParamType.NUMBER,
        "Classifier-free guidance scale.",
        minimum=0,
        maximum=50,
    ),
    ParameterSpec(
        "image.negative_prompt",
        ParamType.STRING,
        f"What the image should not show (at most {MAX_NEGATIVE_PROMPT_CHARS} characters).",
        default="",
    ),
    ParameterSpec("image.seed", ParamType.INTEGER, "Seed for the initial noise."),
    ParameterSpec(
        "image.count", ParamType.INTEGER, "Number of images.", default=1, minimum=1, maximum=8
    ),
    ParameterSpec(
        "image.format", ParamType.STRING, "File format: png, jpeg or webp.", default="png"
    ),
)

MESH_PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("mesh.steps", ParamType.INTEGER, "Denoising steps.", minimum=1, maximum=500),
    ParameterSpec(
        "mesh.guidance_scale",
        ParamType.NUMBER,
        "Classifier-free guidance scale.",
        minimum=0,
        maximum=50,
    ),
    ParameterSpec("mesh.seed", ParamType.INTEGER, "Seed for the initial noise."),
    ParameterSpec(
        "mesh.grid_size",
        ParamType.INTEGER,
        "Resolution of the grid the mesh is extracted from.",
        default=128,
        minimum=16,
        maximum=256,
    ),
    ParameterSpec("mesh.format", ParamType.STRING, "File format: glb, obj or ply.", default="glb"),
)

_BY_MODALITY: dict[Modality, tuple[ParameterSpec, ...]] = {
    Modality.TEXT: TEXT_PARAMETERS,
    Modality.IMAGE: IMAGE_PARAMETERS,
    Modality.MESH: MESH_PARAMETERS,
}
_TEXT_SHORT_NAMES = tuple((spec, spec.name.split(".", 1)[1]) for spec in TEXT_PARAMETERS)


def parameters_for(
    modality: Modality,
    supported: Iterable[str] | None,
    ranges: dict[str, tuple[float | None, float | None]] | None = None,
    **defaults: Any,
) -> list[ParameterSpec]:
    """The specs of `modality`; `supported` lists short names (e.g. `top_k`), None means all.

    `ranges` narrows the shared (minimum, maximum) of a parameter for one model (None keeps that
    bound), e.g. `{"temperature": (None, 1)}`; `defaults` overrides documented defaults by short
    name (e.g. a model's own `max_tokens`).
    """
    allowed = None if supported is None else set(supported)
    specs = []
    for spec in _BY_MODALITY.get(modality, ()):
        short = spec.name.split(".", 1)[1]
        low, high = (ranges or {}).get(short, (None, None))
        spec = dataclasses.replace(
            spec,
            supported=allowed is None or short in allowed,
            default=defaults.get(short, spec.default),
            minimum=spec.minimum if low is None else low,
            maximum=spec.maximum if high is None else high,
        )
        specs.append(spec)
    return specs


def validate_text_params(params: TextParams, prefix: str = "text") -> list[FieldViolation]:
    """Range checks that hold for every backend."""
    violations: list[FieldViolation] = []
    for spec, short in _TEXT_SHORT_NAMES:
        value = getattr(params, short)
        if value is None or value == ():
            continue
        field = f"{prefix}.{short}"
        if spec.type is ParamType.STRING_LIST:
            if len(value) > MAX_STOP_SEQUENCES:
                violations.append(
                    FieldViolation(
                        field, f"at most {MAX_STOP_SEQUENCES} sequences, got {len(value)}"
                    )
                )
            for i, item in enumerate(value):
                if not 1 <= len(item) <= MAX_STOP_LENGTH:
                    violations.append(
                        FieldViolation(
                            f"{field}[{i}]", f"must be 1 to {MAX_STOP_LENGTH} characters long"
                        )
                    )
            continue
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            violations.append(FieldViolation(field, "must be a finite number"))
            continue
        problem = _out_of_range(spec, value)
        if problem:
            violations.append(FieldViolation(field, problem))
    return violations


def validate_image_params(params: ImageParams, prefix: str = "image") -> list[FieldViolation]:
    """Range checks that hold for every image backend."""
    violations: list[FieldViolation] = []
    for spec in IMAGE_PARAMETERS:
        short = spec.name.split(".", 1)[1]
        value = getattr(params, short)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        field = f"{prefix}.{short}"
        if isinstance(value, float) and not math.isfinite(value):
            violations.append(FieldViolation(field, "must be a finite number"))
            continue
        problem = _out_of_range(spec, value)
        if problem:
            violations.append(FieldViolation(field, problem))
        elif short in ("width", "height") and value % IMAGE_SIDE_MULTIPLE:
            violations.append(
                FieldViolation(field, f"must be a multiple of {IMAGE_SIDE_MULTIPLE}, got {value}")
            )
    if len(params.negative_prompt) > MAX_NEGATIVE_PROMPT_CHARS:
        violations.append(
            FieldViolation(
                f"{prefix}.negative_prompt", f"at most {MAX_NEGATIVE_PROMPT_CHARS} characters"
            )
        )
    return violations


def validate_mesh_params(params: MeshParams, prefix: str = "mesh") -> list[FieldViolation]:
    """Range checks that hold for every 3D backend."""
    violations: list[FieldViolation] = []
    for spec in MESH_PARAMETERS:
        short = spec.name.split(".", 1)[1]
        value = getattr(params, short)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        field = f"{prefix}.{short}"
        if isinstance(value, float) and not math.isfinite(value):
            violations.append(FieldViolation(field, "must be a finite number"))
            continue
        problem = _out_of_range(spec, value)
        if problem:
            violations.append(FieldViolation(field, problem))
    return violations


def _out_of_range(spec: ParameterSpec, value: float) -> str | None:
    low, high = spec.minimum, spec.maximum
    too_low = low is not None and (value <= low if spec.exclusive_minimum else value < low)
    too_high = high is not None and value > high
    if not (too_low or too_high):
        return None
    if low is not None and high is not None:
        bracket = "(" if spec.exclusive_minimum else "["
        return f"must be in {bracket}{_fmt(low)}, {_fmt(high)}], got {_fmt(value)}"
    if low is not None:
        op = ">" if spec.exclusive_minimum else ">="
        return f"must be {op} {_fmt(low)}, got {_fmt(value)}"
    return f"must be <= {_fmt(high)}, got {_fmt(value)}"  # type: ignore[arg-type]


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# JSON types of `provider_options` values as they arrive (google.protobuf.Value): numbers are
# always floats, so integer options are checked with `_is_integer`.
_JSON_TYPE_NAMES = {
    bool: "a boolean",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


@dataclass(frozen=True)
class ProviderOptionsPolicy:
    """Which `provider_options` keys a model accepts.

    `allowed` maps each accepted key to the JSON type of its value (None: any key that is not
    `reserved` is passed through unchecked, for providers whose APIs take many parameters).
    `reserved` keys are what the typed request fields already set: passing them through would
    let a client override validated values, so they are always rejected.
    """

    allowed: dict[str, type] | None = dataclasses.field(default_factory=dict)
    reserved: frozenset[str] = frozenset()

    def check(self, options: dict[str, Any], model_id: str) -> list[FieldViolation]:
        violations = []
        for key in sorted(options):
            field = f"provider_options.{key}"
            if key in self.reserved:
                violations.append(
                    FieldViolation(
                        field,
                        f"set by a typed field of the request; {model_id!r} does not take it here",
                    )
                )
            elif self.allowed is None:
                continue
            elif key not in self.allowed:
                accepted = ", ".join(sorted(self.allowed)) or "none"
                violations.append(
                    FieldViolation(
                        field, f"not supported by model {model_id!r} (accepted keys: {accepted})"
                    )
                )
            else:
                expected = self.allowed[key]
                value = options[key]
                if expected is int:
                    ok = (
                        isinstance(value, float | int)
                        and not isinstance(value, bool)
                        and float(value).is_integer()
                    )
                    what = "an integer"
                else:
                    ok = isinstance(value, expected) and not (
                        expected is float and isinstance(value, bool)
                    )
                    what = _JSON_TYPE_NAMES.get(expected, expected.__name__)
                if not ok:
                    violations.append(FieldViolation(field, f"must be {what}"))
        return violations


NO_PROVIDER_OPTIONS = ProviderOptionsPolicy()


def check_against_specs(
    params: TextParams | ImageParams | MeshParams,
    specs: Iterable[ParameterSpec],
    model_id: str,
    prefix: str = "text",
) -> list[FieldViolation]:
    """Rejects parameters a model does not honour, and values outside the model's own ranges
    (which may be narrower than the ranges every backend shares)."""
    violations = []
    for spec in specs:
        section, _, short = spec.name.partition(".")
        if section != prefix or not hasattr(params, short):
            continue
        value = getattr(params, short)
        if value is None or value == () or value == "":
            continue
        field = spec.name
        if not spec.supported:
            violations.append(FieldViolation(field, f"not supported by model {model_id!r}"))
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            problem = _out_of_range(spec, value)
            if problem:
                violations.append(
                    FieldViolation(field, f"{problem} (the range of model {model_id!r})")
                )
    return violations
