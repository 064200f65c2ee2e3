"""Base class for config sections: unknown keys are errors, assignments are validated.

Each stage owns its section model in its own package (`ftpipe/<pkg>/config.py`); the root model
that nests them lives in `ftpipe/core/config.py`. Section modules import only pydantic.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: `extra="forbid"` so a misspelt key fails loudly, naming the key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
