"""The exceptions vmafs raises; the CLI prints any VmafsError as one line and exits with its
`exit_code` (documented in vmafs(1)): 1 an error, 2 a usage error, 3 the archive (or a chain
it needs) is damaged or incomplete, 4 (verify) damage only in data a newer layer replaces."""

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DAMAGED = 3
EXIT_SUPERSEDED_DAMAGE = 4


class VmafsError(Exception):
    """An error the user should see as one line, without a traceback."""

    exit_code = EXIT_ERROR


class UsageError(VmafsError):
    """A bad value on the command line, found before any work was done."""

    exit_code = EXIT_USAGE


class FormatError(VmafsError):
    """The archive's bytes break a rule of the VMA format (or of our index)."""

    exit_code = EXIT_DAMAGED


class ChecksumError(FormatError):
    """Stored data or metadata does not match its checksum."""


class IncompleteError(FormatError):
    """The archive ends early: truncated, or a cluster is missing."""


class ContainerError(FormatError):
    """The compression layer around the VMA stream (zstd frames, seek table, gzip, lzop) is
    damaged or inconsistent."""


class NotSeekableError(VmafsError):
    """The archive can only be read from start to end (gzip, lzo, one-frame zstd)."""


def about(where: str, exc: VmafsError) -> VmafsError:
    """exc's message prefixed with what it is about (a file name), with exc's exit code."""
    error = VmafsError(f"{where}: {exc}")
    error.exit_code = exc.exit_code
    return error


def leaf(exc: BaseException) -> BaseException:
    """The one exception that matters in what trio raised: nurseries group them; a
    VmafsError is what the user should read, before anything else, and a cancellation never."""
    import trio  # only trio's callers have groups to open

    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        inner.sort(key=lambda e: not isinstance(e, VmafsError))
        exc = (inner or list(exc.exceptions))[0]
    return exc
