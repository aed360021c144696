#!/usr/bin/env bash
# The main job on a tiny running VM: boot the test guest (TCG) with a QMP socket, a guest agent
# and a qcow2 disk holding an ext4 file system, on which the guest writes a new file every
# 0.2 s. Take a live full backup, let the guest write more, take a live incremental backup;
# list and verify the chain, mount it, loop-mount the guest's ext4 from the mounted disk image
# and read back a file the guest wrote after the full backup, without restoring anything; then
# merge the chain into one full archive. Needs root (loop devices), /dev/fuse and QEMU
# (tools/setup.sh). The first run builds the test guest (a few minutes, then cached in
# ~/.cache/vmafs-tests, or $VMAFS_TEST_CACHE).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
vmafs() { python3 -m vmafs "$@"; }  # works before the console script is on PATH
run() {  # show a command (words with spaces quoted), then run it
    local shown=() w
    for w in "$@"; do [[ $w == *' '* ]] && w="'$w'"; shown+=("$w"); done
    printf '+ %s\n' "${shown[*]}"
    "$@"
}
die() { printf 'demo FAILED: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d /var/tmp/vmafs-demo.XXXXXX)
cleanup() {
    local status=$? pid
    set +e
    cd /
    if [ "$status" -ne 0 ] && [ -s "$work/serial.log" ]; then
        echo "guest console (last lines):" >&2
        tail -n 5 "$work/serial.log" >&2
    fi
    mountpoint -q "$work/fs" && umount "$work/fs"
    mountpoint -q "$work/mnt" && { fusermount3 -u "$work/mnt" || umount -l "$work/mnt"; }
    if [ -s "$work/qemu.pid" ]; then
        pid=$(cat "$work/qemu.pid")
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    fi
    mountpoint -q "$work/mnt" || mountpoint -q "$work/fs" || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
start=$SECONDS
cd "$work"
mkdir backups mnt fs files

# The guest: tests/guestimage.py's kernel and initramfs (busybox, ext4, the demo's job).
echo "preparing the test guest (built once, cached in ${VMAFS_TEST_CACHE:-~/.cache/vmafs-tests})"
python3 - "$repo/tests" >guest.txt <<'EOF'
import sys
sys.path.insert(0, sys.argv[1])
import guestimage as gi
guest = gi.build_guest()
print(guest.kernel)
print(guest.initrd)
print(guest.cmdline("files", count=100000, interval_ms=200))
EOF
{ read -r kernel; read -r initrd; read -r cmdline; } <guest.txt
rm guest.txt

# The VM's disk: 64 MiB of ext4 holding 16 MiB of random data, as qcow2 (so its dirty bitmaps
# are persistent), and a Proxmox-style config file: 100.conf names the archives vzdump-qemu-100-*.
head -c 16M /dev/urandom >files/random.bin
truncate -s 64M disk.raw
mkfs.ext4 -q -L demo -d files disk.raw
qemu-img convert -f raw -O qcow2 disk.raw vm-100-disk-0.qcow2
rm disk.raw
printf 'name: demo\nmemory: 256\nvirtio0: local:100/vm-100-disk-0.qcow2,size=64M\n' >100.conf

run qemu-system-x86_64 -name demo -accel tcg -cpu max -m 256M -nodefaults -display none \
    -no-user-config -no-reboot -kernel "$kernel" -initrd "$initrd" -append "$cmdline" \
    -chardev "file,id=serial0,path=$work/serial.log" -serial chardev:serial0 \
    -qmp "unix:$work/qmp.sock,server=on,wait=off" \
    -chardev "socket,id=qga0,path=$work/qga.sock,server=on,wait=off" \
    -device virtio-serial-pci -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
    -drive "file=$work/vm-100-disk-0.qcow2,format=qcow2,if=none,id=drive-virtio0" \
    -device virtio-blk-pci,drive=drive-virtio0,id=virtio0 \
    -daemonize -pidfile "$work/qemu.pid"

files_written() {  # the number of the last file the guest wrote and synced
    local n
    n=$(grep -ao 'VMAFS-FILE [0-9]*' serial.log | tail -n 1 | cut -d' ' -f2 || true)
    echo "${n:-0}"
}
wait_files() {  # until the guest has written file number $1
    local deadline=$((SECONDS + 90))
    while [ "$(files_written)" -lt "$1" ]; do
        if grep -aq VMAFS-ERROR serial.log; then die "$(grep -a VMAFS-ERROR serial.log)"; fi
        kill -0 "$(cat qemu.pid)" 2>/dev/null || die "QEMU exited"
        [ "$SECONDS" -lt "$deadline" ] || die "the guest wrote no file $1 within 90 s"
        sleep 0.1
    done
}
note() {  # what the guest writes into note-$1.txt (tests/guest/init.sh, mode files)
    awk -v n="$1" 'BEGIN { for (i = 1; i <= 100; i++) printf "note %d line %d\n", n, i }'
}
wait_files 3
grep -aq VMAFS-QGA serial.log || die "no guest agent in the guest"
echo "the guest is up, writing /files/note-N.txt (file $(files_written) so far)"

# Full backup into backups/ (named after 100.conf); it also starts a dirty bitmap on the disk.
# --qga freezes the guest's file system around the start: the ext4 in the archive is clean.
run vmafs backup --qmp qmp.sock --qga qga.sock -c 100.conf -o backups/ --zstd -q
full=$(ls backups/*.vma.zst)  # beside it: vzdump's NAME.log
after_full=$(files_written)  # the full backup holds no file after this one
wanted=$((after_full + 5))
wait_files $((wanted + 5))
# Incremental: only the clusters the guest changed since the full one, named the same way.
run vmafs backup --qmp qmp.sock --qga qga.sock -c 100.conf -o backups/ --zstd -q \
    --incremental "$full"
inc=$(ls backups/*.vma.zst | tail -n 1)
[ "$inc" != "$full" ] || die "no incremental archive in backups/"
run ls -l backups/          # the incremental holds only what changed

run vmafs list "$inc"          # the CHAIN lines: the full archive, then the incremental
run vmafs verify "$inc"        # the incremental, every link, and every archive of its chain
run vmafs mount "$inc" mnt     # the disks as of the incremental's point in time
run ls -l mnt
run mount -o ro,loop mnt/disk-drive-virtio0.raw fs
echo "the guest had written $after_full files at the full backup; reading note-$wanted.txt:"
run head -n 2 "fs/note-$wanted.txt"
note "$wanted" | cmp - "fs/note-$wanted.txt" || die "note-$wanted.txt is not what the guest wrote"
cmp files/random.bin fs/random.bin || die "random.bin differs"
run umount fs
run vmafs umount mnt
run vmafs mount "$full" mnt    # the full backup alone: the guest had not written it yet
run mount -o ro,loop mnt/disk-drive-virtio0.raw fs
[ ! -e "fs/note-$wanted.txt" ] || die "note-$wanted.txt is in the full backup already"
echo "the full backup ends at $(cd fs && ls note-*.txt | sort -t- -k2 -n | tail -n 1)"
run umount fs
run vmafs umount mnt

# One full archive out of the chain: ordinary VMA again, which Proxmox's tools restore.
run vmafs merge -o merged.vma.zst -q "$inc"
run vmafs verify merged.vma.zst
run vmafs mount merged.vma.zst mnt
run mount -o ro,loop mnt/disk-drive-virtio0.raw fs
cmp files/random.bin fs/random.bin || die "random.bin differs in the merged archive"
note "$wanted" | cmp - "fs/note-$wanted.txt" || die "note-$wanted.txt differs in the merged archive"
run umount fs
run vmafs umount mnt
echo "demo OK in $((SECONDS - start)) s: note-$wanted.txt, written by the running guest after" \
     "the full backup, came back out of the mounted incremental chain and the merged archive"
