"""Errors a user can cause. The CLI prints them as one line, never a traceback."""

from __future__ import annotations

__all__ = ["ImageError", "OutputWriteError", "UsageError", "VggOnnxError"]


class VggOnnxError(Exception):
    """Processing failed on input the user gave (a corrupt file, a mismatched checkpoint...). Exit 1."""

    exit_code = 1


class UsageError(VggOnnxError):
    """The command was called wrongly (bad option value, unwritable output...). Exit 2."""

    exit_code = 2


class ImageError(VggOnnxError):
    """An image that cannot be used; the message names the problem, the caller adds the path."""


class OutputWriteError(VggOnnxError, OSError):
    """Writing an output failed (a full disk...): one line naming the output. It is an OSError too,
    with the errno of the failure, so code that handles those (ENOSPC...) keeps working."""

    def __init__(self, path: str, error: OSError):
        OSError.__init__(self, error.errno, error.strerror, path)
        self.message = f"{path}: cannot write: {error.strerror or error}"

    def __str__(self) -> str:
        return self.message
