"""The base of every config section (rl/config/schema.py assembles them): unknown keys are errors, assignments validated."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """Raised for any invalid config; the message names the dotted key."""


class Section(BaseModel):
    # extra="forbid" turns a typo into an error instead of a silently ignored key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
