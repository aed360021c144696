"""One CLI: configs stored as Proxmox names them, usage errors, signals, terminals, mount
points, failure leftovers and one JSON vocabulary — each through the real `vmafs` command."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, VECTORS, assert_one_line_error, fuse_missing, run_vmafs

MiB = 1 << 20
MAN = ROOT / "man"


def vmafs_cmd(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "vmafs", *map(str, args)]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
        f.seek(MiB)
        f.write(os.urandom(256 * 1024))
    return path


@pytest.fixture
def archive(tmp_path: Path, disk: Path) -> Path:
    conf = tmp_path / "101.conf"
    conf.write_text("memory: 512\nscsi0: local:101/vm-101-disk-0.raw\n")
    out = tmp_path / "a.vma"
    rc, _, err = run_vmafs("create", "-q", "-o", out, "-c", conf, f"drive-scsi0={disk}")
    assert rc == 0, err
    return out


# -- configs as Proxmox names them ---------------------------------------------------------------

def test_configs_are_stored_as_proxmox_reads_them(tmp_path: Path, disk: Path) -> None:
    (tmp_path / "101.conf").write_text("memory: 512\n")
    (tmp_path / "101.fw").write_text("[OPTIONS]\nenable: 1\n")
    (tmp_path / "notes.txt").write_text("hello\n")
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc, out, err = run_vmafs("create", "-q", "--json", "-o", f"{outdir}/",
                             "-c", tmp_path / "101.conf", "-c", tmp_path / "101.fw",
                             "-c", f"readme={tmp_path / 'notes.txt'}", f"drive-scsi0={disk}")
    assert rc == 0, err
    written = Path(json.loads(out)["output"])
    assert written.name.startswith("vzdump-qemu-101-")  # the VMID from 101.conf's name
    rc, out, err = run_vmafs("config", written)
    assert rc == 0 and out == b"memory: 512\n", err
    rc, out, err = run_vmafs("config", written, "qemu-server.fw")
    assert rc == 0 and out.startswith(b"[OPTIONS]"), err
    rc, out, _ = run_vmafs("list", "--json", written)
    assert [c["name"] for c in json.loads(out)["configs"]] == [
        "qemu-server.conf", "qemu-server.fw", "readme"]


def test_create_in_the_same_second_takes_the_next_name(tmp_path: Path, disk: Path) -> None:
    """As for backup: vzdump names have one-second resolution, so an archive created in the
    second of one already there takes the next free second's name; the file there is kept."""
    from vmafs.archive.naming import vzdump_name

    outdir = tmp_path / "out"
    outdir.mkdir()
    now = time.time()
    taken = [outdir / vzdump_name("101", now + k, False) for k in (0, 1)]
    for path in taken:
        path.write_bytes(b"a user's file")
    rc, out, err = run_vmafs("create", "-q", "--json", "--vmid", "101", "-o", f"{outdir}/",
                             f"drive-scsi0={disk}")
    assert rc == 0, err
    written = Path(json.loads(out)["output"])
    assert written not in taken and written.parent == outdir
    assert all(p.read_bytes() == b"a user's file" for p in taken)


@pytest.mark.parametrize("configs,fragments", [
    (["a.conf", "b.conf"], ["both be stored as qemu-server.conf", "NAME=FILE"]),
    (["vmafs-chain.json=a.conf"], ["vmafs-chain.json is reserved"]),
    (["vmafs-chain.json"], ["vmafs-chain.json is reserved"]),
])
def test_config_name_clashes_are_usage_errors(tmp_path: Path, disk: Path,
                                              configs: list[str], fragments: list[str]) -> None:
    for name in ("a.conf", "b.conf", "vmafs-chain.json"):
        (tmp_path / name).write_text("x\n")
    args = [a for c in configs for a in ("-c", str(tmp_path / c) if "=" not in c
                                         else c.replace("=", f"={tmp_path}/"))]
    rc, _, err = run_vmafs("create", "-q", "-o", tmp_path / "x.vma", *args, f"drive-scsi0={disk}")
    assert_one_line_error(rc, err, *fragments)
    assert rc == 2
    assert not list(tmp_path.glob("*.vma"))


# -- bad values: one line, exit 2, before any work -----------------------------------------------

@pytest.mark.parametrize("argv", [
    ["create", "--level", "99", "-o", "{t}/x.vma.zst", "drive-scsi0={d}"],
    ["create", "--threads", "-5", "-o", "{t}/x.vma.zst", "drive-scsi0={d}"],
    ["convert", "--level", "0", "{a}", "{t}/y.vma.zst"],
    ["merge", "--threads", "x", "-o", "{t}/m.vma", "{a}"],
    ["merge", "--keep", "-1", "-o", "{t}/m.vma", "{a}"],
    ["create", "--no-such-flag"],
    ["list"],
])
def test_bad_values_are_one_line_and_exit_2(tmp_path: Path, disk: Path, archive: Path,
                                            argv: list[str]) -> None:
    args = [a.format(t=tmp_path, d=disk, a=archive) for a in argv]
    before = sorted(os.listdir(tmp_path))
    rc, out, err = run_vmafs(*args)
    assert_one_line_error(rc, err)
    assert rc == 2 and out == b""
    assert sorted(os.listdir(tmp_path)) == before
    rc, out, err = run_vmafs(*args, "--json")
    assert rc == 2 and json.loads(out) == {"ok": False, "error": json.loads(out)["error"],
                                           "exit": 2}


