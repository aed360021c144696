"""The exceptions vmafs raises; the CLI prints any VmafsError as one line."""


class VmafsError(Exception):
    """An error the user should see as one line, without a traceback."""


class FormatError(VmafsError):
    """The archive's bytes break a rule of the VMA format (or of our index)."""


class ChecksumError(FormatError):
    """Stored data or metadata does not match its checksum."""


class IncompleteError(FormatError):
    """The archive ends early: truncated, or a cluster is missing."""


class ContainerError(FormatError):
    """The compression layer around the VMA stream (zstd frames, seek table, gzip, lzop) is
    damaged or inconsistent."""


class NotSeekableError(VmafsError):
    """The archive can only be read from start to end (gzip, lzo, one-frame zstd)."""
