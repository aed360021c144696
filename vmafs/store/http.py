"""Plain https:// and http:// URLs as a read-only store: any server that honours Range requests
(S3 presigned URLs included). urllib3 (already there under botocore) keeps the connections and
retries refused connections, 5xx and throttling (429, 503 SlowDown) with backoff and jitter,
honouring Retry-After. A URL's query (a presigned URL's signature) is never shown."""

from __future__ import annotations

import functools
import io
import threading
from typing import Any

from vmafs.errors import ContainerError
from vmafs.store import Entry, StoreError, UploadsInProgress, display_location
from vmafs.store.ranged import TAIL, BodyBroke, HttpBody, RangedObject

ATTEMPTS = 6
BODY_ATTEMPTS = 5

_pool: Any = None
_pool_lock = threading.Lock()


def _manager() -> Any:
    global _pool
    with _pool_lock:
        if _pool is None:
            import urllib3

            retry = urllib3.Retry(total=ATTEMPTS - 1, backoff_factor=0.2, backoff_max=10,
                                  backoff_jitter=0.5,
                                  status_forcelist=(429, 500, 502, 503, 504),
                                  allowed_methods=frozenset({"GET", "HEAD"}),
                                  respect_retry_after_header=True, raise_on_status=False)
            _pool = urllib3.PoolManager(maxsize=16, retries=retry,
                                        timeout=urllib3.Timeout(connect=10, read=60))
        return _pool


def _request(url: str, headers: dict[str, str], where: str) -> tuple[int, Any, bytes]:
    """(status, headers, body) of a GET; a body that breaks off is asked for again."""
    import urllib3

    last: Exception | None = None
    for _ in range(BODY_ATTEMPTS):
        try:
            resp = _manager().request("GET", url, headers=headers, preload_content=True)
            return resp.status, resp.headers, resp.data
        except urllib3.exceptions.MaxRetryError as exc:
            reason = type(exc.reason).__name__ if exc.reason is not None else "gave up"
            raise StoreError(f"{where}: cannot reach the server ({reason})") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            last = exc
    raise StoreError(f"{where}: the connection broke off ({type(last).__name__})")


def _check(status: int, where: str) -> None:
    if status == 404:
        raise StoreError(f"{where}: no such object (HTTP 404)")
    if status in (401, 403):
        raise StoreError(f"{where}: access denied (HTTP {status}; an expired presigned URL?)")
    if status == 412:
        raise ContainerError(f"{where}: the object changed while it was read")
    if status in (429, 503):
        raise StoreError(f"{where}: the server is throttling requests (HTTP {status}) and kept "
                         "refusing after retries")
    if status >= 400:
        raise StoreError(f"{where}: HTTP {status}")


def open_url(url: str) -> RangedObject:
    where = display_location(url)
    status, headers, body = _request(url, {"Range": f"bytes=-{TAIL}"}, where)
    if status == 416:
        raise StoreError(f"{where}: empty object")
    _check(status, where)
    if status != 206:
        raise StoreError(f"{where}: the server does not honour Range requests (HTTP {status})")
    content_range = str(headers.get("Content-Range", ""))
    try:
        size = int(content_range.rpartition("/")[2])
    except ValueError:
        raise StoreError(f"{where}: the server does not say the object's size") from None
    etag = str(headers.get("ETag", ""))
    modified = str(headers.get("Last-Modified", ""))
    identity = (b"http\0" + url.split("?", 1)[0].encode() + b"\0" + str(size).encode() + b"\0"
                + etag.encode() + b"\0" + modified.encode())

    def fetch(start: int, end: int) -> bytes:
        head = {"Range": f"bytes={start}-{end - 1}"}
        if etag and not etag.startswith("W/"):
            head["If-Match"] = etag
        got, _, data = _request(url, head, where)
        _check(got, where)
        if got != 206:
            raise StoreError(f"{where}: the server stopped honouring Range requests")
        return bytes(data)

    def open_body(start: int, end: int) -> HttpBody:
        import urllib3

        head = {"Range": f"bytes={start}-{end - 1}"}
        if etag and not etag.startswith("W/"):
            head["If-Match"] = etag
        try:
            resp = _manager().request("GET", url, headers=head, preload_content=False)
        except urllib3.exceptions.MaxRetryError as exc:
            reason = type(exc.reason).__name__ if exc.reason is not None else "gave up"
            raise StoreError(f"{where}: cannot reach the server ({reason})") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreError(f"{where}: the connection broke off ({type(exc).__name__})"
                             ) from None
        if resp.status != 206:
            resp.release_conn()
            _check(resp.status, where)
            raise StoreError(f"{where}: the server stopped honouring Range requests")
        return HttpBody(getattr(resp, "_fp", None), resp.read, resp.close,
                        functools.partial(_broke, where))

    return RangedObject(where, size, identity, fetch, (size - len(body), bytes(body)),
                        open_body)


class HttpStore:
    """Read-only archives behind URLs."""

    _shared: HttpStore | None = None

    @classmethod
    def shared(cls) -> HttpStore:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def list(self, place: str) -> list[Entry]:
        raise StoreError(f"{display_location(place)}: an http(s) URL cannot be listed; "
                         "give the archive's URL (and --base URL for its parents)")

    def stat(self, location: str) -> Entry | None:
        obj = open_url(location)
        obj.close()
        return Entry(obj.name.rpartition("/")[2], location, obj.size, obj.identity())

    def open(self, location: str) -> RangedObject:
        return open_url(location)

    def open_stream(self, location: str) -> io.RawIOBase:
        return open_url(location).stream()

    def create(self, location: str) -> Any:
        raise StoreError(f"{display_location(location)}: an http(s) URL is read-only")

    def mark(self, location: str) -> bool:
        raise StoreError(f"{display_location(location)}: an http(s) URL is read-only")

    def remove(self, location: str, identity: bytes | None = None) -> None:
        raise StoreError(f"{display_location(location)}: an http(s) URL is read-only")

    def uploads(self, place: str) -> UploadsInProgress:
        return []  # read-only: nothing is written there through it


def _broke(where: str, exc: Exception) -> Exception | None:
    import http.client

    import urllib3

    if isinstance(exc, (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
                        ValueError)):
        return BodyBroke(f"{where}: the connection broke off ({type(exc).__name__})")
    return None