# -- signals: the same in every command ----------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signals_end_a_command_cleanly(tmp_path: Path, signum: int) -> None:
    """create of a slow-to-compress disk, signalled mid-way: exit 128+N, one line, and no
    temporary file left behind (the README promises leftovers only after SIGKILL)."""
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        for _ in range(48):
            f.write(os.urandom(MiB))
    out = tmp_path / "slow.vma.zst"
    proc = subprocess.Popen(vmafs_cmd("create", "-q", "--level", "19", "--threads", "1",
                                      "-o", out, f"drive-scsi0={big}"),
                            env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".slow.vma.zst.*.part")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err
    assert_one_line_error(proc.returncode, err.decode(), "interrupted by",
                          signal.Signals(signum).name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.raw"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_a_command_whose_input_pipe_is_idle(tmp_path: Path, signum: int) -> None:
    """`convert -` fed by a producer that stalls with its end of the pipe open (a network
    stream, a `zstd -d` waiting on its own input): a stop signal ends the command at once, as
    it does any other, without waiting for input that may never come; nothing is left."""
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(16 * MiB))
    source = tmp_path / "in.vma"
    rc, _, err = run_vmafs("create", "-q", "-o", source, f"drive-scsi0={image}")
    assert rc == 0, err
    data = source.read_bytes()
    out = tmp_path / "out.vma.zst"
    proc = subprocess.Popen(vmafs_cmd("convert", "-q", "-", out), env=env(),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        proc.stdin.write(data[:len(data) // 2])  # then the producer stalls: the pipe stays open
        proc.stdin.flush()
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".out.vma.zst.*.part")):  # under way, handlers set
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "convert never started its output"  # a hang guard
            time.sleep(0.02)
        proc.send_signal(signum)
        try:
            proc.wait(timeout=30)  # a hang guard, not a speed check
        except subprocess.TimeoutExpired:
            pytest.fail(f"{signal.Signals(signum).name} held until the input pipe ends")
        err_text = proc.stderr.read().decode()
    finally:
        proc.stdin.close()  # (only now: an end of input before the signal is another case)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signum, err_text
    assert_one_line_error(proc.returncode, err_text, "interrupted by",
                          signal.Signals(signum).name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw", "in.vma"]


# -- never an archive on a terminal --------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["create", "-o", "-", "drive-scsi0={d}"],
    ["convert", "{a}", "-"],
])
def test_archive_to_a_terminal_is_refused(tmp_path: Path, disk: Path, archive: Path,
                                          argv: list[str]) -> None:
    cmd = " ".join(vmafs_cmd(*(a.format(d=disk, a=archive) for a in argv)))
    proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], env=env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    text = proc.stdout.decode(errors="replace")
    assert proc.returncode == 2, text
    assert "refusing to write an archive to a terminal" in text
    assert len(text) < 400  # one line, no binary


# -- messages name files as text; a failed command leaves nothing it created --------------------

def test_unwritable_directory_names_the_archive_not_a_bytes_literal(tmp_path: Path,
                                                                    disk: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "vmafs-test", ro], check=True)
    try:
        rc, _, err = run_vmafs("create", "-q", "-o", ro / "x.vma", f"drive-scsi0={disk}")
    finally:
        subprocess.run(["umount", ro], check=True)
    line = assert_one_line_error(rc, err, str(ro / "x.vma"), "Read-only file system")
    assert "b'" not in line and ".part" not in line


def test_failed_extract_leaves_no_directory(tmp_path: Path, archive: Path) -> None:
    damaged = tmp_path / "damaged.vma"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(data)
    rc, _, err = run_vmafs("extract", "-q", damaged, tmp_path / "new" / "deeper")
    assert_one_line_error(rc, err)
    assert rc == 3
    assert not (tmp_path / "new").exists()


# -- mount points --------------------------------------------------------------------------------

@pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))
def test_mount_point_missing_nonempty_and_json(tmp_path: Path, archive: Path) -> None:
    rc, _, err = run_vmafs("mount", archive, tmp_path / "nowhere")
    assert_one_line_error(rc, err, "does not exist")
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("mine")
    rc, _, err = run_vmafs("mount", archive, full)
    assert_one_line_error(rc, err, "not empty", "-o nonempty")
    rc, out, err = run_vmafs("mount", "--json", "-o", "nonempty", archive, full)
    assert rc == 0, err
    try:
        doc = json.loads(out)
        assert doc["ok"] and doc["mountpoint"] == str(full) and doc["pid"] > 0
        assert doc["devices"] == [{"name": "drive-scsi0", "device_bytes": 4 * MiB,
                                   "file": "disk-drive-scsi0.raw"}]
        assert [c["file"] for c in doc["configs"]] == ["qemu-server.conf"]
        assert sorted(os.listdir(full)) == ["disk-drive-scsi0.raw", "qemu-server.conf"]
    finally:
        rc, out, err = run_vmafs("umount", "--json", full)
    assert rc == 0 and json.loads(out)["ok"], err
    assert (full / "mine.txt").read_text() == "mine"


