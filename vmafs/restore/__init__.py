"""Restore engines that run QEMU-side machinery (live restore); the commands stay thin."""
