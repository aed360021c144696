"""`vmafs info`: one archive at a glance, as `qemu-img info` or `borg info` show theirs
(container, sizes, identity, chain), from its header and index: no disk data is read."""

from __future__ import annotations

import argparse
import io
import sys
from datetime import datetime
from typing import Any

from vmafs.archive.describe import NOT_SEEKABLE, Info, describe
from vmafs.cli import COMMANDS
from vmafs.cli.common import add_base, add_json
from vmafs.format.names import display, format_ctime, json_name
from vmafs.progress import human_bytes, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help=COMMANDS["info"],
                       description="Show what an archive is: its container and compression "
                                   "ratio, whether it has a vmafs index (data checksums), its "
                                   "devices' sizes and the data stored for them, uuid, time, "
                                   "VMID, config files, and for an incremental archive its "
                                   "parent and chain (every link checked). Reads headers and "
                                   "the index, no disk data. An archive that can only be read "
                                   "start to end (.vma.gz, .vma.lzo, vzdump's one-frame "
                                   ".vma.zst) is described from its header.")
    p.add_argument("archive", help="archive file: .vma, .vma.zst, .vma.gz, .vma.lzo")
    add_base(p)
    add_json(p)
    p.set_defaults(run=run)


def iso_time(ctime: int) -> str | None:
    """ISO 8601 local time with its offset; None when the platform cannot show that time."""
    try:
        return datetime.fromtimestamp(ctime).astimezone().isoformat()
    except (OverflowError, OSError, ValueError):
        return None


def to_json(info: Info) -> dict[str, Any]:
    devices = []
    for d in info.devices:
        dev: dict[str, Any] = {"dev_id": d.dev_id, **json_name(d.name), "device_bytes": d.size}
        if d.stored is not None:
            dev["stored_bytes"] = d.stored
        devices.append(dev)
    return {
        "ok": True, "archive": info.path, "archive_bytes": info.archive_bytes,
        "container": info.container, "seekable": info.seekable, "mode": info.mode,
        "indexed": info.indexed, "checksums": info.indexed, "block_sums": info.block_sums,
        "stream_bytes": info.stream_bytes,
        "ratio": round(info.ratio, 3) if info.ratio is not None else None,
        "devices": devices, "device_bytes": sum(d.size for d in info.devices),
        "stored_bytes": info.stored_bytes,
        "configs": [{**json_name(n), "size": size} for n, size in info.configs],
        "vmstate_bytes": info.vmstate_bytes,
        "uuid": str(info.uuid), "ctime": info.ctime, "time": iso_time(info.ctime),
        "vmid": info.vmid, "incremental": info.incremental,
        "parent": str(info.parent) if info.parent else None,
        "depth": info.depth,
        "chain": [{"archive": link.path, "uuid": str(link.uuid), "ctime": link.ctime,
                   "incremental": link.incremental, "stored_bytes": link.stored_bytes}
                  for link in info.chain],
        "chain_complete": info.chain_error is None if info.incremental else True,
        "chain_error": info.chain_error,
        "hint": None if info.seekable else NOT_SEEKABLE,
    }


def _size(n: int) -> str:
    return f"{human_bytes(n)} ({n} bytes)"


def lines_of(info: Info) -> list[str]:
    kind = {"vma": "plain VMA", "zstd": "zstd", "gzip": "gzip", "lzo": "lzo"}[info.container]
    if info.container == "zstd":
        kind += " (seekable)" if info.seekable else " (one frame)"
    out = [f"archive: {display(info.path)}", f"container: {kind}",
           f"archive size: {_size(info.archive_bytes)}"]
    if info.stream_bytes is not None and info.container != "vma":
        out.append(f"stream size: {_size(info.stream_bytes)}, ratio {info.ratio:.2f}")
    if not info.seekable:
        out.append(f"index: unknown; {NOT_SEEKABLE}")
    elif info.indexed:
        out.append("index: vmafs index with data checksums"
                   + (" over 4 KiB block sums" if info.block_sums else ""))
    else:
        out.append("index: none (walked: no data checksums; vmafs convert adds them)")
    out += [f"uuid: {info.uuid}", f"time: {iso_time(info.ctime) or info.ctime} "
            f"({format_ctime(info.ctime)})", f"vmid: {display(info.vmid or 'unknown')}"]
    if info.incremental:
        out.append(f"kind: incremental, parent {info.parent}")
        if info.chain_error is not None:
            out.append(f"chain: broken: {display(info.chain_error)}")
        else:
            out.append(f"chain: complete, depth {info.depth}")
            for i, link in enumerate(info.chain):
                what = "incremental" if link.incremental else "full"
                out.append(f"  {i} {what} uuid: {link.uuid} time: {format_ctime(link.ctime)} "
                           f"stored: {link.stored_bytes} file: {display(link.path)}")
    else:
        out.append("kind: full")
    out.append(f"virtual size: {_size(sum(d.size for d in info.devices))}")
    if info.stored_bytes is not None:
        out.append(f"stored data: {_size(info.stored_bytes)}")
    for d in info.devices:
        stored = f", stored {human_bytes(d.stored)}" if d.stored is not None else ""
        out.append(f"device: {display(d.name)}: {_size(d.size)}{stored}")
    if info.vmstate_bytes is not None:
        out.append(f"vmstate: {_size(info.vmstate_bytes)}")
    out += [f"config: {display(name)}: {size} bytes" for name, size in info.configs]
    return out


def run(args: argparse.Namespace) -> int:
    info = describe(args.archive, args.base)
    if args.json:
        print_json(to_json(info))
        return 0
    if isinstance(sys.stdout, io.TextIOWrapper):  # a terminal that cannot show a character
        sys.stdout.reconfigure(errors="backslashreplace")
    sys.stdout.write("\n".join(lines_of(info)) + "\n")
    sys.stdout.flush()
    return 0
