"""Red-team findings, each a test that failed before its fix: what a careless user or an
attacker leaves in a backup directory or points a command at must never cost a backup, nor
write over what a device holds."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import run_vmafs

sys.path.insert(0, str(Path(__file__).resolve().parent))

import prune_fuzz as pf  # noqa: E402

pytest_plugins = ["rgw"]  # the S3 gateway for the prefix's test
if TYPE_CHECKING:
    from rgw import S3Env


def _chain(d: Path) -> list[Path]:
    d.mkdir()
    return pf.build_chain(d, [pf.vzname(day) for day in (1, 2, 3)], random.Random(5))


@pytest.mark.parametrize("of", ["full", "newest"])
def test_prune_counts_no_truncated_copy_as_a_kept_backup(tmp_path: Path, of: str) -> None:
    """A `cp` killed half-way under a newer vzdump name (an archive copied back from
    elsewhere) is no backup: keep-last 1 kept it and removed the whole readable chain. It is
    left alone now (kept, counted by no option), and the newest readable backup is kept."""
    d = tmp_path / "dump"
    full, inc1, inc2 = _chain(d)
    want = pf.contents(inc2)
    broken = d / pf.vzname(9)
    shutil.copyfile(full if of == "full" else inc2, broken)
    pf.truncate(broken, 0.6)
    for dry in (True, False):
        rc, out, err = run_vmafs("prune", d, "--keep-last", "1", "--json",
                                 *(["-n"] if dry else []))
        assert rc == 0 and "Traceback" not in err, err
        doc = json.loads(out)
        keep = {a["name"]: a["keep"] for a in doc["archives"]}
        assert keep == {inc2.name: True, inc1.name: True, full.name: True}, keep
        assert [a["name"] for a in doc["left_alone"]] == [broken.name]
        assert "keep option" in doc["left_alone"][0]["reason"]
    assert broken.exists() and pf.contents(inc2) == want


def test_prune_counts_no_zst_copy_cut_at_a_frame_boundary(tmp_path: Path) -> None:
    """A .vma.zst cut short at a frame boundary has no seek table, so it looked like vzdump's
    one-frame .vma.zst (readable only start to end, not checked): keep-last 1 kept it and
    removed the readable archive. vmafs's first frame is the header alone, so a file that
    goes on after it without a seek table is an archive cut short; left alone now."""
    from mutations import parse_seek_table

    d = tmp_path / "dump"
    d.mkdir()
    good = d / pf.vzname(1, zstd=True)
    pf.write(good, {c: random.Random(c).randbytes(pf.C) for c in range(4)})
    data = good.read_bytes()
    frames = parse_seek_table(data)
    assert frames is not None and len(frames) >= 3
    cut = d / pf.vzname(9, zstd=True)
    cut.write_bytes(data[:frames[0][0] + frames[1][0]])  # the header frame and one more
    rc, out, err = run_vmafs("prune", d, "--keep-last", "1", "--json")
    assert rc == 0 and "Traceback" not in err, err
    doc = json.loads(out)
    assert {a["name"]: a["keep"] for a in doc["archives"]} == {good.name: True}, doc
    assert [a["name"] for a in doc["left_alone"]] == [cut.name]
    assert good.exists() and cut.exists()
    # info called it vzdump's one-frame .vma.zst ("convert it to mount"), exit 0
    rc, _, err = run_vmafs("info", cut)
    assert rc == 3 and "cut short" in err, err
    rc, out, err = run_vmafs("snapshots", d, "--json")  # it was listed as a good backup
    assert rc == 0, err
    doc = json.loads(out)
    assert [s["name"] for s in doc["snapshots"]] == [good.name]
    assert [u["name"] for u in doc["unreadable"]] == [cut.name]


KILLED_WRITER = """import os, signal, sys
from vmafs.container.output import TempFile
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
tmp = TempFile(fd, sys.argv[2].encode())
os.write(tmp.fd, b"half an archive" * 1000)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_prune_sweeps_what_killed_runs_left_never_a_live_one(tmp_path: Path) -> None:
    """A command killed outright leaves .NAME.XXXXXX.part, and nothing ever removed one: a
    nightly backup killed now and then filled the disk. prune removes those unchanged for an
    hour that no running command holds (a TempFile is locked until renamed); never a live
    one, a recent one, a symlink, nor another program's."""
    from vmafs.container.output import TempFile, open_dir

    d = tmp_path / "dump"
    full, _, inc2 = _chain(d)
    want = pf.contents(inc2)
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(d), pf.vzname(9)],
                          capture_output=True)
    assert proc.returncode == -9, proc.stderr
    (killed,) = [p for p in d.iterdir() if p.name.endswith(".part")]
    recent = d / f".{pf.vzname(8)}.0a1b2c.part"
    recent.write_bytes(b"x")
    other = d / ".notes.txt.0a1b2c.part"
    other.write_bytes(b"x")
    link = d / f".{pf.vzname(7)}.abcdef.part"
    link.symlink_to(full.name)
    hour_ago = os.stat(full).st_mtime - 7200
    with open_dir(str(d)) as dir_fd:
        live = TempFile(dir_fd, pf.vzname(6).encode())  # a run writing right now
        try:
            os.write(live.fd, full.read_bytes())  # (its header on disk: prune goes on)
            for p in (killed, other, d / live.name.decode()):
                os.utime(p, (hour_ago, hour_ago))
            os.utime(link, (hour_ago, hour_ago), follow_symlinks=False)
            before = sorted(p.name for p in d.iterdir())
            rc, _, err = run_vmafs("prune", d, "--keep-last", "5", "-n")
            assert rc == 0 and f"{killed.name}: the temporary file" in err, err
            assert sorted(p.name for p in d.iterdir()) == before
            rc, _, err = run_vmafs("prune", d, "--keep-last", "5")
            assert rc == 0 and err.count("temporary file") == 1, err
            assert sorted(p.name for p in d.iterdir()) == [n for n in before
                                                           if n != killed.name]
            live.commit()  # the live run goes on to its end
        finally:
            live.discard()
    assert (d / pf.vzname(6)).exists() and pf.contents(inc2) == want


