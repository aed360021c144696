"""S3 (AWS, Ceph's RADOS Gateway, MinIO, …) as a store: `s3://BUCKET/KEY`, `s3://BUCKET/PREFIX/`.

The client is botocore (the core of boto3), for its upkeep and because it does the ecosystem's
part the ecosystem's way: credentials and endpoint from AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_PROFILE and ~/.aws/, SigV4,
and retries of 5xx, throttling (503 SlowDown, 429) and dropped connections with exponential
backoff and jitter (`standard` mode, AWS_MAX_ATTEMPTS / AWS_RETRY_MODE honoured). One client is
shared by every thread (botocore clients are thread-safe) with a connection pool sized for the
requests vmafs keeps in flight. A body that breaks off mid-transfer is retried here.

Reading: RangedObject (one suffix-range GET opens an object; ranged GETs from threads, each
sent presigned through the client's own connection pool: a third to a half of a whole botocore
request's CPU, what a mount's random read waits for twice).
Writing: a multipart upload streamed from the archive writer, parts uploaded by a few threads,
the object appearing only when the upload is completed at commit; any failure, Ctrl-C or
SIGTERM aborts the upload (no object, no parts left behind).

Credentials are never printed: messages carry the S3 error code and the bucket and key only.
"""

from __future__ import annotations

import concurrent.futures
import functools
import gc
import io
import os
import queue
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vmafs.errors import ContainerError, VmafsError
from vmafs.store import Entry, StoreError, UploadsInProgress
from vmafs.store.ranged import TAIL, BodyBroke, HttpBody, RangedObject

if TYPE_CHECKING:
    from botocore.client import BaseClient

MAX_PARTS = 10_000  # S3's limit on parts of one upload
PART_SIZE = 8 << 20  # the first parts (S3's minimum is 5 MiB, all but the last)
PART_MAX = 5 << 30  # S3's largest part
PART_GROWTH_EVERY = 900  # parts of one size before the size doubles: 10,000 parts hold 14 TiB
PARTS_IN_FLIGHT = 6
IN_FLIGHT_BYTES = 256 << 20  # fewer parts in flight once parts grow large
BODY_ATTEMPTS = 5  # a body that breaks off mid-transfer is asked for again this often
ABORT_SECONDS = 30.0  # how long a failed upload keeps trying to remove its parts


