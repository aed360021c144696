"""Incremental chains in S3 (a real RADOS Gateway): an archive's parents are found under its
prefix; list, verify, extract, mount, snapshots and prune work on s3:// prefixes as on
directories, with the same results as on local copies of the same objects."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import fuse_missing, run_vmafs
from prune_fuzz import build_chain, vzname

pytest_plugins = ["rgw"]  # one gateway for the session, whatever module asks
if TYPE_CHECKING:
    from rgw import S3Env


def _upload(s3: S3Env, local: Path, prefix: str) -> None:
    for path in sorted(local.iterdir()):
        s3.put(prefix + path.name, path.read_bytes())


def _disks(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_chains_in_s3(s3: S3Env, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    rng = random.Random(16)
    first = build_chain(local, [vzname(0), vzname(1)], rng)
    second = build_chain(local, [vzname(2), vzname(3, zstd=True)], rng)
    _upload(s3, local, "c/")
    newest = s3.url("c/" + second[-1].name)
    rc, listing, err = run_vmafs("list", newest)
    assert rc == 0 and listing.count(b"CHAIN:") == 2, err
    rc, _, err = run_vmafs("verify", newest)
    assert rc == 0, err
    for archive in (first[-1], second[-1]):
        rc, _, err = run_vmafs("extract", archive, tmp_path / f"want-{archive.name}")
        assert rc == 0, err
        rc, _, err = run_vmafs("extract", s3.url("c/" + archive.name),
                               tmp_path / f"got-{archive.name}")
        assert rc == 0, err
        assert _disks(tmp_path / f"got-{archive.name}") == _disks(
            tmp_path / f"want-{archive.name}")
    # restore (raw images, as extract writes them) from S3
    rc, _, err = run_vmafs("restore", s3.url("c/" + second[-1].name), "--to",
                           tmp_path / "restored", "--format", "raw")
    assert rc == 0, err
    assert _disks(tmp_path / "restored") == _disks(tmp_path / f"want-{second[-1].name}")
    # a parent kept elsewhere: --base
    s3.client.delete_object(Bucket=s3.bucket, Key="c/" + first[0].name)  # type: ignore[attr-defined]
    rc, _, err = run_vmafs("verify", s3.url("c/" + first[-1].name))
    assert rc != 0 and "Traceback" not in err
    rc, _, err = run_vmafs("verify", s3.url("c/" + first[-1].name), "--base", first[0])
    assert rc == 0, err
    s3.put("c/" + first[0].name, first[0].read_bytes())

    # snapshots and prune on the prefix, as on the directory
    rc, out, err = run_vmafs("snapshots", s3.url("c/"), "--json")
    assert rc == 0, err
    rc, want, err = run_vmafs("snapshots", local, "--json")
    assert rc == 0, err
    assert [s["name"] for s in json.loads(out)["snapshots"]] == [
        s["name"] for s in json.loads(want)["snapshots"]]
    rc, plan, err = run_vmafs("prune", s3.url("c/"), "--keep-last", "1", "--dry-run")
    assert rc == 0, err
    assert len(s3.keys("c/")) == 4
    rc, plan, err = run_vmafs("prune", s3.url("c/"), "--keep-last", "1", "--json")
    assert rc == 0, err
    assert s3.keys("c/") == sorted("c/" + p.name for p in second)  # the kept one needs its base
    assert json.loads(plan)["removed"] == 2


@pytest.mark.skipif(fuse_missing() is not None, reason=str(fuse_missing()))
def test_mount_a_chain_from_s3(s3: S3Env, tmp_path: Path) -> None:
    from test_mount import mounted

    local = tmp_path / "local"
    local.mkdir()
    chain = build_chain(local, [vzname(0), vzname(1), vzname(2, zstd=True)], random.Random(3))
    _upload(s3, local, "m/")
    rc, _, err = run_vmafs("extract", chain[-1], tmp_path / "want")
    assert rc == 0, err
    with mounted(s3.url("m/" + chain[-1].name), tmp_path / "mnt") as mnt:  # type: ignore[arg-type]
        for name, data in _disks(tmp_path / "want").items():
            assert (mnt / name).read_bytes() == data


def test_protect_an_archive_in_s3(s3: S3Env, tmp_path: Path) -> None:
    """vmafs protect puts ARCHIVE.protected beside an archive in S3 (only if none is there),
    prune on the prefix keeps it, --remove takes the mark away and prune may then remove it."""
    local = tmp_path / "local"
    local.mkdir()
    rng = random.Random(5)
    old = build_chain(local, [vzname(0)], rng)[0]
    new = build_chain(local, [vzname(1)], rng)[0]
    _upload(s3, local, "p/")
    archive = s3.url("p/" + old.name)
    rc, out, err = run_vmafs("protect", archive, "--json")
    assert rc == 0, err
    assert json.loads(out)["changed"] is True
    assert s3.get("p/" + old.name + ".protected") == b""
    rc, out, err = run_vmafs("protect", archive, "--json")
    assert rc == 0 and json.loads(out)["changed"] is False, err  # already there: no change
    rc, out, err = run_vmafs("snapshots", s3.url("p/"), "--json")
    assert rc == 0, err
    assert [s["protected"] for s in json.loads(out)["snapshots"]] == [True, False]
    rc, _, err = run_vmafs("prune", s3.url("p/"), "--keep-last", "1")
    assert rc == 0, err
    assert s3.keys("p/") == sorted(["p/" + old.name, "p/" + old.name + ".protected",
                                    "p/" + new.name])
    rc, out, err = run_vmafs("protect", "--remove", archive, "--json")
    assert rc == 0 and json.loads(out)["changed"] is True, err
    rc, out, err = run_vmafs("protect", "--remove", archive, "--json")
    assert rc == 0 and json.loads(out)["changed"] is False, err
    rc, _, err = run_vmafs("prune", s3.url("p/"), "--keep-last", "1")
    assert rc == 0, err
    assert s3.keys("p/") == ["p/" + new.name]
    # an archive that is not there, and a URL (read-only), are one-line errors
    rc, _, err = run_vmafs("protect", s3.url("p/" + vzname(9)))
    assert rc != 0 and "no such object" in err and "Traceback" not in err
    url = s3.client.generate_presigned_url(  # type: ignore[attr-defined]
        "get_object", Params={"Bucket": s3.bucket, "Key": "p/" + new.name})
    rc, _, err = run_vmafs("protect", url)
    assert rc != 0 and "read-only" in err and "Signature" not in err, err