def test_boot_escapes_what_the_archive_says(tmp_path: Path) -> None:
    """`vmafs boot` printed notes made of the archive's device names and config values, and
    with --print a command line carrying the config's VM name, as they were: a crafted
    archive's ESC sequences reached the terminal (retitle it, clear it, fake output)."""
    from vmafs.archive.writer import ArchiveWriter, DeviceSpec
    from vmafs.container.output import open_output

    archive = tmp_path / "crafted.vma"
    conf = b"name: vm\x1b[2J\x1b]0;owned\x07\nscsihw: \x1b[31mred\nmemory: 64\n"
    with open_output(str(archive)) as out:
        w = ArchiveWriter(out, [DeviceSpec("disk\x1b]0;owned\x07", pf.C)],
                          [("qemu-server.conf", conf)])
        w.write(1, 0, b"x" * pf.C)
        w.finish()
    rc, out, err = run_vmafs("boot", archive, "--print")
    assert rc == 0, err
    assert b"\x1b" not in out and b"\x07" not in out, out
    assert "\x1b" not in err and "\x07" not in err, err
    assert "not a Proxmox drive name" in err and "scsihw" in err


def test_live_restore_never_prints_a_device_name_into_a_command_line(tmp_path: Path) -> None:
    """A live restore names each QEMU drive by its device and prints the -drive arguments
    to paste into QEMU's command line, unquoted: a crafted device name added QEMU options
    (a comma) or, pasted into a shell, ran a command ($(...)). A name that is no QEMU id is
    refused before anything is made; the printed arguments are shell-quoted."""
    from vmafs.archive.writer import ArchiveWriter, DeviceSpec
    from vmafs.container.output import open_output

    archive = tmp_path / "crafted.vma"
    with open_output(str(archive)) as out:
        w = ArchiveWriter(out, [DeviceSpec("drive-scsi0,snapshot=on $(touch PWNED)", pf.C)],
                          [("qemu-server.conf", b"scsi0: x\n")])
        w.write(1, 0, b"x" * pf.C)
        w.finish()
    out_dir = tmp_path / "out"
    rc, _, err = run_vmafs("restore", "--live", archive, "--to", out_dir, "--qmp",
                           tmp_path / "qmp.sock", timeout=60)
    assert rc == 1 and "cannot be a QEMU drive id" in err, err
    assert not out_dir.exists() or not list(out_dir.iterdir())


