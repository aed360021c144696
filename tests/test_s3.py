"""Archives in S3, against a real Ceph RADOS Gateway this session starts (tests/rgw.py): every
command that writes streams a multipart upload, every command that reads takes s3:// and
presigned https/http URLs; failures (the gateway gone mid-upload, Ctrl-C, SIGTERM, wrong
credentials, a missing bucket, a throttling proxy) end cleanly, leaving no object and no
parts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import ROOT, VECTORS, assert_one_line_error, run_vmafs
from faultproxy import FaultProxy

MiB = 1 << 20


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])

pytest_plugins = ["rgw"]  # one gateway for the session, whatever module asks
if TYPE_CHECKING:
    from rgw import S3Env


def make_image(path: Path, size: int = 24 * MiB, seed: int = 1) -> bytes:
    """A disk image: random data in every other MiB, holes between (half data)."""
    rng = hashlib.sha256(str(seed).encode()).digest()
    data = bytearray(size)
    for at in range(0, size, 2 * MiB):
        block = hashlib.shake_256(rng + at.to_bytes(8, "little")).digest(min(MiB, size - at))
        data[at:at + len(block)] = block
    path.write_bytes(data)
    return bytes(data)


def extract_disk(archive: str, out: Path, name: str = "drive-scsi0",
                 env: dict[str, str] | None = None) -> bytes:
    rc, _, err = run_vmafs("extract", archive, out, env=env)
    assert rc == 0, err
    return (out / f"disk-{name}.raw").read_bytes()


@pytest.mark.parametrize("suffix", [".vma", ".vma.zst"])
def test_create_then_read_back_from_s3(s3: S3Env, tmp_path: Path, suffix: str) -> None:
    image = tmp_path / "disk.raw"
    data = make_image(image)
    target = s3.url(f"vm/a{suffix}")
    rc, out, err = run_vmafs("create", "-o", target, "--json", "-c",
                             f"qemu-server.conf={VECTORS / 'proxmox' / 'qemu-server.conf'}",
                             f"drive-scsi0={image}")
    assert rc == 0, err
    assert s3.keys() == [f"vm/a{suffix}"] and s3.uploads() == []
    local = tmp_path / f"local{suffix}"
    assert run_vmafs("create", "-o", local, "-c",
                     f"qemu-server.conf={VECTORS / 'proxmox' / 'qemu-server.conf'}",
                     f"drive-scsi0={image}")[0] == 0
    if suffix == ".vma":  # the same writer, streamed (compressed sizes vary with uuid, time)
        assert len(s3.get(f"vm/a{suffix}")) == local.stat().st_size
    rc, listing, err = run_vmafs("list", target)
    assert rc == 0 and b"drive-scsi0" in listing, err
    rc, conf, err = run_vmafs("config", target)
    assert rc == 0 and conf == (VECTORS / "proxmox" / "qemu-server.conf").read_bytes(), err
    rc, _, err = run_vmafs("verify", target)
    assert rc == 0, err
    assert extract_disk(target, tmp_path / "x") == data


def test_prefix_output_gets_a_vzdump_name(s3: S3Env, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 4 * MiB)
    rc, out, err = run_vmafs("create", "--vmid", "101", "--zstd", "-o", s3.url("backups/"),
                             "--json", f"drive-scsi0={image}")
    assert rc == 0, err
    (key,) = s3.keys()
    assert key.startswith("backups/vzdump-qemu-101-") and key.endswith(".vma.zst")
    # an existing object is never replaced, and the refusal comes before any work
    rc, _, err = run_vmafs("create", "-o", s3.url(key), f"drive-scsi0={image}")
    assert_one_line_error(rc, err, "exists")
    assert s3.uploads() == []


def test_proxmox_vma_in_s3_reads_and_converts_to_a_mountable_archive(s3: S3Env,
                                                                     tmp_path: Path) -> None:
    """vzdump's un-indexed archives: a plain .vma by ranged reads of its extent headers, a
    .vma.gz as a stream; convert S3 -> S3 writes an indexed one."""
    source = VECTORS / "proxmox" / "sample-2disks.vma"
    s3.put("pve/sample.vma", source.read_bytes())
    s3.put("pve/sample.vma.gz", (VECTORS / "proxmox" / "sample-2disks.vma.gz").read_bytes())
    rc, _, err = run_vmafs("extract", source, tmp_path / "want")
    assert rc == 0, err
    want = {p.name: p.read_bytes() for p in (tmp_path / "want").iterdir()}
    for name in ("pve/sample.vma", "pve/sample.vma.gz"):
        rc, _, err = run_vmafs("verify", s3.url(name))
        assert rc == 0, err
    rc, listing, err = run_vmafs("list", s3.url("pve/sample.vma"))  # walked by ranged reads
    assert rc == 0 and listing == run_vmafs("list", source)[1], err
    rc, _, err = run_vmafs("convert", s3.url("pve/sample.vma"), s3.url("pve/indexed.vma.zst"))
    assert rc == 0, err
    rc, _, err = run_vmafs("convert", s3.url("pve/sample.vma.gz"), s3.url("pve/fromgz.vma"))
    assert rc == 0, err
    for name in ("pve/indexed.vma.zst", "pve/fromgz.vma"):
        rc, out, err = run_vmafs("verify", s3.url(name))
        assert rc == 0 and "data checksums" in (out.decode() + err), err
        got = tmp_path / name.replace("/", "_")
        rc, _, err = run_vmafs("extract", s3.url(name), got)
        assert rc == 0, err
        assert {p.name: p.read_bytes() for p in got.iterdir()} == want


def test_presigned_urls_read_the_same(s3: S3Env, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    data = make_image(image, 8 * MiB)
    for suffix in (".vma", ".vma.zst"):
        assert run_vmafs("create", "-o", s3.url(f"p/a{suffix}"), f"drive-scsi0={image}")[0] == 0
        url = s3.client.generate_presigned_url(  # type: ignore[attr-defined]
            "get_object", Params={"Bucket": s3.bucket, "Key": f"p/a{suffix}"}, ExpiresIn=600)
        assert url.startswith("http://") and "Signature=" in url
        rc, listing, err = run_vmafs("list", url)
        assert rc == 0 and b"drive-scsi0" in listing, err
        rc, _, err = run_vmafs("verify", url)
        assert rc == 0, err
        assert extract_disk(url, tmp_path / f"x{suffix}") == data
    # a URL that fails is named without its query (the signature)
    bad = s3.client.generate_presigned_url(  # type: ignore[attr-defined]
        "get_object", Params={"Bucket": s3.bucket, "Key": "p/none.vma"}, ExpiresIn=600)
    rc, _, err = run_vmafs("list", bad)
    assert_one_line_error(rc, err, "no such object")
    assert "Signature" not in err and "Credential" not in err


def test_bad_credentials_and_missing_things_are_one_line(s3: S3Env, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    make_image(image, 2 * MiB)
    assert run_vmafs("create", "-o", s3.url("a.vma"), f"drive-scsi0={image}")[0] == 0
    wrong = s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret-" + "x" * 25)
    for args in (("list", s3.url("a.vma")), ("create", "-o", s3.url("b.vma"),
                                             f"drive-scsi0={image}")):
        rc, _, err = run_vmafs(*args, env=wrong)
        assert_one_line_error(rc, err, "access denied")
        assert "not-the-secret" not in err
        assert s3.gw.env()["AWS_SECRET_ACCESS_KEY"] not in err
    rc, _, err = run_vmafs("list", "s3://no-such-bucket-here/a.vma")
    assert_one_line_error(rc, err, "no such bucket")
    rc, _, err = run_vmafs("create", "-o", "s3://no-such-bucket-here/a.vma",
                           f"drive-scsi0={image}")
    assert_one_line_error(rc, err, "no such bucket")
    rc, _, err = run_vmafs("verify", s3.url("missing.vma"))
    assert_one_line_error(rc, err, "no such object")
    rc, _, err = run_vmafs("list", s3.url("a.vma"), env={"AWS_ACCESS_KEY_ID": "",
                                                         "AWS_SECRET_ACCESS_KEY": ""})
    assert rc != 0 and "Traceback" not in err
    assert s3.keys() == ["a.vma"] and s3.uploads() == []


def test_credentials_and_endpoint_from_an_aws_profile(s3: S3Env, tmp_path: Path) -> None:
    """AWS_PROFILE and the ~/.aws/ files, the ecosystem's way (no key in the environment)."""
    image = tmp_path / "disk.raw"
    make_image(image, 2 * MiB)
    env = s3.gw.env()
    (tmp_path / "credentials").write_text(
        f"[backup]\naws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n")
    (tmp_path / "config").write_text(
        f"[profile backup]\nregion = us-east-1\nendpoint_url = {env['AWS_ENDPOINT_URL']}\n")
    profile = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_ENDPOINT_URL": "",
               "AWS_PROFILE": "backup", "AWS_CONFIG_FILE": str(tmp_path / "config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials")}
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run([sys.executable, "-m", "vmafs", "create", "-o", s3.url("prof.vma"),
                           f"drive-scsi0={image}"], cwd=ROOT, capture_output=True, text=True,
                          env={**clean, **{k: v for k, v in profile.items() if v},
                               "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == 0, proc.stderr
    assert s3.keys() == ["prof.vma"]


def test_throttling_is_retried_and_bytes_stay_exact(s3: S3Env, tmp_path: Path) -> None:
    """Every third request answered 503 SlowDown by a real proxy: upload and reads retry."""
    image = tmp_path / "disk.raw"
    data = make_image(image, 24 * MiB)
    proxy = FaultProxy(s3.gw.port, every=3)
    try:
        env = s3.env(AWS_ENDPOINT_URL=proxy.endpoint)
        rc, _, err = run_vmafs("create", "-o", s3.url("t/a.vma.zst"), f"drive-scsi0={image}",
                               env=env)
        assert rc == 0, err
        assert extract_disk(s3.url("t/a.vma.zst"), tmp_path / "x", env=env) == data
        assert proxy.refused >= 3, proxy.requests
    finally:
        proxy.close()
    assert s3.uploads() == []


def test_reads_that_break_off_are_retried(s3: S3Env, tmp_path: Path) -> None:
    """Every second large response of a real proxy drops the connection halfway through its body:
    reads ask again, bytes stay exact; with the gateway gone, one line and exit 1."""
    image = tmp_path / "disk.raw"
    data = make_image(image, 24 * MiB, seed=5)
    assert run_vmafs("create", "-o", s3.url("cut/a.vma"), f"drive-scsi0={image}")[0] == 0
    proxy = FaultProxy(s3.gw.port, every=0, cut=2)
    try:
        env = s3.env(AWS_ENDPOINT_URL=proxy.endpoint)
        assert extract_disk(s3.url("cut/a.vma"), tmp_path / "x", env=env) == data
        assert proxy.cuts >= 1, proxy.requests
    finally:
        proxy.close()
    dead = s3.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}", AWS_MAX_ATTEMPTS="2")
    rc, _, err = run_vmafs("extract", s3.url("cut/a.vma"), tmp_path / "y", env=dead)
    assert_one_line_error(rc, err, "cannot reach the S3 endpoint")


def test_ranged_reads_stay_exact_through_refusals_and_cuts(s3: S3Env,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """An object's ranged reads (a mount's random reads: presigned GETs, the full request when
    one is not answered whole) through a proxy that refuses every third request and cuts
    every second large body: the bytes stay exact; the object replaced meanwhile is an error,
    never the new bytes."""
    from vmafs.errors import ContainerError
    from vmafs.store.s3 import open_object

    data = os.urandom(6 * MiB)
    s3.put("r/obj", data)
    proxy = FaultProxy(s3.gw.port, every=3, cut=2)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        obj = open_object(s3.url("r/obj"))
        try:
            for at, n in [(2 * MiB + 5, 4096), (3 * MiB, 200 * 1024), (1 * MiB, 65536),
                          (4 * MiB + 1, 300 * 1024), (2 * MiB - 7, 9)] * 2:
                assert obj.read(at, n) == data[at:at + n]
            assert proxy.refused >= 1 and proxy.cuts >= 1, proxy.requests
            s3.put("r/obj", data[::-1])
            with pytest.raises(ContainerError, match="changed while it was read"):
                obj.read(3 * MiB + 11, 4096)
        finally:
            obj.close()
    finally:
        proxy.close()


# -- failures during an upload: nothing is left behind -------------------------------------


def _start_slow_upload(s3: S3Env, key: str, tmp_path: Path, **env: str
                       ) -> tuple[subprocess.Popen[bytes], object, bytes]:
    """`convert - s3://…` fed from a pipe we hold: the upload is under way (parts stored)
    while the command waits for more input."""
    archive = tmp_path / "src.vma"
    make_image(tmp_path / "disk.raw", 48 * MiB, seed=7)
    assert run_vmafs("create", "-o", archive, f"drive-scsi0={tmp_path / 'disk.raw'}")[0] == 0
    full = archive.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmafs", "convert", "-", s3.url(key)], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, **s3.gw.env(), "PYTHONPATH": str(ROOT), **env})
    assert proc.stdin is not None
    cut = len(full) * 3 // 4
    proc.stdin.write(full[:cut])
    proc.stdin.flush()
    deadline = time.monotonic() + 60
    while True:  # wait until parts are stored
        ups = s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])  # type: ignore[attr-defined]
        if ups:
            parts = s3.client.list_parts(Bucket=s3.bucket, Key=key,  # type: ignore[attr-defined]
                                         UploadId=ups[0]["UploadId"]).get("Parts", [])
            if parts:
                break
        if proc.poll() is not None or time.monotonic() > deadline:  # a hang guard, not a timing
            pytest.fail("the upload ended or stored no part")
        time.sleep(0.1)
    return proc, proc.stdin, full[cut:]


