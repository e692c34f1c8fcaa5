"""Local stand-ins for hosted providers' HTTP APIs (tests and bench), one module per wire format:
`openai` (Chat Completions and models), `anthropic` (Messages and models), `gemini`
(generateContent, streamGenerateContent, models)."""

from pluggably.devtools.standins._base import Fault, RecordedRequest, Reply, StandIn, ToolCallSpec

__all__ = ["Fault", "RecordedRequest", "Reply", "StandIn", "ToolCallSpec"]
