"""A real Ceph RADOS Gateway on 127.0.0.1 for the S3 tests and benchmarks (DESIGN.md §7).

One monitor, one OSD on the in-memory `memstore` objectstore, one `radosgw` (beast frontend,
tcp_nodelay), auth off, all state in one temporary directory; answers S3 in about two seconds
and is torn down whole. The gateway alone can be stopped and started again (its data stays in
the OSD), which is how the tests take the network away from a running command.

    python3 tests/rgw.py      # (tools/rgw.sh) start one and print its environment; Ctrl-C stops
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

ACCESS_KEY = "VMAFSTESTACCESSKEY00"
SECRET_KEY = "vmafs-test-secret-key-0000000000000000000"
PACKAGES = "ceph-mon ceph-osd radosgw ceph-common"


def missing() -> str | None:
    """Why no gateway can run here, or None."""
    for tool in ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (tools/setup.sh; apt-get install {PACKAGES})"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    """A running single-node Ceph with its S3 gateway."""

    memory: int = 4 << 30  # memstore's capacity (RAM used grows with the data stored)
    root: str = ""
    port: int = 0
    mon_port: int = 0
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client needs: the ecosystem's variables, nothing from the user's ~/.aws."""
        empty = os.path.join(self.root, "aws-none")
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": empty, "AWS_SHARED_CREDENTIALS_FILE": empty}

    def _conf(self) -> str:
        return os.path.join(self.root, "ceph.conf")

    def _ceph(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run(args[:1] + ("-c", self._conf()) + args[1:], capture_output=True,
                              timeout=timeout, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {proc.stderr.decode(errors='replace')}")
        return proc.stdout.decode()

    def _spawn(self, name: str, *args: str) -> None:
        log = open(os.path.join(self.root, f"{name}.out"), "ab")  # noqa: SIM115 - the child's
        self.procs[name] = subprocess.Popen(
            args[:1] + ("-c", self._conf()) + args[1:] + ("-f",), stdout=log, stderr=log,
            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start(self) -> Gateway:
        self.root = tempfile.mkdtemp(prefix="vmafs-rgw-")
        self.port, self.mon_port = free_port(), free_port()
        fsid = str(uuid.uuid4())
        r = self.root
        with open(self._conf(), "w") as f:
            f.write(f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{self.mon_port}
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_crush_chooseleaf_type = 0
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
osd_objectstore = memstore
memstore_device_bytes = {self.memory}
osd_max_object_size = 134217728
run_dir = {r}/run
log_file = {r}/$name.log
admin_socket = {r}/run/$name.asok
pid_file = {r}/run/$name.pid
mon_data = {r}/mon
osd_data = {r}/osd
keyring = {r}/keyring
[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:{self.port} tcp_nodelay=1
rgw_data = {r}/rgw
rgw_dns_name = 127.0.0.1
rgw_gc_obj_min_wait = 1
rgw_gc_processor_period = 2
rgw_gc_processor_max_time = 2
""")
        for d in ("run", "mon", "osd", "rgw"):
            os.mkdir(os.path.join(r, d))
        try:
            subprocess.run(["ceph-authtool", "--create-keyring", f"{r}/keyring", "--gen-key",
                            "-n", "mon.", "--cap", "mon", "allow *"], check=True,
                           capture_output=True)
            subprocess.run(["monmaptool", "--create", "--addv", "a",
                            f"[v2:127.0.0.1:{self.mon_port}]", "--fsid", fsid, f"{r}/monmap"],
                           check=True, capture_output=True)
            self._ceph("ceph-mon", "--mkfs", "-i", "a", "--monmap", f"{r}/monmap")
            self._spawn("mon", "ceph-mon", "-i", "a")
            osd_uuid = str(uuid.uuid4())
            osd_id = self._ceph("ceph", "osd", "new", osd_uuid).strip()
            self._ceph("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
            self._spawn("osd", "ceph-osd", "-i", osd_id)
            self.start_gateway()
            self._ceph("radosgw-admin", "user", "create", "--uid", "vmafs", "--display-name",
                       "vmafs tests", "--access-key", ACCESS_KEY, "--secret", SECRET_KEY)
        except BaseException:
            self.stop()
            raise
        return self

    def start_gateway(self, timeout: float = 60) -> None:
        """(Re)start radosgw and wait until it answers."""
        self._spawn("rgw", "radosgw", "-n", "client.rgw")
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (403 for an anonymous request, say)
            except OSError:
                if time.monotonic() > deadline or self.procs["rgw"].poll() is not None:
                    raise RuntimeError("radosgw did not start; see "
                                       f"{self.root}/client.rgw.log") from None
                time.sleep(0.05)

    def stop_gateway(self) -> None:
        """Stop radosgw alone (SIGKILL: the network is gone, as when a host dies)."""
        proc = self.procs.pop("rgw", None)
        if proc is not None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for name in ("rgw", "osd", "mon"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = ""


@contextlib.contextmanager
def gateway(memory: int = 4 << 30) -> Iterator[Gateway]:
    gw = Gateway(memory=memory).start()
    try:
        yield gw
    finally:
        gw.stop()


# -- pytest: one gateway per session, a fresh bucket per test -------------------------------

try:
    import pytest
except ImportError:  # tools/rgw.sh needs no pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture(scope="session")
    def rgw_gateway() -> Iterator[Gateway]:
        """The session's gateway (tests that use it fail, not skip, without Ceph)."""
        why = missing()
        if why:
            pytest.fail(why)
        with gateway(memory=2 << 30) as gw:
            yield gw

    @pytest.fixture(name="s3")
    def s3_fixture(rgw_gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Env]:
        """A fresh bucket, and this process's environment pointing at the gateway."""
        for key, value in rgw_gateway.env().items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        import boto3

        client = boto3.client("s3")
        bucket = f"t{uuid.uuid4().hex[:20]}"
        client.create_bucket(Bucket=bucket)
        yield S3Env(rgw_gateway, client, bucket)


@dataclass
class S3Env:
    gw: Gateway
    client: object  # a boto3 S3 client (untyped)
    bucket: str

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def env(self, **changes: str) -> dict[str, str]:
        return {**self.gw.env(), **changes}

    def keys(self, prefix: str = "") -> list[str]:
        resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)  # type: ignore[attr-defined]
        return sorted(o["Key"] for o in resp.get("Contents", ()))

    def uploads(self) -> list[str]:
        resp = self.client.list_multipart_uploads(Bucket=self.bucket)  # type: ignore[attr-defined]
        return [u["Key"] for u in resp.get("Uploads", ())]

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()  # type: ignore[attr-defined, no-any-return]

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)  # type: ignore[attr-defined]


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # for sigwait
    t0 = time.monotonic()
    with gateway() as gw:
        print(f"# radosgw ready in {time.monotonic() - t0:.1f} s; state in {gw.root}",
              file=sys.stderr)
        for k, v in gw.env().items():
            if not k.startswith("AWS_CONFIG") and not k.startswith("AWS_SHARED"):
                print(f"export {k}={v}")
        sys.stdout.flush()
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
