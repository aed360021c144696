#!/usr/bin/env bash
# The main job on a small built-in example: back up a qcow2 disk holding an ext4 file system,
# check the archive, mount it, loop-mount the guest file system from the mounted image and read
# a file back, without ever restoring the disk. Needs root (loop devices) and /dev/fuse.
set -euo pipefail
vmafs() { python3 -m vmafs "$@"; }  # works before the console script is on PATH
work=$(mktemp -d /var/tmp/vmafs-demo.XXXXXX)
cleanup() {
    umount "$work/fs" 2>/dev/null || true
    fusermount3 -u "$work/mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/files" "$work/mnt" "$work/fs"
echo "hello from inside the guest disk" > "$work/files/hello.txt"
head -c 8M /dev/urandom > "$work/files/random.bin"
truncate -s 256M "$work/disk.raw"
mkfs.ext4 -q -d "$work/files" "$work/disk.raw"
qemu-img convert -O qcow2 "$work/disk.raw" "$work/disk.qcow2"
printf 'name: demo\nscsi0: local:100/disk.qcow2,size=256M\n' > "$work/qemu-server.conf"
archive="$work/vzdump-qemu-100-$(date +%Y_%m_%d-%H_%M_%S).vma.zst"

set -x
vmafs create -o "$archive" -c "$work/qemu-server.conf" "drive-scsi0=$work/disk.qcow2"
vmafs list "$archive"
vmafs verify "$archive"
vmafs mount "$archive" "$work/mnt"
ls -l "$work/mnt"
mount -o ro,loop "$work/mnt/disk-drive-scsi0.raw" "$work/fs"
cat "$work/fs/hello.txt"
cmp "$work/fs/random.bin" "$work/files/random.bin"
umount "$work/fs"
vmafs umount "$work/mnt"
{ set +x; } 2>/dev/null
echo "demo OK: the file came back out of the mounted backup"
