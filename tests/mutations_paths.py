"""Restore and S3 as reading paths of the differential mutation test (tests/mutations.py).

restore (raw, and qcow2 read back by `qemu-img convert`) writes whole disks: where it succeeds,
every byte of every disk must be what extract gives (a verified archive) or what the reference
decides (anything else; an undecided byte in a restored image is a finding), and where it fails
it leaves no file a user could take for an image. An archive read from the S3 gateway must get
the local verdicts and bytes: verify and extract the same; the model's reads (confirmed lazily,
vmafs/archive/extent_check.py) must be the reference's decided bytes or the unmutated
archive's, or an error; where an index was forged to leave clusters out, zeros are let pass
(the known limit that module states: such a cluster reads as zeros from a store).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import mutations as mu


def _expect(m: mu.Mutant, base: mu.Base, inproc: mu.Outcome, stack: contextlib.ExitStack,
            work: Path, archive: str) -> mu.Expect:
    """What every piece must be: extract's files for a verified mutant, else the reference's
    decided bytes (or, where only the container is damaged, the unmutated archive's)."""
    dec = mu.decode(base.container, m.data)
    ref = mu.reference(dec.stream, dec.clean, dec.why)
    images = {}
    if inproc.verify_ok:
        xdir = work / "px"
        shutil.rmtree(xdir, ignore_errors=True)
        stack.callback(shutil.rmtree, xdir, True)
        rc, _, err, _ = mu.run_cli(["extract", "-q", archive, str(xdir)])
        assert rc == 0, err
        images = mu._open_extracted(stack, xdir, ref)
    expect = mu.Expect(bool(inproc.verify_ok), images, ref)
    if base.indexed and any(q.startswith("container:") for q in ref.problems):
        expect.original = mu._original_reference(base)
    return expect


def _visible(top: Path) -> list[str]:
    return sorted(p.name for p in top.rglob("*") if p.is_file() and not p.name.startswith("."))


def check_restore(m: mu.Mutant, base: mu.Base, work: Path, inproc: mu.Outcome
                  ) -> list[mu.Failure]:
    """`vmafs restore` of a mutant, raw and qcow2, judged whole disk by whole disk."""
    out = mu.Outcome(m)
    path = work / ("r" + base.name[base.name.index("."):])
    path.write_bytes(m.data)
    with contextlib.ExitStack() as stack:
        expect = _expect(m, base, inproc, stack, work, str(path))
        for fmt in ("raw", "qcow2"):
            rdir = work / f"restored-{fmt}"
            shutil.rmtree(rdir, ignore_errors=True)
            rc, _, err, exc = mu.run_cli(["restore", "-q", "--format", fmt, "--to", str(rdir),
                                          str(path)])
            what = f"restore-{fmt}"
            mu._no_traceback(out, what, err, exc)
            if rc != 0:
                if inproc.verify_ok and base.random_access:
                    out.fail(what, "refuses-verified", err.strip()[-200:])
                if rdir.is_dir() and _visible(rdir):
                    out.fail(what, "files-left", ", ".join(_visible(rdir)[:5]))
                continue
            for dev_id, dev in expect.ref.devices.items():
                image = rdir / f"disk-{dev.name}.{fmt}"
                if not image.is_file():
                    out.fail(what, "missing-disk", dev.name)
                    continue
                if fmt == "qcow2":
                    raw = rdir / f"disk-{dev.name}.back.raw"
                    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                                    str(image), str(raw)], check=True)
                    image = raw
                got = image.read_bytes()
                if len(got) != dev.size:
                    out.fail(what, "wrong-size", f"{dev.name}: {len(got)} != {dev.size}")
                    continue
                for off in range(0, dev.size, mu.CLUSTER):
                    mu._judge(out, what, expect, dev_id, off, mu.CLUSTER,
                              got[off:off + mu.CLUSTER], "")
            shutil.rmtree(rdir, ignore_errors=True)
    return out.failures


def check_s3(m: mu.Mutant, base: mu.Base, work: Path, inproc: mu.Outcome, url: str,
             put: object) -> list[mu.Failure]:
    """The mutant as an object of the gateway (put(url) stores it): verify and extract get the
    local verdicts, and the model's reads of it are judged as the local model's."""
    from vmafs.archive.reader import Archive
    from vmafs.errors import VmafsError

    out = mu.Outcome(m)
    local = work / ("s" + base.name[base.name.index("."):])
    local.write_bytes(m.data)
    put(m.data)  # type: ignore[operator]
    rc, _, err, exc = mu.run_cli(["verify", "-q", url])
    mu._no_traceback(out, "s3-verify", err, exc)
    if (rc == 0) != bool(inproc.verify_ok):
        out.fail("s3-verify", "verdict-differs", f"rc {rc} locally {inproc.verify_ok}: "
                 f"{err.strip()[-160:]}")
    with contextlib.ExitStack() as stack:
        expect = _expect(m, base, inproc, stack, work, str(local))
        xdir = work / "sx"
        shutil.rmtree(xdir, ignore_errors=True)
        stack.callback(shutil.rmtree, xdir, True)
        rc, _, err, exc = mu.run_cli(["extract", "-q", url, str(xdir)])
        mu._no_traceback(out, "s3-extract", err, exc)
        if (rc == 0) != bool(inproc.verify_ok):
            out.fail("s3-extract", "verdict-differs", f"rc {rc}: {err.strip()[-160:]}")
        if rc == 0:
            for dev_id, dev in expect.ref.devices.items():
                got = (xdir / f"disk-{dev.name}.raw").read_bytes()
                for off in range(0, dev.size, mu.CLUSTER):
                    mu._judge(out, "s3-extract", expect, dev_id, off, mu.CLUSTER,
                              got[off:off + mu.CLUSTER], "")
        elif xdir.is_dir() and _visible(xdir):
            out.fail("s3-extract", "files-left", ", ".join(_visible(xdir)[:5]))
        # the store's known limit (extent_check.py): a cluster a forged index leaves out
        # reads as zeros; every other piece is judged
        drops = json.loads(m.params).get("op") in ("row-drop", "in-last-cluster")
        # a store's archive is confirmed lazily: it may serve what its checks prove where a
        # local open refuses the archive whole, so only the archive's own bytes
        expect.original = mu._original_reference(base)
        try:
            archive = Archive.open(url)
        except VmafsError as e:
            if inproc.verify_ok and base.random_access and type(e).__name__ != "NotSeekableError":
                out.fail("s3-model", "refuses-verified", f"{type(e).__name__}: {e}")
            return out.failures
        with archive:
            devs = {d.dev_id: d.size for d in archive.devices}
            for dev_id, off, length in mu.pieces(devs, random.Random(f"pieces|{m.id}")):
                try:
                    got_piece: bytes | None = bytes(archive.read(dev_id, off, length))
                    text = ""
                except VmafsError as e:
                    got_piece, text = None, f"{type(e).__name__}: {e}"
                if drops and got_piece is not None and not any(got_piece):
                    continue
                mu._judge(out, "s3-model", expect, dev_id, off, length, got_piece, text)
    os.unlink(local)
    return out.failures