def part_size(number: int, base: int = PART_SIZE) -> int:
    """The size of part `number` (1-based): base, doubled every PART_GROWTH_EVERY parts, so
    memory stays small for small archives and 10,000 parts still hold more than 10 TB."""
    return min(PART_MAX, base << ((number - 1) // PART_GROWTH_EVERY))


def parse(location: str) -> tuple[str, str]:
    """(bucket, key) of s3://BUCKET/KEY; the key may be empty or end in / (a prefix)."""
    if not location.startswith("s3://"):
        raise StoreError(f"{location}: not an s3:// location")
    bucket, _, key = location[5:].partition("/")
    if len(bucket) < 3 or "/" in bucket:
        raise StoreError(f"{location}: no bucket name (s3://BUCKET/KEY)")
    return bucket, key


# -- the client -----------------------------------------------------------------------------

_clients: dict[tuple[str, ...], BaseClient] = {}
_client_lock = threading.Lock()
_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE",
        "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


def client() -> BaseClient:
    """The S3 client, made on first use from the environment and ~/.aws/ (one per setting
    of those, so a process that changes them gets what they say)."""
    key = tuple(os.environ.get(name, "") for name in _ENV)
    with _client_lock:
        made = _clients.get(key)
        if made is None:
            made = _clients[key] = _make_client()
        return made


def _make_client() -> BaseClient:
    """The client, made without cyclic garbage collection: botocore loads its service models
    (JSON: ~100k objects, no garbage), and the collections that set off walked them again
    and again (importing botocore and making the client: 0.17 s of CPU, 0.175-0.197 s with
    collections; 4 runs each)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _new_client()
    finally:
        if enabled:
            gc.enable()


def _new_client(timeout: float = 60, attempts: int | None = None) -> BaseClient:
    """A client whose requests wait at most timeout seconds for an answer, tried attempts
    times (None: AWS_MAX_ATTEMPTS, else 6)."""
    import botocore.session
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError

    retries: dict[str, Any] = {"mode": os.environ.get("AWS_RETRY_MODE", "standard")}
    if attempts is not None:
        retries["total_max_attempts"] = attempts
    elif "AWS_MAX_ATTEMPTS" not in os.environ:
        retries["max_attempts"] = 6
    config = Config(retries=retries, max_pool_connections=32,
                    connect_timeout=min(10, timeout), read_timeout=timeout, tcp_keepalive=True,
                    # S3 clones (Ceph 16 among them) refuse the newer default checksums
                    request_checksum_calculation=os.environ.get(
                        "AWS_REQUEST_CHECKSUM_CALCULATION", "when_required"),
                    response_checksum_validation=os.environ.get(
                        "AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required"))
    try:
        session = botocore.session.get_session()
        region = session.get_config_variable("region") or "us-east-1"
        return session.create_client("s3", region_name=region, config=config)
    except BotoCoreError as exc:
        raise StoreError(f"S3: {_plain(exc)}") from None


def _plain(exc: BaseException) -> str:
    """An exception's message without anything that could be a secret (botocore's messages
    name profiles, endpoints and files, never keys)."""
    return str(exc).split("\n", 1)[0]


_RETRYABLE_BODY: tuple[type[BaseException], ...] | None = None


def _body_errors() -> tuple[type[BaseException], ...]:
    """What a body breaking off mid-transfer raises."""
    global _RETRYABLE_BODY
    if _RETRYABLE_BODY is None:
        from botocore.exceptions import (
            ConnectionClosedError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
        from urllib3.exceptions import HTTPError as Urllib3Error

        _RETRYABLE_BODY = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError,
                           ConnectionClosedError, Urllib3Error, ConnectionError, TimeoutError)
    return _RETRYABLE_BODY


def error(exc: BaseException, where: str) -> VmafsError:
    """One clear line for what S3 (or the way to it) answered."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, VmafsError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return StoreError(f"{where}: no such bucket")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StoreError(f"{where}: no such object")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                    "InvalidToken", "ExpiredToken"):
            return StoreError(f"{where}: access denied ({code}): check the credentials "
                              "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")
        if code in ("PreconditionFailed", "412"):
            return ContainerError(f"{where}: the object changed while it was read")
        if code in ("SlowDown", "503", "429", "TooManyRequests", "RequestLimitExceeded"):
            return StoreError(f"{where}: the S3 service is throttling requests ({code}) and "
                              "kept refusing after retries")
        message = str(err.get("Message") or "").split("\n", 1)[0]
        return StoreError(f"{where}: S3 error {code or status}" + (f": {message}" if message
                                                                     else ""))
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StoreError(f"{where}: no S3 credentials: set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    if isinstance(exc, EndpointConnectionError):
        return StoreError(f"{where}: cannot reach the S3 endpoint "
                          f"{exc.kwargs.get('endpoint_url', '')}".rstrip())
    if isinstance(exc, _body_errors()):
        return StoreError(f"{where}: the connection to S3 broke off ({type(exc).__name__})")
    from botocore.exceptions import BotoCoreError

    if isinstance(exc, BotoCoreError):
        return StoreError(f"{where}: {_plain(exc)}")
    raise exc


def _backoff(attempt: int) -> None:
    time.sleep(min(5.0, 0.1 * 2 ** attempt) * random.random())  # full jitter


def _version(head: dict[str, Any]) -> tuple[str, bytes]:
    """The ETag (it changes with the content; LastModified is not used: a listing and a HEAD
    give it at different precisions)."""
    etag = str(head.get("ETag", ""))
    return etag, etag.encode()


# -- reading --------------------------------------------------------------------------------


def open_object(location: str) -> RangedObject:
    """The object, opened with one request (its last TAIL bytes)."""
    bucket, key = parse(location)
    if not key or key.endswith("/"):
        raise StoreError(f"{location}: names a prefix, not an archive")
    s3 = client()
    for attempt in range(BODY_ATTEMPTS):
        try:
            resp = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=-{TAIL}")
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get(
                    "Code") == "InvalidRange":  # an empty object
                raise StoreError(f"{location}: empty object") from None
            raise error(exc, location) from None
        try:
            body = _read_body(resp)
            break
        except Exception as exc:
            if isinstance(exc, _body_errors()) and attempt + 1 < BODY_ATTEMPTS:
                _backoff(attempt)
                continue
            raise error(exc, location) from None
    content_range = resp.get("ContentRange")
    size = int(content_range.rpartition("/")[2]) if content_range else len(body)
    etag, version = _version(resp)
    identity = b"s3\0" + location.encode() + b"\0" + str(size).encode() + b"\0" + version

    quick = _Presigned(s3, bucket, key, etag)

    def fetch(start: int, end: int) -> bytes:
        data = quick.get(start, end)
        if data is None:
            return _get_range(s3, bucket, key, etag, start, end, location)
        return data

    def open_body(start: int, end: int) -> HttpBody:
        try:  # botocore retries the request itself
            resp = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                 IfMatch=etag)
        except Exception as exc:
            raise error(exc, location) from None
        body = resp["Body"]
        return HttpBody(getattr(getattr(body, "_raw_stream", None), "_fp", None), body.read,
                        body.close, functools.partial(_broke, location))

    return RangedObject(location, size, identity, fetch, (size - len(body), body), open_body)


def _read_body(resp: dict[str, Any]) -> bytes:
    body = resp["Body"]
    try:
        return bytes(body.read())
    finally:
        body.close()


PRESIGN_EXPIRES = 900  # seconds a presigned GET is valid for
PRESIGN_REUSE = 60.0  # seconds one is used (botocore refreshes expiring credentials sooner)


class _Presigned:
    """Ranged GETs of one object's version by a presigned URL sent through the client's own
    connection pool (its endpoint, proxies and TLS settings): a whole botocore request costs
    ~1.5-2 ms of CPU (events, validation, signing, parsing), one of these ~0.5-1 ms (4 KiB
    ranges from the RADOS gateway here, 200 each, interleaved). On a random read from a
    mount the two requests of a new extent (its header and the data) compete for the GIL and
    the cores with the gateway. Anything but a whole 206 answer returns None: the caller makes
    the full request, which retries and names the error."""

    def __init__(self, s3: BaseClient, bucket: str, key: str, etag: str) -> None:
        self._s3 = s3
        self._params = {"Bucket": bucket, "Key": key}
        self._etag = etag
        self._url = ""
        self._signed = 0.0
        self._broken = False  # once the quick path fails outright, the full requests only

    def _presigned(self) -> str:
        now = time.monotonic()
        if now - self._signed > PRESIGN_REUSE:
            self._url = self._s3.generate_presigned_url(
                "get_object", Params=self._params, ExpiresIn=PRESIGN_EXPIRES)
            self._signed = now
        return self._url

    def get(self, start: int, end: int) -> bytes | None:
        if self._broken:
            return None
        from botocore.awsrequest import AWSRequest

        try:
            request = AWSRequest("GET", self._presigned(), headers={
                "Range": f"bytes={start}-{end - 1}", "If-Match": self._etag}).prepare()
            request.stream_output = True
            send = self._s3._endpoint.http_session.send  # botocore's pool: not public API
            resp = send(request)
        except AttributeError:  # a botocore without it: full requests from now on
            self._broken = True
            return None
        except Exception:  # noqa: BLE001 - the full request retries, or names it
            return None
        raw = resp.raw
        try:
            if resp.status_code != 206:
                if resp.status_code in (400, 403):  # the presigned form refused: not again
                    self._broken = True
                return None
            data = raw.read(end - start)
            if len(data) != end - start:
                return None
            raw.release_conn()  # read whole: the connection is reused
            raw = None
            return bytes(data)
        except Exception:  # noqa: BLE001 - a body that broke off: the full request again
            return None
        finally:
            if raw is not None:
                raw.close()


def _get_range(s3: BaseClient, bucket: str, key: str, etag: str, start: int, end: int,
               where: str) -> bytes:
    """Bytes [start, end) of the version with etag; a body that breaks off is asked again
    (botocore retries the request itself: 5xx, throttling, refused connections)."""
    for attempt in range(BODY_ATTEMPTS):
        try:  # botocore has retried the request itself
            resp = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                 IfMatch=etag)
        except Exception as exc:
            raise error(exc, where) from None
        try:
            return _read_body(resp)
        except Exception as exc:
            if isinstance(exc, _body_errors()) and attempt + 1 < BODY_ATTEMPTS:
                _backoff(attempt)
                continue
            raise error(exc, where) from None
    raise AssertionError("unreachable")


