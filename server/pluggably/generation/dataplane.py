"""Between the servicers and the router: checks a request against every model that may serve it,
once, for every backend alike, then runs it.

What the servicers' converters check holds for any model (shapes, shared ranges). What is checked
here depends on the model: the parameters it honours and their ranges, the `provider_options`
it takes, and its capabilities (tools, image input, JSON output, output limit). A request that
needs something a model lacks is rejected before any backend runs, naming the field, never
silently trimmed. The same checks apply to fallback models, since any of them may end up serving.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from pluggably.core.errors import FieldViolation, InvalidArgument
from pluggably.core.params import check_against_specs
from pluggably.core.types import (
    Chunk,
    GenerationRequest,
    ImagePart,
    Modality,
    ResponseFormatType,
)
from pluggably.generation.router import Route, Router


class Dataplane:
    def __init__(self, router: Router) -> None:
        self.router = router

    async def generate(
        self,
        request: GenerationRequest,
        model: str,
        fallbacks: Sequence[str] = (),
        modality: Modality | None = None,
    ) -> AsyncIterator[tuple[str, Chunk]]:
        """Checks the request against every route, then returns the stream of (serving model
        id, chunk). Returned rather than re-yielded: every stream chunk passes each generator
        layer, and this one would only relay."""
        routes = await self.router.routes(model, fallbacks)
        violations: list[FieldViolation] = []
        for route in routes:
            violations.extend(check_request(request, route, modality))
        if violations:
            raise InvalidArgument(_unique(violations))
        return self.router.stream(routes, request)


def check_request(
    request: GenerationRequest, route: Route, modality: Modality | None
) -> list[FieldViolation]:
    """Everything about `request` that `route`'s model cannot take."""
    info = route.model
    whose = f"model {info.id!r}" if route.field == "model" else f"fallback model {info.id!r}"
    if modality is not None and info.modality is not modality:
        return [
            FieldViolation(
                route.field,
                f"{whose} produces {info.modality.value}, but {modality.value} options were given",
            )
        ]
    backend = route.backend
    violations = check_against_specs(request.text, backend.parameters(info), info.id)
    if route.field != "model":
        violations = [
            FieldViolation(v.field, v.description.replace(f"model {info.id!r}", whose))
            for v in violations
        ]
    violations.extend(backend.provider_options(info).check(request.provider_options, info.id))

    caps = info.capabilities
    if info.modality is Modality.TEXT:
        if request.tools and not caps.tools:
            violations.append(FieldViolation("tools", f"{whose} does not support tool calling"))
        for i, message in enumerate(request.messages):
            if (message.tool_calls or message.role == "tool") and not caps.tools:
                field = f"messages[{i}].tool_calls" if message.tool_calls else f"messages[{i}].role"
                violations.append(FieldViolation(field, f"{whose} does not support tool calling"))
            if not caps.vision:
                for j, part in enumerate(message.parts):
                    if isinstance(part, ImagePart):
                        violations.append(
                            FieldViolation(
                                f"messages[{i}].parts[{j}].image",
                                f"{whose} does not take image input",
                            )
                        )
        fmt = request.text.response_format
        if fmt is not None:
            if fmt.type is ResponseFormatType.JSON_OBJECT and not (
                caps.json_object or caps.json_schema
            ):
                violations.append(
                    FieldViolation("text.response_format", f"{whose} does not support JSON output")
                )
            elif fmt.type is ResponseFormatType.JSON_SCHEMA and not caps.json_schema:
                violations.append(
                    FieldViolation(
                        "text.response_format.json_schema",
                        f"{whose} does not support JSON schema output",
                    )
                )
        limit = caps.max_output_tokens
        if limit and request.text.max_tokens is not None and request.text.max_tokens > limit:
            violations.append(
                FieldViolation(
                    "text.max_tokens",
                    f"{whose} generates at most {limit} tokens, got {request.text.max_tokens}",
                )
            )
    return violations


def _unique(violations: list[FieldViolation]) -> list[FieldViolation]:
    return list(dict.fromkeys(violations))
