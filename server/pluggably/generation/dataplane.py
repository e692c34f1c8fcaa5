"""Between the servicers and the router: checks a request against every model that may serve it,
once, for every backend alike, then runs it.

What the servicers' converters check holds for any model (shapes, shared ranges). What is checked
here depends on the model: the parameters it honours and their ranges, the `provider_options`
it takes, and its capabilities (tools, image input, JSON output, output limit). A request that
needs something a model lacks is rejected before any backend runs, naming the field, never
silently trimmed. The same checks apply to fallback models, since any of them may end up serving.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

from pluggably.core.context import current_principal
from pluggably.core.errors import FieldViolation, InvalidArgument, PermissionDenied
from pluggably.core.params import check_against_specs
from pluggably.core.types import (
    Chunk,
    GenerationRequest,
    ImagePart,
    Modality,
    ResponseFormatType,
    TextPart,
)
from pluggably.generation.router import Route, Router

if TYPE_CHECKING:
    from pluggably.config import LimitsConfig


class Dataplane:
    def __init__(self, router: Router, limits: LimitsConfig | None = None) -> None:
        self.router = router
        self._max_prompt_chars = limits.max_prompt_chars if limits is not None else None
        self._max_tokens = {
            model: section.max_tokens
            for model, section in (limits.models if limits is not None else {}).items()
            if section.max_tokens is not None
        }

    async def generate(
        self,
        request: GenerationRequest,
        model: str,
        fallbacks: Sequence[str] = (),
        modality: Modality | None = None,
    ) -> AsyncGenerator[tuple[str, Chunk], None]:
        """Checks the request against every route, then returns the stream of (serving model
        id, chunk). Returned rather than re-yielded: every stream chunk passes each generator
        layer, and this one would only relay."""
        # Cheap before anything model-specific: a prompt no model should take is refused
        # before any route is resolved, tokenized or sent anywhere.
        if self._max_prompt_chars is not None:
            _check_prompt_size(request, self._max_prompt_chars)
        routes = await self.router.routes(model, fallbacks)
        principal = current_principal()
        if principal is not None and principal.models is not None:
            refused = [r.model.id for r in routes if not principal.may_use(r.model.id)]
            if refused:
                raise PermissionDenied(
                    f"API key {principal.key_id} may not use model(s) {', '.join(refused)}",
                    reason="MODEL_NOT_ALLOWED",
                    metadata={"key_id": principal.key_id, "model": refused[0]},
                )
        violations: list[FieldViolation] = []
        for route in routes:
            violations.extend(check_request(request, route, modality))
        cap = self._output_cap(model, routes)
        if cap is not None:
            asked = request.text.max_tokens
            if asked is None:
                request = dataclasses.replace(
                    request, text=dataclasses.replace(request.text, max_tokens=cap)
                )
            elif asked > cap:
                violations.append(
                    FieldViolation(
                        "text.max_tokens",
                        f"this gateway allows at most {cap} output tokens for model "
                        f"{model!r} (limits.models), got {asked}",
                    )
                )
        if violations:
            raise InvalidArgument(_unique(violations))
        return self.router.stream(routes, request)

    def _output_cap(self, requested: str, routes: Sequence[Route]) -> int | None:
        """The smallest `limits.models.*.max_tokens` among the models that may serve (by the
        requested name or alias, by each route's id, else `*`)."""
        if not self._max_tokens:
            return None
        caps = []
        for route in routes:
            name = requested if route.field == "model" else route.model.id
            cap = self._max_tokens.get(name, self._max_tokens.get(route.model.id))
            if cap is None:
                cap = self._max_tokens.get("*")
            if cap is not None:
                caps.append(cap)
        return min(caps) if caps else None


def _check_prompt_size(request: GenerationRequest, limit: int) -> None:
    total = len(request.prompt or "")
    for message in request.messages:
        total += len(message.content)
        for part in message.parts:
            if isinstance(part, TextPart):
                total += len(part.text)
        if total > limit:
            break
    if total > limit:
        field = "prompt" if request.prompt is not None else "messages"
        raise InvalidArgument(
            [
                FieldViolation(
                    field,
                    f"the prompt is longer than this gateway accepts ({limit} characters, "
                    "limits.max_prompt_chars)",
                )
            ],
            reason="PROMPT_TOO_LONG",
        )


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
    specs = backend.parameters(info)
    violations = check_against_specs(request.text, specs, info.id)
    violations += check_against_specs(request.image, specs, info.id, prefix="image")
    violations += check_against_specs(request.mesh, specs, info.id, prefix="mesh")
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
