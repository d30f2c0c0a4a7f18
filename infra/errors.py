"""Errors that map onto the CLI's exit codes (docs/cli.md, "Exit codes").

Every failure a user can act on is one of these; the CLI turns them into a one-line
message and the matching exit code instead of a traceback.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_DATA = 65
EXIT_TRANSIENT = 75
EXIT_NOTHING_TO_DO = 99


class MimdexError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UsageError(MimdexError):
    """Bad flags, bad configuration, or a command that does not exist yet."""

    exit_code = EXIT_USAGE


class DataError(MimdexError):
    """Input data that breaks a contract: wrong schema, bad file, duplicate ids."""

    exit_code = EXIT_DATA


class TransientError(MimdexError):
    """A failure that is safe to retry as is (network, throttling, a lost race)."""

    exit_code = EXIT_TRANSIENT


class NothingToDo(MimdexError):
    """The job found no work (a nightly refresh with no changes)."""

    exit_code = EXIT_NOTHING_TO_DO
