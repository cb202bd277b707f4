"""Named exceptions. Every user-facing problem is one of these, never a bare ``assert``.

Messages follow one grammar: where (file or folder), what is wrong, and the fix,
with the exact command or argument in backticks. The CLI prints ``str(error)`` on one
line and exits with code 2.
"""

from __future__ import annotations


class RewardAuditError(Exception):
    """Base class of every error reward_audit raises on purpose."""


class RunNotFoundError(RewardAuditError):
    """The path does not exist, or holds no reward_audit run."""


class CorruptRunError(RewardAuditError):
    """A file of a run folder cannot be read (truncated, not Parquet, not JSON)."""


class SchemaVersionError(RewardAuditError):
    """A run was written with a schema version this reward_audit cannot read."""


class InvalidDataError(RewardAuditError):
    """The data can be read but cannot be audited (NaN rewards, missing columns)."""


class UnsupportedRayError(RewardAuditError):
    """The installed Ray version / API stack has no capture adapter."""