def test_damage_reports_escape_the_device_name(tmp_path: Path) -> None:
    """A checksum mismatch (or a cut-off cluster) named the device as the archive spells it:
    a crafted name's ESC sequences reached the terminal with the error of every reader of
    the model (restore, merge, mount)."""
    from vmafs.archive.writer import ArchiveWriter, DeviceSpec
    from vmafs.container.output import open_output

    archive = tmp_path / "crafted.vma"
    with open_output(str(archive)) as out:
        w = ArchiveWriter(out, [DeviceSpec("d\x1b]0;owned\x07", 4 * pf.C)],
                          [("qemu-server.conf", b"x\n")])
        for c in range(4):
            w.write(1, c * pf.C, random.Random(c).randbytes(pf.C))
        w.finish()
    pf.damage_data(archive)
    rc, _, err = run_vmafs("restore", archive, "--to", tmp_path / "r")  # (raw: scan.py's)
    assert rc == 3 and "checksum mismatch" in err and "\x1b" not in err, err
    assert "d\\x1b]0;owned\\x07" in err, err


def _loop(backing: Path) -> str:
    return subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.mark.parametrize("at", [64 << 10, "end"])
def test_restore_onto_a_device_looks_past_its_first_4k(tmp_path: Path, at: int | str) -> None:
    """A device whose first 4 KiB are zero can still hold a file system or a pool: btrfs's
    superblock is at 64 KiB (mkfs zeroes the MiB before it), bcache's at 4 KiB, a ZFS label's
    first 8 KiB are blank, md's 0.90/1.0 superblock and ZFS's last labels are at the end.
    restore wrote over them without --force; it looks at the first and last MiB now."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    d = tmp_path / "dump"
    full, _, _ = _chain(d)
    backing = tmp_path / "old-disk.img"
    size = 8 << 20
    with open(backing, "wb") as f:
        f.truncate(size)
        f.seek(size - 8192 if at == "end" else int(at))
        f.write(b"_BHRfS_M" * 8)  # a signature, and nothing else on the device
    before = backing.read_bytes()
    dev = _loop(backing)
    try:
        rc, _, err = run_vmafs("restore", full, "--to-device", f"{pf.DEV}={dev}")
        assert rc == 1 and "holds data" in err and "--force" in err, err
        assert backing.read_bytes() == before
        rc, _, err = run_vmafs("restore", full, "--to-device", f"{pf.DEV}={dev}", "--force")
        assert rc == 0, err
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    assert backing.read_bytes()[:pf.SIZE] != before[:pf.SIZE]


def _locked(path: str | Path) -> bool:
    from vmafs.container.output import is_locked

    fd = os.open(path, os.O_RDONLY)
    try:
        return is_locked(fd)
    finally:
        os.close(fd)


def _qemu_holding(path: str | Path, fmt: str) -> subprocess.Popen[bytes]:
    """qemu-io with the image open (and locked, as a running VM holds its disks)."""
    import time

    qemu = subprocess.Popen(["qemu-io", "-f", fmt, str(path)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):  # until QEMU has the image open (a wait, no assertion)
        if _locked(path) or qemu.poll() is not None:
            break
        time.sleep(0.05)
    assert _locked(path), "qemu-io took no lock"
    return qemu


def test_restore_never_writes_onto_a_device_a_vm_runs_on(tmp_path: Path) -> None:
    """O_EXCL refuses a mounted device, not one a running VM uses (QEMU opens its disks
    without it, and locks byte ranges instead): restore --force wrote over the disk under
    the running guest. A locked device is refused now, --force or not."""
    if os.geteuid() != 0 or shutil.which("losetup") is None or not shutil.which("qemu-io"):
        pytest.skip("needs root, losetup and qemu-io")
    d = tmp_path / "dump"
    full, _, _ = _chain(d)
    backing = tmp_path / "vm-disk.img"
    backing.write_bytes(random.Random(2).randbytes(2 << 20))
    before = backing.read_bytes()
    dev = _loop(backing)
    try:
        qemu = _qemu_holding(dev, "raw")
        try:
            rc, _, err = run_vmafs("restore", full, "--to-device", f"{pf.DEV}={dev}",
                                   "--force")
            assert rc == 1 and "in use" in err, err
            assert backing.read_bytes() == before
        finally:
            qemu.kill()
            qemu.wait()
        rc, _, err = run_vmafs("restore", full, "--to-device", f"{pf.DEV}={dev}", "--force")
        assert rc == 0, err
    finally:
        subprocess.run(["losetup", "-d", dev], check=True)
    assert backing.read_bytes() != before


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_restore_force_never_replaces_an_image_a_vm_runs_on(tmp_path: Path, fmt: str) -> None:
    """--force replaced an image in DIR that a running VM had open: the guest went on
    writing into a file no name reached any more, and lost it all at its next start. Such
    an image (locked by QEMU) is refused now."""
    if not shutil.which("qemu-io") or not shutil.which("qemu-img"):
        pytest.skip("needs qemu-io and qemu-img")
    d = tmp_path / "dump"
    full, _, _ = _chain(d)
    out = tmp_path / "vm"
    out.mkdir()
    image = out / f"disk-{pf.DEV}.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "1M"], check=True)
    inode = image.stat().st_ino
    qemu = _qemu_holding(image, fmt)
    try:
        rc, _, err = run_vmafs("restore", full, "--to", out, "--format", fmt, "--force")
        assert rc == 1 and "in use" in err, err
        assert image.stat().st_ino == inode and not (out / "qemu-server.conf").exists()
    finally:
        qemu.kill()
        qemu.wait()
    rc, _, err = run_vmafs("restore", full, "--to", out, "--format", fmt, "--force")
    assert rc == 0, err
    assert image.stat().st_ino != inode


def test_prune_keeps_the_chain_of_a_backup_being_written(tmp_path: Path) -> None:
    """An incremental backup still running is only a .NAME.XXXXXX.part, which prune did not
    look at: run at the same time (two cron jobs), it removed the parent chain the backup
    links to, and the backup was useless once done. Its (locked) temporary file's header
    says what it needs now, and that stays."""
    from vmafs.archive.chain import link_to
    from vmafs.archive.reader import Archive
    from vmafs.archive.writer import ArchiveWriter, DeviceSpec
    from vmafs.container.output import open_output
    from vmafs.format import chain

    d = tmp_path / "dump"
    d.mkdir()
    full_a, inc_a = pf.build_chain(d, [pf.vzname(1), pf.vzname(2)], random.Random(3))
    pf.write(d / pf.vzname(3), {0: b"b" * pf.C})  # a newer full backup
    with Archive.open(str(inc_a), layer=True) as parent:
        record = chain.encode(chain.ChainRecord(parent=link_to(parent)))
    running = d / pf.vzname(4)
    with open_output(str(running)) as out:  # the backup, still being written
        w = ArchiveWriter(out, [DeviceSpec(pf.DEV, pf.SIZE)],
                          [pf.CONF, (chain.CONFIG_NAME, record)], incremental=[1])
        w.write(1, 0, b"c" * pf.C)  # held in the writer: nothing on disk yet
        rc, _, err = run_vmafs("prune", d, "--keep-last", "1")
        assert rc == 1 and "run prune again when it is done" in err, err
        assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) == [
            full_a.name, inc_a.name, pf.vzname(3)]
        w._flush_extent()  # noqa: SLF001 - out to disk, as a backup's first MiBs go
        out._flush_buf()  # type: ignore[attr-defined]  # noqa: SLF001
        rc, stdout, err = run_vmafs("prune", d, "--keep-last", "1", "--json")
        assert rc == 0 and "Traceback" not in err, err
        keep = {a["name"]: a["keep"] for a in json.loads(stdout)["archives"]}
        assert keep == {pf.vzname(3): True, inc_a.name: True, full_a.name: True}, keep
        w.finish()
    assert pf.contents(running) is not None  # done, and its chain is all there


def _zst_cut_at_a_frame(good: Path, cut: Path) -> None:
    """good's bytes up to the end of its second frame (a copy killed there)."""
    from mutations import parse_seek_table

    data = good.read_bytes()
    frames = parse_seek_table(data)
    assert frames is not None and len(frames) >= 3
    cut.write_bytes(data[:frames[0][0] + frames[1][0]])


