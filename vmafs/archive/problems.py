"""What can be wrong with an archive, as values: every reader reports the same kinds the same way.

A Problem is data (kind, device, cluster, stream offset, message), so verify can list them, JSON
can carry them and callers can decide by kind, without parsing message text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vmafs.errors import ChecksumError, ContainerError, FormatError, IncompleteError

# Kinds. "format": a VMA rule is broken; "truncated": the stream ends early; "missing": a cluster
# never appears; "duplicate": a cluster appears twice; "checksum": data or index does not match
# its checksum; "index": the trailing index contradicts the stream or is damaged; "container":
# the compression layer (zstd frames, seek table, gzip, lzo) is damaged; "chain": see CHAIN.
FORMAT = "format"
TRUNCATED = "truncated"
MISSING = "missing"
DUPLICATE = "duplicate"
CHECKSUM = "checksum"
INDEX = "index"
CONTAINER = "container"
CHAIN = "chain"  # a link of an incremental chain is broken (parent missing or not the one)


@dataclass(frozen=True)
class Problem:
    """One thing verify found wrong, with where it was found when that is known."""

    kind: str
    message: str
    device: str | None = None
    cluster: int | None = None
    offset: int | None = None  # stream offset where it was found

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


class ArchiveError(FormatError):
    """An archive that cannot be read as it stands; carries its Problem."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class ArchiveChecksumError(ArchiveError, ChecksumError):
    pass


class ArchiveIncompleteError(ArchiveError, IncompleteError):
    pass


def error(kind: str, message: str, *, device: str | None = None, cluster: int | None = None,
          offset: int | None = None) -> ArchiveError:
    """The exception for a problem, of the FormatError subclass its kind implies."""
    problem = Problem(kind, message, device, cluster, offset)
    if kind == CHECKSUM:
        return ArchiveChecksumError(problem)
    if kind in (TRUNCATED, MISSING):
        return ArchiveIncompleteError(problem)
    return ArchiveError(problem)


def problem_of(exc: FormatError) -> Problem:
    """The Problem an exception carries, or one made from a plain FormatError."""
    if isinstance(exc, ArchiveError):
        return exc.problem
    if isinstance(exc, ChecksumError):
        return Problem(CHECKSUM, str(exc))
    if isinstance(exc, ContainerError):
        return Problem(CONTAINER, str(exc))
    if isinstance(exc, IncompleteError):
        return Problem(TRUNCATED, str(exc))
    return Problem(FORMAT, str(exc))