def _wait_for_request(port: int, method: bytes, timeout: float = 60) -> None:
    """Stand in for a stopped gateway on its port, closing every connection unanswered (the
    client retries as it does a refused one), until a METHOD request comes."""
    import socket

    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(16)
        srv.settimeout(timeout)  # a hang guard
        while True:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(10)
                head = conn.recv(65536)
            if head.startswith(method + b" "):
                return


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_upload_aborts_it(s3: S3Env, tmp_path: Path, signum: int) -> None:
    proc, stdin, _ = _start_slow_upload(s3, "sig.vma.zst", tmp_path)
    proc.send_signal(signum)
    # Its input stays open: the signal ends the command, not the input's end (closing stdin
    # here, as communicate() does, raced the signal: "archive is truncated", exit 3).
    try:
        proc.wait(timeout=60)  # a hang guard
    finally:
        stdin.close()  # type: ignore[attr-defined]
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err.decode()
    assert s3.keys() == [] and s3.uploads() == []


def test_signal_while_the_gateway_hangs_ends_in_time(s3: S3Env, tmp_path: Path) -> None:
    """A gateway that stops answering (SIGSTOP: connections accepted, nothing answered) holds
    a part for minutes of timeouts and retries: SIGTERM then ends the command within the abort
    deadline, one line naming the upload left to remove, not after those minutes."""
    proc, stdin, rest = _start_slow_upload(s3, "hang.vma", tmp_path,
                                           VMAFS_S3_ABORT_SECONDS="3")
    rgw = s3.gw.procs["rgw"]
    rgw.send_signal(signal.SIGSTOP)
    try:
        writer = threading.Thread(target=_write_quietly, args=(stdin, rest), daemon=True)
        writer.start()  # more parts, which now wait on the gateway
        writer.join(timeout=30)
        time.sleep(1)  # the parts sent: not a timing, the signal comes with them in flight
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)  # a hang guard: held by its parts, it took minutes
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("SIGTERM did not end an upload to a gateway that stopped answering")
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "Traceback" not in err and "abort-multipart-upload" in err, err
    finally:
        rgw.send_signal(signal.SIGCONT)
        stdin.close()  # type: ignore[attr-defined]
    # the parts and the abort the command sent reach the gateway now; what is left we remove
    for up in s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []):  # type: ignore[attr-defined]
        with contextlib.suppress(s3.client.exceptions.NoSuchUpload):  # type: ignore[attr-defined]
            s3.client.abort_multipart_upload(Bucket=s3.bucket, Key=up["Key"],  # type: ignore[attr-defined]
                                             UploadId=up["UploadId"])
    assert s3.keys() == [] and s3.uploads() == []


