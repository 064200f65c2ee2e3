"""Base classes for config sections and for the typed files one process hands another.

Each stage owns its section model in its own package (`ftpipe/<pkg>/config.py`); the root model
that nests them lives in `ftpipe/config.py`. Section modules import only pydantic.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError


class Section(BaseModel):
    """A config section: `extra="forbid"` so a misspelt key fails loudly, naming the key."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class HandOffFile(BaseModel):
    """A typed JSON file one process writes for another (a training job, an eval spec): the config
    stays typed across the hop and is validated again, strictly, where it is read."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    what: ClassVar[str] = "hand-off file"  # how messages name the file
    writer: ClassVar[str] = "ftpipe"  # the command that writes it (the hint of a bad file)

    def write(self, path: Path) -> None:
        """Write the file as JSON, atomically."""
        from ftpipe.core.fsutil import atomic_write_json

        atomic_write_json(path, self.model_dump(mode="json"))

    @classmethod
    def read(cls, path: Path):
        """Read and validate the file.

        Raises:
            InputError: unreadable file, or invalid JSON / keys / types (all listed in one line).
        """
        from ftpipe.core.errors import InputError

        hint = f"{cls.writer} writes this file: rerun it rather than editing the file"
        try:
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise InputError(f"{cls.what} {path}: cannot read ({type(exc).__name__}: {exc.strerror})", hint=hint) from None
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
            raise InputError(f"{cls.what} {path}: invalid: {problems}", hint=hint) from None