def test_prune_and_snapshots_on_a_prefix_decide_as_on_a_directory(s3: S3Env,
                                                                   tmp_path: Path) -> None:
    """A .vma.zst cut short at a frame boundary was told from vzdump's one-frame .vma.zst
    only in a local directory (lost_seek_table skipped an object): on an S3 prefix prune
    keep-last 1 kept the cut copy as the newest backup and removed the readable chain, and
    snapshots listed it as a good backup. The same objects now get the same verdicts."""
    d = tmp_path / "dump"
    full, _, inc2 = _chain(d)
    good = d / pf.vzname(5, zstd=True)
    pf.write(good, {c: random.Random(c).randbytes(pf.C) for c in range(4)})
    _zst_cut_at_a_frame(good, d / pf.vzname(9, zstd=True))
    shutil.copyfile(full, d / pf.vzname(8))
    pf.truncate(d / pf.vzname(8), 0.6)  # a plain copy killed half-way
    for path in sorted(d.iterdir()):
        s3.put("p/" + path.name, path.read_bytes())

    def verdicts(where: str) -> tuple[object, ...]:
        rc, out, err = run_vmafs("prune", where, "--keep-last", "1", "--json", "-n")
        assert rc == 0 and "Traceback" not in err, err
        doc = json.loads(out)
        rc, snap, err = run_vmafs("snapshots", where, "--json")
        assert rc == 0 and "Traceback" not in err, err
        shown = json.loads(snap)
        return ({a["name"]: a["keep"] for a in doc["archives"]},
                sorted(a["name"] for a in doc["left_alone"]),
                [s["name"] for s in shown["snapshots"]],
                sorted(u["name"] for u in shown["unreadable"]))

    local = verdicts(str(d))
    assert local[0] == {good.name: True, inc2.name: False, pf.vzname(2): False,
                        full.name: False}, local
    assert local[1] == [pf.vzname(8), pf.vzname(9, zstd=True)], local
    assert verdicts(s3.url("p/")) == local
    rc, _, err = run_vmafs("info", s3.url("p/" + pf.vzname(9, zstd=True)))
    assert rc == 3 and "cut short" in err, err
    rc, _, err = run_vmafs("prune", s3.url("p/"), "--keep-last", "1")
    assert rc == 0, err
    assert s3.keys("p/") == sorted(f"p/{n}" for n in (good.name, pf.vzname(8),
                                                      pf.vzname(9, zstd=True)))


