"""Output files: create, convert and extract write through fresh exclusive temporary files,
never through a symlink, never over a file the user had (extract only with --force, and then
replacing a symlink, not following it), and a failed command removes only its own temporary
files."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from conftest import assert_one_line_error, run_vmafs

import vmafs.container.output as output
from vmafs.archive.writer import ArchiveWriter, DeviceSpec
from vmafs.container.output import TempFile, open_dir, open_output, rename_noreplace
from vmafs.errors import VmafsError

CLUSTER = 65536
needs_qemu_img = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                    reason="qemu-img not installed")


def make_archive(path: Path) -> Path:
    with open_output(str(path)) as out:
        w = ArchiveWriter(out, [DeviceSpec("drive-scsi0", 2 * CLUSTER)],
                          [("qemu-server.conf", b"cores: 1\n")])
        w.write(1, 0, b"\x07" * CLUSTER)
        w.finish()
    return path


class Victim:
    """A file outside the output directory that symlinks point at: must stay as it is."""

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "victim"
        self.path.write_bytes(b"precious")
        os.chmod(self.path, 0o600)

    def untouched(self) -> bool:
        st = self.path.stat()
        return self.path.read_bytes() == b"precious" and stat.S_IMODE(st.st_mode) == 0o600


def listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


# --- the primitive ------------------------------------------------------------------------------


def test_temp_file_is_fresh_and_commits_without_replacing(tmp_path: Path) -> None:
    (tmp_path / "out.part").write_bytes(b"user's")
    with open_dir(str(tmp_path)) as dfd:
        t = TempFile(dfd, b"out")
        name = os.fsdecode(t.name)
        assert name.startswith(".out.") and name.endswith(".part") and len(name) == 16
        os.write(t.fd, b"new")
        (tmp_path / "out").write_bytes(b"appeared meanwhile")
        with pytest.raises(VmafsError, match="out exists"):
            t.commit()
        t.discard()
        assert listing(tmp_path) == ["out", "out.part"]
        assert (tmp_path / "out").read_bytes() == b"appeared meanwhile"
        t = TempFile(dfd, b"out2")
        os.write(t.fd, b"new")
        t.commit()
        t.discard()  # after a commit: nothing to do
    assert (tmp_path / "out2").read_bytes() == b"new"
    assert stat.S_IMODE((tmp_path / "out2").stat().st_mode) == 0o644 & ~output.current_umask()
    assert (tmp_path / "out.part").read_bytes() == b"user's"


def test_temp_file_retries_a_taken_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = Victim(tmp_path)
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(victim.path, d / ".x.aaaaaa.part")
    (d / ".x.bbbbbb.part").write_bytes(b"mine")
    names = iter([b".x.aaaaaa.part", b".x.bbbbbb.part", b".x.cccccc.part"])
    monkeypatch.setattr(output, "temp_name", lambda final: next(names))
    with open_dir(str(d)) as dfd:
        t = TempFile(dfd, b"x")
        assert t.name == b".x.cccccc.part"
        t.discard()
    assert victim.untouched()
    assert (d / ".x.bbbbbb.part").read_bytes() == b"mine"
    assert listing(d) == [".x.aaaaaa.part", ".x.bbbbbb.part"]


def test_temp_name_fits_name_max() -> None:
    assert len(output.temp_name(b"a" * 255)) == 255


@pytest.mark.parametrize("renameat2", [True, False])
def test_rename_noreplace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          renameat2: bool) -> None:
    """renameat2(RENAME_NOREPLACE), or the hard-link fallback: neither replaces a file or a
    (dangling) symlink."""
    if not renameat2:
        monkeypatch.setattr(output, "_RENAMEAT2", None)
    victim = Victim(tmp_path)
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "b").write_bytes(b"b")
    os.symlink(victim.path, tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with open_dir(str(tmp_path)) as dfd:
        for dst in (b"b", b"link", b"dangling"):
            with pytest.raises(FileExistsError):
                rename_noreplace(dfd, b"a", dst)
        rename_noreplace(dfd, b"a", b"c")
    assert listing(tmp_path) == ["b", "c", "dangling", "link", "victim"]
    assert (tmp_path / "c").read_bytes() == b"a" and (tmp_path / "b").read_bytes() == b"b"
    assert victim.untouched()


def test_open_output_failure_removes_only_its_temp(tmp_path: Path) -> None:
    (tmp_path / "a.vma.part").write_bytes(b"user's")
    with pytest.raises(RuntimeError), open_output(str(tmp_path / "a.vma")) as out:
        out.write(b"x" * 1000)
        assert len(listing(tmp_path)) == 2  # a.vma.part and the hidden temp
        raise RuntimeError("boom")
    assert listing(tmp_path) == ["a.vma.part"]
    assert (tmp_path / "a.vma.part").read_bytes() == b"user's"


def test_open_output_refuses_existing_final(tmp_path: Path) -> None:
    victim = Victim(tmp_path)
    os.symlink(victim.path, tmp_path / "l.vma")
    with pytest.raises(VmafsError, match="l.vma exists"), open_output(str(tmp_path / "l.vma")):
        pytest.fail("no work may start")
    assert victim.untouched() and os.path.islink(tmp_path / "l.vma")


# --- create and convert -------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "img" / "disk.raw"
    img.parent.mkdir()
    with open(img, "wb") as f:
        f.truncate(4 * CLUSTER)
        f.seek(CLUSTER)
        f.write(b"\x05" * 4096)
    return img


@needs_qemu_img
def test_create_ignores_symlinked_part_and_keeps_user_part(tmp_path: Path, image: Path) -> None:
    victim = Victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim.path, out / "a.vma.part")
    (out / "b.vma.part").write_bytes(b"user's")
    for name in ("a.vma", "b.vma"):
        rc, _, err = run_vmafs("create", "-q", "-o", out / name, f"drive-scsi0={image}")
        assert rc == 0, err
    assert victim.untouched()
    assert os.path.islink(out / "a.vma.part")
    assert (out / "b.vma.part").read_bytes() == b"user's"
    assert listing(out) == ["a.vma", "a.vma.part", "b.vma", "b.vma.part"]
    assert run_vmafs("verify", out / "a.vma")[0] == 0
    assert stat.S_IMODE((out / "a.vma").stat().st_mode) == 0o644 & ~output.current_umask()


@needs_qemu_img
def test_create_never_replaces_the_final_name(tmp_path: Path, image: Path) -> None:
    victim = Victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "have.vma").write_bytes(b"old archive")
    os.symlink(victim.path, out / "link.vma.zst")
    for name in ("have.vma", "link.vma.zst"):
        rc, _, err = run_vmafs("create", "-q", "-o", out / name, f"drive-scsi0={image}")
        assert_one_line_error(rc, err, f"{name} exists")
    assert (out / "have.vma").read_bytes() == b"old archive"
    assert victim.untouched() and os.path.islink(out / "link.vma.zst")
    assert listing(out) == ["have.vma", "link.vma.zst"]


@needs_qemu_img
def test_create_failing_leaves_user_files(tmp_path: Path, image: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.vma.part").write_bytes(b"user's")
    rc, _, err = run_vmafs("create", "-q", "-o", out / "a.vma", f"drive-scsi0={image}",
                           f"drive-scsi1={tmp_path / 'missing.raw'}")
    assert_one_line_error(rc, err, "missing.raw")
    assert listing(out) == ["a.vma.part"]
    assert (out / "a.vma.part").read_bytes() == b"user's"


def test_convert_symlinks_and_failure(tmp_path: Path) -> None:
    src = make_archive(tmp_path / "src.vma")
    victim = Victim(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(victim.path, out / "c.vma.zst.part")
    (out / "d.vma.part").write_bytes(b"user's")
    rc, _, err = run_vmafs("convert", "-q", src, out / "c.vma.zst")
    assert rc == 0, err
    rc, _, err = run_vmafs("convert", "-q", src, out / "c.vma.zst")
    assert_one_line_error(rc, err, "c.vma.zst exists")
    # a convert that fails half-way (the input is cut inside its data) leaves the user's
    # d.vma.part and no temporary file of its own
    cut = tmp_path / "cut.vma"
    cut.write_bytes(src.read_bytes()[:20000])
    rc, _, err = run_vmafs("convert", "-q", cut, out / "d.vma")
    assert_one_line_error(rc, err)
    assert listing(out) == ["c.vma.zst", "c.vma.zst.part", "d.vma.part"]
    assert (out / "d.vma.part").read_bytes() == b"user's"
    assert victim.untouched()
    assert run_vmafs("verify", out / "c.vma.zst")[0] == 0


# --- extract ------------------------------------------------------------------------------------


def test_extract_ignores_part_files_and_symlinks(tmp_path: Path) -> None:
    src = make_archive(tmp_path / "src.vma")
    victim = Victim(tmp_path)
    x = tmp_path / "x"
    x.mkdir()
    os.symlink(victim.path, x / "disk-drive-scsi0.raw.part")
    (x / "qemu-server.conf.part").write_bytes(b"user's")
    rc, _, err = run_vmafs("extract", "-q", src, x)
    assert rc == 0, err
    assert victim.untouched()
    assert listing(x) == ["disk-drive-scsi0.raw", "disk-drive-scsi0.raw.part",
                          "qemu-server.conf", "qemu-server.conf.part"]
    assert (x / "qemu-server.conf.part").read_bytes() == b"user's"
    assert (x / "disk-drive-scsi0.raw").read_bytes() == b"\x07" * CLUSTER + bytes(CLUSTER)
    mode = 0o644 & ~output.current_umask()
    assert stat.S_IMODE((x / "qemu-server.conf").stat().st_mode) == mode


def test_extract_force_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    src = make_archive(tmp_path / "src.vma")
    victim = Victim(tmp_path)
    x = tmp_path / "x"
    x.mkdir()
    os.symlink(victim.path, x / "qemu-server.conf")
    rc, _, err = run_vmafs("extract", "-q", src, x)
    assert_one_line_error(rc, err, "qemu-server.conf exists", "--force")
    assert listing(x) == ["qemu-server.conf"] and victim.untouched()
    rc, _, err = run_vmafs("extract", "-q", "--force", src, x)
    assert rc == 0, err
    assert not os.path.islink(x / "qemu-server.conf")
    assert (x / "qemu-server.conf").read_bytes() == b"cores: 1\n"
    assert victim.untouched()
    assert listing(x) == ["disk-drive-scsi0.raw", "qemu-server.conf"]
    # a directory in the way is refused before any work, even with --force
    (x / "qemu-server.conf").unlink()
    (x / "qemu-server.conf").mkdir()
    rc, _, err = run_vmafs("extract", "-q", "--force", src, x)
    assert_one_line_error(rc, err, "is a directory")


def test_failed_extract_keeps_everything_the_user_had(tmp_path: Path) -> None:
    """--force or not, a failed extract deletes nothing and overwrites nothing."""
    src = make_archive(tmp_path / "src.vma")
    bad = tmp_path / "bad.vma"
    data = bytearray(src.read_bytes())
    data[-(CLUSTER // 2)] ^= 1  # inside the stored data or the index: the scan fails
    bad.write_bytes(data[:len(data) - 600])  # and cut, so it fails whatever was hit
    x = tmp_path / "x"
    x.mkdir()
    (x / "disk-drive-scsi0.raw").write_bytes(b"old disk")
    (x / "disk-drive-scsi0.raw.part").write_bytes(b"user's")
    rc, _, err = run_vmafs("extract", "-q", "--force", bad, x)
    assert_one_line_error(rc, err)
    assert listing(x) == ["disk-drive-scsi0.raw", "disk-drive-scsi0.raw.part"]
    assert (x / "disk-drive-scsi0.raw").read_bytes() == b"old disk"
    assert (x / "disk-drive-scsi0.raw.part").read_bytes() == b"user's"

