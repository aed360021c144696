"""Restore engines that run QEMU-side machinery (live restore); the commands stay thin.

The live restore's defaults live here, so `vmafs restore` shows them without importing the
engine (trio and the NBD server) for a plain restore."""

SOCKET_NAME = ".vmafs-live.nbd"   # default export socket, in DIR: the same on --resume
RECONNECT_DELAY = 300             # seconds QEMU holds backing reads while vmafs is away