class S3Store:
    """Archives in S3 buckets."""

    _shared: S3Store | None = None

    @classmethod
    def shared(cls) -> S3Store:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def list(self, place: str) -> list[Entry]:
        bucket, prefix = parse(place)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        out = []
        try:
            pages = client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                for item in page.get("Contents", ()):
                    key = str(item["Key"])
                    name = key[len(prefix):]
                    if not name:
                        continue
                    location = f"s3://{bucket}/{key}"
                    out.append(Entry(name, location, int(item["Size"]),
                                     self._identity(location, int(item["Size"]), item)))
        except Exception as exc:
            raise error(exc, place) from None
        return sorted(out, key=lambda e: e.name)

    @staticmethod
    def _identity(location: str, size: int, head: dict[str, Any]) -> bytes:
        return (b"s3\0" + location.encode() + b"\0" + str(size).encode() + b"\0"
                + _version(head)[1])

    def stat(self, location: str) -> Entry | None:
        bucket, key = parse(location)
        try:
            head = client().head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            problem = error(exc, location)
            if str(problem).endswith("no such object"):
                return None
            raise problem from None
        size = int(head["ContentLength"])
        return Entry(key.rpartition("/")[2], location, size,
                     self._identity(location, size, head))

    def check_new(self, location: str) -> None:
        """Refuse before any work: no bucket, no access, or an object already there."""
        bucket, key = parse(location)
        s3 = client()
        try:
            s3.head_bucket(Bucket=bucket)
        except Exception as exc:
            problem = error(exc, f"s3://{bucket}")
            if "S3 error 404" in str(problem) or "no such object" in str(problem):
                problem = StoreError(f"s3://{bucket}: no such bucket")
            raise problem from None
        if self.stat(location) is not None:
            raise VmafsError(f"{location} exists (vmafs does not replace existing objects)")

    def open(self, location: str) -> RangedObject:
        return open_object(location)

    def open_stream(self, location: str) -> io.RawIOBase:
        return open_object(location).stream()

    def create(self, location: str) -> S3Upload:
        return S3Upload(location)

    def mark(self, location: str) -> bool:
        """An empty object put only if the key is free (If-None-Match: *), so two marks at
        once, or a mark and an upload, never replace each other."""
        bucket, key = parse(location)
        try:
            client().put_object(Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
        except Exception as exc:
            from botocore.exceptions import ClientError

            if isinstance(exc, ClientError) and exc.response.get("Error", {}).get(
                    "Code") in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise error(exc, location) from None
        return True

    def uploads(self, place: str) -> UploadsInProgress:
        bucket, prefix = parse(place)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        s3 = client()
        out = []
        try:
            pages = s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                for upload in page.get("Uploads", ()):
                    name = str(upload["Key"])[len(prefix):]
                    if not name or "/" in name:
                        continue
                    last = upload["Initiated"].timestamp()
                    parts = s3.get_paginator("list_parts").paginate(
                        Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    for part_page in parts:
                        for part in part_page.get("Parts", ()):
                            last = max(last, part["LastModified"].timestamp())
                    out.append((name, last))
        except Exception as exc:
            raise error(exc, place) from None
        return sorted(out)

    def remove(self, location: str, identity: bytes | None = None) -> None:
        bucket, key = parse(location)
        if identity is not None:
            now = self.stat(location)
            if now is None:
                return
            if now.identity != identity:
                raise StoreError(f"{location}: replaced since it was read; not removed")
        try:
            client().delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise error(exc, location) from None


# -- writing --------------------------------------------------------------------------------


class S3Upload:
    """A multipart upload fed by write(): memory is at most the parts in flight plus one being
    filled; the object appears at commit() (CompleteMultipartUpload), never before."""

    def __init__(self, location: str, *, base_part: int = PART_SIZE,
                 in_flight: int = PARTS_IN_FLIGHT) -> None:
        self.location = location
        self.bucket, self.key = parse(location)
        if not self.key or self.key.endswith("/"):
            raise StoreError(f"{location}: names a prefix, not an archive")
        self._s3 = client()
        self._base = base_part
        self._in_flight = in_flight
        self._pieces: list[bytes] = []  # written, not yet in a part
        self._have = 0
        self._number = 0  # parts handed to the pool
        self._parts: dict[int, str] = {}  # part number -> ETag
        self._pending: deque[concurrent.futures.Future[None]] = deque()
        self._pool = _PartSenders(in_flight)
        self._done = False
        self.bytes_written = 0
        try:
            resp = self._s3.create_multipart_upload(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            self._pool.close()
            raise error(exc, location) from None
        self.upload_id = str(resp["UploadId"])

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        if self._done:
            raise ValueError("write to a finished upload")
        piece = bytes(data)  # the one copy before the part's join: the caller reuses data
        n = len(piece)
        self._pieces.append(piece)
        self._have += n
        self.bytes_written += n
        while self._have >= part_size(self._number + 1, self._base):
            self._submit(self._take(part_size(self._number + 1, self._base)))
        return n

    def _take(self, size: int) -> bytes:
        """The first size bytes written and not yet sent, as one part."""
        parts, got = [], 0
        while got < size and self._pieces:
            piece = self._pieces.pop(0)
            if got + len(piece) > size:
                cut = size - got
                self._pieces.insert(0, piece[cut:])
                piece = piece[:cut]
            parts.append(piece)
            got += len(piece)
        self._have -= got
        return b"".join(parts)

    def flush(self) -> None:
        """Parts go out when full; the rest at commit."""

    def _submit(self, body: bytes) -> None:
        if self._number >= MAX_PARTS:
            raise StoreError(f"{self.location}: the archive is larger than one S3 object of "
                             f"{MAX_PARTS} parts can hold")
        limit = max(1, min(self._in_flight, IN_FLIGHT_BYTES // max(len(body), 1)))
        while self._pending and (len(self._pending) >= limit or self._pending[0].done()):
            self._pending.popleft().result()  # raises the first failure
        self._number += 1
        self._pending.append(self._pool.submit(self._put, self._number, body))

    def _put(self, number: int, body: bytes) -> None:
        try:  # botocore retries a part whose request or connection fails
            resp = self._s3.upload_part(Bucket=self.bucket, Key=self.key,
                                        UploadId=self.upload_id, PartNumber=number, Body=body)
        except Exception as exc:
            raise error(exc, self.location) from None
        self._parts[number] = str(resp["ETag"])

    def commit(self) -> None:
        """Upload the rest, then complete the upload: the object appears whole."""
        if self._have or self._number == 0:
            self._submit(self._take(self._have))
        while self._pending:
            self._pending.popleft().result()
        parts = [{"PartNumber": n, "ETag": self._parts[n]} for n in range(1, self._number + 1)]
        try:
            self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except Exception as exc:
            problem = error(exc, self.location)
            if "PreconditionFailed" in str(exc) or "412" in str(exc):
                problem = VmafsError(f"{self.location} exists (vmafs does not replace "
                                     "existing objects)")
            raise problem from None
        self._done = True
        self._pool.close()

    def abort(self) -> None:
        """Remove every part (also after Ctrl-C or SIGTERM: those wait until it is done, at
        most about ABORT_SECONDS, whatever the gateway does)."""
        if self._done:
            return
        self._done = True
        self._pieces.clear()
        deadline = time.monotonic() + float(os.environ.get("VMAFS_S3_ABORT_SECONDS",
                                                           ABORT_SECONDS))
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        main = threading.current_thread() is threading.main_thread()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if main else None
        try:
            for future in self._pending:
                future.cancel()
            self._pool.close()
            # parts under way land first, so none comes after the abort; but a gateway that
            # stopped answering holds them for minutes (timeouts, retries): not past deadline
            concurrent.futures.wait(self._pending, timeout=max(0.0, deadline - time.monotonic()))
            self._pending.clear()
            self._abort_upload(deadline)
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _abort_upload(self, deadline: float) -> None:
        # a client of its own whose requests give up by the deadline (the shared one waits a
        # minute an attempt, six attempts)
        try:
            s3 = _new_client(timeout=max(1.0, min(10.0, deadline - time.monotonic())),
                             attempts=1)
        except StoreError:
            s3 = self._s3
        attempt = 0
        while True:
            try:
                s3.abort_multipart_upload(Bucket=self.bucket, Key=self.key,
                                          UploadId=self.upload_id)
                return
            except Exception as exc:
                from botocore.exceptions import ClientError

                if isinstance(exc, ClientError) and exc.response.get("Error", {}).get(
                        "Code") == "NoSuchUpload":
                    return
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{self.location}: could not abort the unfinished upload "
                        f"{self.upload_id} ({error(exc, 'S3')}); remove its parts with: "
                        f"aws s3api abort-multipart-upload --bucket {self.bucket} "
                        f"--key {self.key} --upload-id {self.upload_id}") from None
                attempt += 1
                time.sleep(min(2.0, 0.1 * 2 ** attempt) * (0.5 + random.random() / 2))


class _PartSenders:
    """The threads that upload an upload's parts. Daemon threads, unlike a
    ThreadPoolExecutor's, which the interpreter joins at exit: a part stuck on a gateway that
    stopped answering must not hold a failed command for its minutes of timeouts and retries."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._calls: queue.SimpleQueue[tuple[concurrent.futures.Future[None],
                                             Callable[[], None]] | None] = queue.SimpleQueue()
        for i in range(count):
            threading.Thread(target=self._serve, name=f"vmafs-put-{i}", daemon=True).start()

    def submit(self, fn: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._calls.put((future, functools.partial(fn, *args)))
        return future

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, fn = call
            del call  # the part's body goes with fn once sent, not while waiting for the next
            if future.set_running_or_notify_cancel():
                try:
                    fn()
                    future.set_result(None)
                except BaseException as exc:
                    future.set_exception(exc)
            del fn

    def close(self) -> None:
        """The threads end once the calls before this are done (a cancelled one is skipped)."""
        for _ in range(self._count):
            self._calls.put(None)


def _broke(where: str, exc: Exception) -> Exception:
    """A body's read error: the connection broke off (read again from there), or S3's."""
    import http.client

    if isinstance(exc, (*_body_errors(), http.client.HTTPException, ValueError)):
        # (ValueError: a read of a connection closed under it)
        return BodyBroke(f"{where}: the connection to S3 broke off ({type(exc).__name__})")
    return error(exc, where)