@pytest.mark.parametrize("how", ["copy", "convert"])
def test_prune_counts_a_copy_of_a_backup_once(tmp_path: Path, how: str) -> None:
    """A backup copied under a newer vzdump name (copied back from elsewhere), or converted
    beside itself (NAME.vma -> NAME.vma.zst), counted as one more backup: keep-last 2 kept
    the two copies of one backup and removed the backup before it. Archives with one uuid
    are one backup now: kept together, counted once."""
    d = tmp_path / "dump"
    d.mkdir()
    older, newer = d / pf.vzname(1), d / pf.vzname(2)
    pf.write(older, {0: b"a" * pf.C})
    pf.write(newer, {0: b"b" * pf.C})
    if how == "copy":
        again = d / pf.vzname(3)
        shutil.copyfile(newer, again)
    else:
        again = d / pf.vzname(2, zstd=True)
        rc, _, err = run_vmafs("convert", newer, "-o", again)
        assert rc == 0, err
    rc, out, err = run_vmafs("prune", d, "--keep-last", "2", "--json")
    assert rc == 0 and "Traceback" not in err, err
    keep = {a["name"]: (a["keep"], a["reasons"]) for a in json.loads(out)["archives"]}
    assert keep[older.name] == (True, ["keep-last"]), keep
    assert keep[newer.name][0] and keep[again.name][0], keep
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in (older, newer, again))
    rc, out, err = run_vmafs("prune", d, "--keep-last", "1", "--json")
    assert rc == 0, err
    assert not older.exists() and newer.exists() and again.exists()


def _on_a_terminal(*args: str | Path) -> bytes:
    """What `vmafs ARGS` writes to its stdout when that is a terminal (a pty)."""
    import pty

    from conftest import ROOT

    leader, follower = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "vmafs", *map(str, args)],
                                stdin=subprocess.DEVNULL, stdout=follower,
                                stderr=subprocess.PIPE, env=env, cwd=ROOT)
        os.close(follower)
        got = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command closed its end
                break
            if not chunk:
                break
            got += chunk
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else None
    finally:
        os.close(leader)
    return got.replace(b"\r\n", b"\n")  # (the pty's own line ending)


