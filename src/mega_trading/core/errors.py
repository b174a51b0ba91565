"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""

from __future__ import annotations


class MegaTradingError(Exception):
    """An error caused by the user's input (a file, a flag, a config), not by a bug."""

    exit_code = 2


class DataError(MegaTradingError):
    """Bad input data: a malformed row, a truncated zip, a checksum mismatch, ..."""

    def __init__(self, message: str, path: object | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f":{line}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ConfigError(MegaTradingError):
    """An unknown key, a wrong type or an impossible value in a config."""


class ArtifactMismatchError(MegaTradingError):
    """An artifact made with another tokenizer / data manifest than the one given."""
