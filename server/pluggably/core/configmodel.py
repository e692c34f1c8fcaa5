"""The base of every config section model (root config and each backend kind's section)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown fields are errors (a typo must not be silently ignored); values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