def test_config_shows_no_escape_sequence_on_a_terminal(tmp_path: Path) -> None:
    """`vmafs config` wrote a config's bytes as the archive holds them, to a terminal too:
    a crafted archive's ESC sequences retitled or cleared it, or faked lines (CR). On a
    terminal they are escaped now (lines and tabs as they are); a file or pipe still gets
    the exact bytes, as `vma config` gives them."""
    from vmafs.archive.writer import ArchiveWriter, DeviceSpec
    from vmafs.container.output import open_output

    conf = (b"name: vm\x1b[2J\x1b]0;owned\x07\n\tmemory: 64\rscsi0: x\xff\xe2\x80\xae\n"
            b"args: -a \\x1b\n")
    archive = tmp_path / "crafted.vma"
    with open_output(str(archive)) as out:
        w = ArchiveWriter(out, [DeviceSpec(pf.DEV, pf.C)], [("qemu-server.conf", conf)])
        w.write(1, 0, b"x" * pf.C)
        w.finish()
    rc, piped, err = run_vmafs("config", archive)
    assert rc == 0 and piped == conf, err
    shown = _on_a_terminal("config", archive)
    assert shown == (b"name: vm\\x1b[2J\\x1b]0;owned\\x07\n\tmemory: 64\\rscsi0: x\\xff"
                     b"\\u202e\nargs: -a \\x1b\n"), shown


class _KillAfterFreeze:
    """A guest-agent socket in front of the VM's: it passes everything on, and SIGKILLs the
    backup the moment the agent answers its guest-fsfreeze-freeze (before the backup sees
    the answer): the guest's file systems are frozen, and the backup is gone."""

    def __init__(self, path: Path, agent: Path) -> None:
        import socket
        import threading

        self.agent = agent
        self.pid = 0
        self.killed = threading.Event()
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(4)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import signal
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(str(self.agent))
            asked = threading.Event()

            def forward(src: socket.socket, dst: socket.socket, answers: bool,
                        asked: threading.Event = asked) -> None:
                with contextlib.suppress(OSError):
                    while data := src.recv(65536):
                        if not answers and b"guest-fsfreeze-freeze" in data:
                            asked.set()
                        if answers and asked.is_set() and b"return" in data and self.pid:
                            os.kill(self.pid, signal.SIGKILL)
                            self.killed.set()
                            return
                        dst.sendall(data)
                for s in (src, dst):
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

            threading.Thread(target=forward, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=forward, args=(upstream, client, True), daemon=True).start()

    def close(self) -> None:
        self.server.close()


