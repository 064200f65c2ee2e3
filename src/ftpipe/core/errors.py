"""Domain errors: each says what was expected, where, and which command to run next.

The CLI's single handler (`ftpipe.cli.main.main`) turns them into one red line and an exit code:
`ConfigError`/`InputError` exit 2, `StageError` exits 1. `FTPIPE_DEBUG=1` shows the traceback.
"""

from __future__ import annotations


class FtpipeError(Exception):
    """Base class of every error the CLI reports as one line.

    Args:
        message: what is wrong, naming the file / key / line where it applies.
        hint: the next command to run (or setting to change), shown after the message.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and hint joined into the single line the CLI prints."""
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (next: {' '.join(self.hint.split())})"
        return text


class ConfigError(FtpipeError):
    """A config file, override or flag is invalid (exit 2)."""

    exit_code = 2


class InputError(FtpipeError):
    """An input (dataset, model folder, upstream artifact, run name) is missing or malformed (exit 2)."""

    exit_code = 2


class StageError(FtpipeError):
    """A stage started and failed (exit 1); its manifest is marked `failed`."""

    exit_code = 1
