"""Errors a user can cause. The CLI prints them as one line, never a traceback."""


class VggOnnxError(Exception):
    """Processing failed on input the user gave (a corrupt file, a mismatched checkpoint...). Exit 1."""

    exit_code = 1


class UsageError(VggOnnxError):
    """The command was called wrongly (bad option value, unwritable output...). Exit 2."""

    exit_code = 2