def test_a_backup_killed_while_the_guest_is_frozen_leaves_it_thawed(tmp_path: Path) -> None:
    """`vmafs backup --qga` freezes the guest's file systems, starts the jobs and thaws them;
    killed in between (OOM, kill -9 of a backup that seems to hang in the freeze), nothing
    thawed them: the guard cleans QEMU up but knows nothing of the agent, so every write of
    the guest to a frozen file system waited for ever."""
    import time

    import guestimage as gi
    from test_backup import Lab, env, vmafs_cmd

    guest = gi.guest_or_skip()
    run_dir = tmp_path / "run"
    fs = tmp_path / "fs.raw"  # a file system in the guest (the writer's disks have none)
    with open(fs, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(fs)], check=True)
    with Lab(guest, tmp_path, qga=True, extra=[gi.Disk(fs, fmt="raw")]) as lab:
        assert lab.vm.qga_path is not None
        mount = lab.vm.qga("guest-exec", path="/bin/busybox",
                           arg=["sh", "-c", "mkdir -p /m && mount -t ext4 /dev/vdc /m"])
        deadline = time.monotonic() + 30
        while not (done := lab.vm.qga("guest-exec-status", pid=mount["pid"]))["exited"]:
            assert time.monotonic() < deadline, "mount in the guest did not end"
            time.sleep(0.2)
        assert done["exitcode"] == 0, done
        proxy = _KillAfterFreeze(tmp_path / "qga-proxy.sock", lab.vm.qga_path)
        try:
            proc = subprocess.Popen(
                vmafs_cmd("backup", "--qmp", lab.qmp, "--qga", str(tmp_path / "qga-proxy.sock"),
                          "-o", str(tmp_path / "vm.vma"), "-q"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={**env(), "VMAFS_RUN_DIR": str(run_dir)})
            proxy.pid = proc.pid
            proc.wait(timeout=120)
            assert proxy.killed.is_set(), "the backup ended before its freeze was answered"
            assert lab.vm.qga("guest-fsfreeze-status") == "frozen"  # (the kill's moment)
            deadline = time.monotonic() + 10  # the guard's clean-up: a hang guard only
            state = lab.vm.qga("guest-fsfreeze-status")
            while state != "thawed" and time.monotonic() < deadline:
                time.sleep(0.5)
                state = lab.vm.qga("guest-fsfreeze-status")
            assert state == "thawed", "the guest's file systems were left frozen"
        finally:
            proxy.close()
            with contextlib.suppress(Exception):
                lab.vm.qga("guest-fsfreeze-thaw")


def test_prune_on_a_prefix_keeps_what_a_backup_being_uploaded_may_need(s3: S3Env,
                                                                        tmp_path: Path) -> None:
    """A backup to S3 is a multipart upload until it completes, which prune did not look at
    (in a directory it reads the running backup's .part): run beside it, it removed the
    chain the incremental being uploaded links to. An upload's parts cannot be read, so
    every archive of its VM is left alone while it runs; an upload long idle is a killed
    run's and holds nothing."""
    from vmafs.store.s3 import S3Upload

    d = tmp_path / "dump"
    d.mkdir()
    pf.build_chain(d, [pf.vzname(1), pf.vzname(2)], random.Random(3))
    pf.write(d / pf.vzname(3), {0: b"b" * pf.C})  # a newer full backup
    other = d / pf.vzname(1, vmid="200")
    pf.write(other, {0: b"o" * pf.C})
    pf.write(d / pf.vzname(2, vmid="200"), {0: b"p" * pf.C})
    for path in sorted(d.iterdir()):
        s3.put("u/" + path.name, path.read_bytes())
    everything = s3.keys("u/")
    upload = S3Upload(s3.url("u/" + pf.vzname(4)))  # the incremental of VM 100, running
    upload.write(b"x" * 100)
    try:
        rc, out, err = run_vmafs("prune", s3.url("u/"), "--keep-last", "1", "--json")
        assert rc == 0 and "Traceback" not in err, err
        doc = json.loads(out)
        assert sorted(a["name"] for a in doc["left_alone"]) == [
            pf.vzname(k) for k in (1, 2, 3)], doc
        assert s3.keys("u/") == [k for k in everything if k != f"u/{other.name}"]
    finally:
        upload.abort()
    rc, _, err = run_vmafs("prune", s3.url("u/"), "--keep-last", "1")
    assert rc == 0, err
    assert s3.keys("u/") == [f"u/{pf.vzname(3)}", f"u/{pf.vzname(2, vmid='200')}"]


def test_prune_never_removes_an_archive_protected_while_it_ran(tmp_path: Path) -> None:
    """prune read the protection marks once, with the listing, and removed what it planned
    to: an archive protected while it ran (vmafs protect, or the GUI, while prune read a
    stand-in whole for minutes) was removed all the same. Each mark is looked at again right
    before its archive is removed; one protected since stays, and so does its chain."""
    import argparse

    from vmafs.archive import chain, retention
    from vmafs.cli import prune
    from vmafs.store.place import Place

    d = tmp_path / "dump"
    full, inc1, inc2 = _chain(d)
    newer = d / pf.vzname(5)
    pf.write(newer, {0: b"n" * pf.C})
    args = argparse.Namespace(dry_run=False)
    with Place(str(d)) as place:  # prune's steps, with the user's protect in between
        found = prune._scan(str(d), place, None)
        plan = prune._plan(found, retention.KeepOptions(last=1), chain.Prune(str(d)))
        assert {dec.entry.name for dec in plan.removed} == {full.name, inc1.name, inc2.name}
        rc, _, err = run_vmafs("protect", inc2)
        assert rc == 0, err
        sidecars: dict[str, list[str]] = {p.name: [] for p in (full, inc1, inc2)}
        removed = prune._remove(args, place, plan, found, sidecars, chain.Prune(str(d)))
    assert removed == {}
    assert pf.contents(inc2) is not None
