"""The header digest in the index's footer (issue 13, item 14): the data checksums never
covered the header, so a config, device name or size rewritten with a resealed header md5
verified as "data checksums verified". Now the footer carries a SHA-256 of what the header
says, every reader checks it, and a rewrite must reseal two structures. Archives without it
(older vmafs) read exactly as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from pathlib import Path

import pytest
from conftest import assert_one_line_error, fuse_missing, run_vmafs
from test_format_rules import C, make_pair, refused_by_every_command, run_all

from vmafs.archive import locate
from vmafs.archive.reader import Archive
from vmafs.archive.scan import scan_stream
from vmafs.errors import FormatError
from vmafs.format import index, vma

MISMATCH = "does not match the header digest in its vmafs index"


def footer_of(path: Path) -> index.Footer:
    footer = index.decode_footer(vma.null_extent_payload(path.read_bytes()[-512:]))
    assert footer is not None
    return footer


def rewrite(path: Path, old: bytes, new: bytes, *, at: int | None = None) -> None:
    """Replace bytes in the header and reseal only its md5 (what a forger of the header
    alone would do): the footer's digest is left as it was."""
    data = bytearray(path.read_bytes())
    header_size = struct.unpack_from(">I", data, 56)[0]
    pos = data.index(old, 0, header_size) if at is None else at
    data[pos:pos + len(new)] = new
    data[32:48] = bytes(16)
    data[32:48] = hashlib.md5(data[:header_size]).digest()
    path.write_bytes(bytes(data))


def drop_digest(path: Path) -> None:
    """The footer as a vmafs without header digests wrote it."""
    data = bytearray(path.read_bytes())
    footer = footer_of(path)
    uuid = vma.decode_header(bytes(data)).uuid
    plain = dataclasses.replace(footer, header_digest=None)  # its other fields kept
    data[-512:] = vma.encode_null_extents(uuid, index.encode_footer(plain))
    path.write_bytes(bytes(data))


def size_field(path: Path, dev_id: int) -> int:
    return 4096 + 32 * dev_id + 8


@pytest.mark.parametrize("what", ["config", "device name", "device size"])
def test_rewritten_header_is_refused_by_every_reader(tmp_path: Path, what: str) -> None:
    pair = make_pair(tmp_path / "d")
    for path in (pair.base, pair.child):
        if what == "config":
            rewrite(path, b"cores: 1\n", b"cores: 8\n")
        elif what == "device name":
            rewrite(path, b"drive-scsi0\0", b"drive-scsi7\0")
        else:  # 4 clusters -> 4 clusters less a sector: every slot still keeps the rules
            rewrite(path, b"", struct.pack(">Q", 4 * C - 512), at=size_field(path, 1))
    assert vma.decode_header(pair.base.read_bytes())  # a header every rule accepts
    with pytest.raises(FormatError, match=MISMATCH):
        Archive.open(str(pair.base))
    with open(pair.base, "rb") as f:
        assert [p.message for p in scan_stream(f).problems] == [
            "the archive header (configs, device names or sizes) " + MISMATCH]
    if what == "config":  # the same check for every kind of edit: the commands once
        refused_by_every_command(pair.base, tmp_path, MISMATCH, merge=pair.child,
                                 header=False)


def test_list_checks_the_header_digest(tmp_path: Path) -> None:
    pair = make_pair(tmp_path / "d")
    rewrite(pair.base, b"cores: 1\n", b"cores: 8\n")
    for command in ("list", "config"):
        rc, _, err = run_vmafs(command, pair.base)
        assert_one_line_error(rc, err, MISMATCH)
        assert rc == 3


def test_list_check_for_header_only_commands(tmp_path: Path) -> None:
    """What list and config are to call: one footer read, a mismatch raises."""
    pair = make_pair(tmp_path / "d")
    header = vma.decode_header(pair.base.read_bytes())
    assert locate.check_header_at_tail(str(pair.base), header) is True
    assert locate.check_header_at_tail("-", header) is None
    rewrite(pair.base, b"cores: 1\n", b"cores: 8\n")
    with pytest.raises(FormatError, match=MISMATCH):
        locate.check_header_at_tail(str(pair.base), vma.decode_header(pair.base.read_bytes()))


@pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))
def test_rewritten_header_is_not_mounted(tmp_path: Path) -> None:
    pair = make_pair(tmp_path / "d")
    rewrite(pair.base, b"drive-scsi1\0", b"drive-scsi9\0")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rc, _, err = run_vmafs("mount", pair.base, mnt, timeout=60)
    assert_one_line_error(rc, err, MISMATCH)
    assert not os.path.ismount(mnt)


def test_writers_write_it_and_verify_checks_it(tmp_path: Path) -> None:
    """create (the writer), convert (plain and seekable zstd) and merge: each footer holds
    the digest of its own header, and a scan reports it checked."""
    pair = make_pair(tmp_path / "d")
    done = run_all({"convert": ("convert", "-q", pair.base, tmp_path / "c.vma.zst"),
                    "merge": ("merge", "-q", "-o", tmp_path / "m.vma", pair.child),
                    "verify": ("verify", pair.base)})
    for what, (rc, _, err) in done.items():
        assert rc == 0, (what, err)
    for path in (pair.base, tmp_path / "c.vma.zst", tmp_path / "m.vma"):
        with Archive.open(str(path)) as archive:
            footer = locate.find_footer(archive.source, archive.header)
            assert footer is not None and footer.header_digest == vma.header_digest(
                archive.header), path
        if path.suffix == ".vma":
            with open(path, "rb") as f:
                result = scan_stream(f)
            assert result.header_digest and not result.problems


def test_archives_without_it_read_as_before(tmp_path: Path) -> None:
    """A footer without the field (older vmafs): every command reads it, the scan says the
    header was not checked, and a resealed header rewrite is then not found (the known limit
    of what was written before)."""
    pair = make_pair(tmp_path / "d")
    drop_digest(pair.base)
    assert footer_of(pair.base).header_digest is None
    rewrite(pair.base, b"cores: 1\n", b"cores: 8\n")
    done = run_all({"verify": ("verify", pair.base), "list": ("list", pair.base),
                    "extract": ("extract", "-q", pair.base, tmp_path / "x"),
                    "convert": ("convert", "-q", pair.base, tmp_path / "c.vma")})
    for what, (rc, _, err) in done.items():
        assert rc == 0, (what, err)
    with open(pair.base, "rb") as f:
        result = scan_stream(f)
    assert result.has_index and not result.header_digest and not result.problems
    with Archive.open(str(pair.base)) as archive:
        assert archive.indexed
    # convert writes a digest of its own
    assert footer_of(tmp_path / "c.vma").header_digest is not None


def test_footer_fields() -> None:
    """The typed fields after the fixed footer: round trip, unknown ones skipped unless
    critical, nothing but zeros after them, one header digest of 32 bytes."""
    digest = bytes(range(32))
    full = index.Footer(5, 6, 7, digest)
    payload = index.encode_footer(full).ljust(vma.NULL_PAYLOAD_SIZE, b"\0")
    assert index.decode_footer(payload) == full
    assert index.decode_footer(index.encode_footer(index.Footer(5, 6, 7)).ljust(413, b"\0")) \
        == index.Footer(5, 6, 7)
    fixed = index.encode_footer(index.Footer(5, 6, 7))

    def with_fields(*fields: tuple[int, bytes], tail: bytes = b"") -> bytes:
        body = b"".join(struct.pack("<HH", k, len(v)) + v for k, v in fields)
        return (fixed + body + tail).ljust(413, b"\0")

    unknown = with_fields((7, b"mac of the future"), (1, digest))
    assert index.decode_footer(unknown) == full
    for bad, why in ((with_fields((0x8007, b"x")), "not known"),
                     (with_fields((1, digest[:16])), "header digest"),
                     (with_fields((1, digest), (1, digest)), "header digest"),
                     (with_fields((1, digest), tail=b"\0\0\0\0\1"), "after its fields"),
                     (fixed + struct.pack("<HH", 7, 500), "past the footer")):
        with pytest.raises(FormatError, match=why):
            index.decode_footer(bad)
