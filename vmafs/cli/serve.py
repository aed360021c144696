"""`vmafs serve`: every disk of an archive as a read-only NBD export named by its device."""

from __future__ import annotations

import argparse
import os
from typing import Any

from vmafs.cli.common import add_base, add_json

DESCRIPTION = """\
Serve every disk of ARCHIVE as a read-only NBD export named by its device (drive-scsi0), on a
unix socket (--socket, mode 0600: private to you) or on a TCP address (--listen HOST:PORT, only
where asked; anyone who can reach it can read the disks). Works on plain .vma archives (vmafs or
Proxmox), seekable .vma.zst, and the newest archive of an incremental chain (read with its
ancestors). Holes and zero clusters are reported through block status (base:allocation), so
qemu-img convert, qemu-img map and nbdcopy skip them. Every client and connection gets the
same bytes; a cluster that fails its checksum fails the reads that touch it (EIO), nothing
else. The command returns once the exports are ready and serves in the background until it is
stopped (SIGTERM, SIGINT); -f stays in the foreground."""

EPILOG = """\
clients:
  qemu-img convert -O qcow2 'nbd+unix:///drive-scsi0?socket=/run/vm1.nbd' disk.qcow2
  nbdinfo --map 'nbd+unix:///drive-scsi0?socket=/run/vm1.nbd'
  qemu-img create -f qcow2 -F raw -b 'nbd+unix:///drive-scsi0?socket=/run/vm1.nbd' over.qcow2
An archive with a single disk also answers to the empty export name.
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="serve an archive's disks read-only over NBD",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", metavar="ARCHIVE", help="the .vma or seekable .vma.zst archive")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH",
                       help="listen on a unix socket at PATH (created mode 0600)")
    where.add_argument("--listen", metavar="HOST:PORT",
                       help="listen on TCP at HOST:PORT (port 0: any free port)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr; Ctrl-C stops")
    p.add_argument("--log", metavar="FILE",
                   help="log to FILE (default: stderr with -f, otherwise syslog)")
    p.add_argument("--debug", action="store_true", help="log debug messages")
    add_base(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from vmafs.archive.serving import open_session
    from vmafs.format.names import json_name
    from vmafs.serve import daemon
    from vmafs.serve.nbd import log, parse_listen, serving

    listen = parse_listen(args.listen) if args.listen else None
    from vmafs.store import absolute

    archive = absolute(args.archive)  # an s3:// or https:// location stays as it is
    socket = os.path.abspath(args.socket) if args.socket else None
    bases = [absolute(b) for b in args.base]

    async def main(task_status: trio.TaskStatus[daemon.Ready]) -> None:
        async with open_session(archive, bases) as session, \
                serving(session, socket=socket, listen=listen) as export:
            log.info("serving %s on %s (%s)", archive, export.address.describe(),
                     session.mode())
            notes = session.notes()
            for note in notes:
                log.warning("%s", note)
            where: dict[str, Any] = ({"socket": socket} if socket else
                                     {"listen": f"{export.address.host}:{export.address.port}"})
            info = {"ok": True, "archive": archive, **where, "pid": os.getpid(),
                    "devices": [{**json_name(d.name), "device_bytes": d.size,
                                 "export": d.name, "url": export.urls[d.name]}
                                for d in session.devices]}
            task_status.started(daemon.Ready(info, notes))
            await trio.sleep_forever()

    return daemon.run(daemon.Shell("vmafs serve", foreground=args.foreground,
                                   log_file=args.log, debug=args.debug, json=args.json), main)