def _write_quietly(stream: object, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ValueError):
        stream.write(data)  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]


def test_gateway_gone_mid_upload_fails_cleanly(s3: S3Env, tmp_path: Path) -> None:
    """The gateway dies while parts are being uploaded: the command fails with one line; the
    upload is aborted once the gateway answers again (no object, no parts)."""
    proc, stdin, rest = _start_slow_upload(s3, "gone.vma", tmp_path, AWS_MAX_ATTEMPTS="2",
                                           VMAFS_S3_ABORT_SECONDS="60")
    s3.gw.stop_gateway()
    t0 = time.monotonic()
    try:
        stdin.write(rest)  # type: ignore[attr-defined]
        stdin.close()  # type: ignore[attr-defined]
    except BrokenPipeError:
        pass
    # Back only once the command has given up on its parts and tries to abort the upload
    # (a fixed 2 s was a guess: back within 0.0 s, the retried part went through and the
    # upload completed, 2 of 4 runs on a loaded core)
    _wait_for_request(s3.gw.port, b"DELETE")
    s3.gw.start_gateway()
    proc.wait(timeout=120)
    assert proc.stderr is not None
    text = proc.stderr.read().decode()
    assert proc.returncode == 1, text
    assert "Traceback" not in text and "gone.vma" in text, text
    assert time.monotonic() - t0 < 60
    assert s3.keys() == [] and s3.uploads() == []