# -- one JSON vocabulary -------------------------------------------------------------------------

def documented_keys() -> set[str]:
    """The keys vmafs(1) defines in its JSON OUTPUT section."""
    text = (MAN / "vmafs.1").read_text().replace("\\-", "-").replace("\\fB", "").replace(
        "\\fR", "").replace("\\fI", "")
    section = text.split(".SH JSON OUTPUT", 1)[1].split("\n.SH ", 1)[0]
    keys = set()
    for line in section.splitlines():
        if line.startswith(".B "):
            keys |= {k.strip() for k in line[3:].split(",")}
    keys |= set(re.findall(r"\b([a-z_]+(?:_hex)?)\b", section)) & {
        "dev_id", "file", "format", "image", "node", "kind", "message", "device", "cluster",
        "offset", "name", "size"}
    return keys


def keys_of(doc: Any, prefix: str = "") -> set[tuple[str, str]]:
    """(key, where) for every key of an object and of the objects in its lists."""
    found = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            found.add((k, prefix))
            found |= keys_of(v, f"{prefix}.{k}")
    elif isinstance(doc, list):
        for item in doc:
            found |= keys_of(item, prefix)
    return found


def own_page_mentions(command: str, key: str) -> bool:
    page = MAN / f"vmafs-{command}.1"
    return page.exists() and key in page.read_text().replace("\\-", "-").replace("\\_", "_")


def undocumented_json_keys(command: str, doc: dict[str, Any]) -> list[str]:
    """Keys of a command's --json that neither vmafs(1) nor the command's own page defines."""
    documented = documented_keys()
    return sorted(f"{where}.{key}" for key, where in keys_of(doc)
                  if key not in documented and not own_page_mentions(command, key))


def test_every_command_speaks_one_json_vocabulary(tmp_path: Path, disk: Path,
                                                  archive: Path) -> None:
    plain = VECTORS / "proxmox" / "sample-2disks.vma"
    runs: dict[str, list[str | os.PathLike[str]]] = {
        "create": ["create", "-q", "-o", tmp_path / "c.vma.zst", f"drive-scsi0={disk}"],
        "list": ["list", archive],
        "config": ["config", archive],
        "verify": ["verify", "-q", archive],
        "extract": ["extract", "-q", archive, tmp_path / "x"],
        "convert": ["convert", "-q", plain, tmp_path / "conv.vma"],
        "prune": ["prune", "-n", "--keep-last", "1", tmp_path],
    }
    for extra in ("info", "snapshots"):
        if (ROOT / "vmafs" / "cli" / f"{extra}.py").exists():
            runs[extra] = [extra, archive if extra == "info" else tmp_path]
    wrong = []
    for command, argv in runs.items():
        rc, out, err = run_vmafs(*argv, "--json")
        assert rc == 0, (command, err)
        doc = json.loads(out)
        assert doc.get("ok") is True, (command, doc)
        wrong += [f"{command}: {k}" for k in undocumented_json_keys(command, doc)]
        devices = doc.get("devices")
        if devices is not None:
            assert isinstance(devices, list) and all(
                isinstance(d, dict) and "name" in d and "device_bytes" in d for d in devices), (
                command, devices)
        for key in ("device_bytes", "stored_bytes", "copied_bytes", "archive_bytes"):
            assert key not in doc or isinstance(doc[key], int), (command, key)
        assert "bytes" not in doc and "dir" not in doc and "path" not in doc, (command, doc)
    assert not wrong, wrong
    # a failure, in every command the same shape
    for command in ("list", "verify", "extract", "info"):
        if command not in runs:
            continue
        args = [command, tmp_path / "missing.vma"] + ([tmp_path / "y"] if command == "extract"
                                                      else [])
        rc, out, err = run_vmafs(*args, "--json")
        doc = json.loads(out)
        assert rc == doc["exit"] and rc != 0 and doc["ok"] is False, (command, doc)
        assert doc["error"] in err


def test_a_presigned_urls_signature_is_never_printed() -> None:
    """Messages and --json show a URL without its query (a presigned URL's signature and key
    id are credentials)."""
    url = "http://127.0.0.1:9/b/a.vma?X-Amz-Credential=AKIDSECRET&X-Amz-Signature=feedface"
    for argv in (["verify", "--json", url], ["info", "--json", url], ["list", url]):
        rc, out, err = run_vmafs(*argv, timeout=120, env={"AWS_MAX_ATTEMPTS": "1"})
        assert rc != 0
        text = out.decode() + err
        assert "AKIDSECRET" not in text and "feedface" not in text, text
        assert "http://127.0.0.1:9/b/a.vma?…" in text, text
