"""The two errors that end a job with one line: a bad configuration (exit 2), and a failure
no retry can mend and no error row can record (exit 1)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration, reported before any work starts."""


class JobError(RuntimeError):
    """A failure no retry can mend and no error row can record: it ends the job."""
