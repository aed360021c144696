"""`vmafs mount`: show every disk of an archive as a read-only raw image file."""

from __future__ import annotations

import argparse
from typing import Any

from vmafs.cli.common import add_base, add_json

DESCRIPTION = """\
Mount ARCHIVE read-only on MOUNTPOINT with FUSE. The mount point shows one raw image file per
disk, disk-<devname>.raw, of exactly the disk's size, plus the archive's config files by name.
Works on plain .vma archives (vmafs or Proxmox) and on vmafs's seekable .vma.zst; an
incremental archive is mounted with its ancestors, as of its point in time. The command
returns once the mount is ready and serves it in the background; end it with
`vmafs umount MOUNTPOINT`, `fusermount3 -u MOUNTPOINT` or `umount MOUNTPOINT`."""

EPILOG = """\
options (-o, comma-separated, may be repeated):
  allow_other      let other users read the mount (it is private to you by default)
  uid=N, gid=N     owner of the files (default: you)
  nonempty         mount even if MOUNTPOINT has files (they are hidden while mounted)
  direct_io        serve disk reads straight into the reader's buffer, bypassing the page
                   cache: faster for big streaming reads (dd, qemu-img), no second cached
                   copy; MAP_SHARED mmap of a disk may then fail (ENODEV)
  other FUSE mount options (e.g. allow_root, auto_unmount, noatime) pass through to FUSE.
"""


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "mount", help="mount an archive read-only: one raw image file per disk",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("archive", metavar="ARCHIVE", help="the .vma or seekable .vma.zst archive")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    p.add_argument("-o", dest="options", metavar="OPTIONS", action="append", default=[],
                   help="mount options, comma-separated (see below)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr; Ctrl-C unmounts")
    p.add_argument("--log", metavar="FILE",
                   help="log to FILE (default: stderr with -f, otherwise syslog)")
    p.add_argument("--debug", action="store_true",
                   help="log debug messages, and every FUSE request")
    add_base(p)
    add_json(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vmafs.mount.daemon import MountRequest, mount

    return mount(MountRequest(archive=args.archive, mountpoint=args.mountpoint,
                              options=args.options, foreground=args.foreground,
                              log_file=args.log, debug=args.debug, bases=args.base,
                              json=args.json))
