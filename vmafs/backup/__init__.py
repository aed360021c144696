"""Getting disk data into the archive writer: live QEMU backups over QMP and NBD, image files."""
