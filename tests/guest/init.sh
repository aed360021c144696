#!/bin/busybox sh
# /init of the vmafs test guest.  Job from the kernel command line:
#   vmafs.mode=writer|idle|latency|files|bootok  vmafs.seed=N  vmafs.count=N  vmafs.interval_ms=N
# Markers go to the console (ttyS0): VMAFS-READY, VMAFS-DONE, VMAFS-BOOT-OK, VMAFS-ERROR ...
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

fail() {
    echo "VMAFS-ERROR $*"
    poweroff -f
    sleep 1000000
}

mode=idle seed=1 count=1000 interval_ms=0
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        vmafs.mode=*) mode=${arg#*=} ;;
        vmafs.seed=*) seed=${arg#*=} ;;
        vmafs.count=*) count=${arg#*=} ;;
        vmafs.interval_ms=*) interval_ms=${arg#*=} ;;
    esac
done

if [ "$mode" = bootok ]; then
    echo VMAFS-BOOT-OK
    sync
    poweroff -f
    sleep 1000000
fi

# modules in dependency order, one path per line (written by tests/guestimage.py)
if [ -f /etc/vmafs-modules ]; then
    while read -r m; do
        insmod "$m" || fail "insmod $m"
    done </etc/vmafs-modules
fi

wait_dev() {
    i=0
    while [ ! -b "$1" ]; do
        i=$((i + 1))
        [ $i -gt 200 ] && fail "no $1"
        usleep 50000
    done
}

# qemu-ga on the virtio-serial port named org.qemu.guest_agent.0, if the host gave us one.
# Ports appear asynchronously after virtio_console binds: wait for them when there is a
# virtio console device (virtio device id 3).
for d in /sys/bus/virtio/devices/*; do
    [ "$(cat "$d/device" 2>/dev/null)" = 0x0003 ] || continue
    i=0
    while [ $i -lt 200 ]; do
        for n in /sys/class/virtio-ports/*/name; do
            [ -f "$n" ] && [ "$(cat "$n")" = org.qemu.guest_agent.0 ] && i=1000
        done
        i=$((i + 1))
        [ $i -lt 200 ] && usleep 25000
    done
done
for port in /sys/class/virtio-ports/*; do
    [ -f "$port/name" ] || continue
    if [ "$(cat "$port/name")" = org.qemu.guest_agent.0 ]; then
        dev=/dev/${port##*/}
        i=0
        while [ ! -c "$dev" ] && [ $i -lt 100 ]; do i=$((i + 1)); usleep 50000; done
        mkdir -p /run/qga
        /usr/bin/qemu-ga -m virtio-serial -p "$dev" -t /run/qga -f /run/qemu-ga.pid \
            -l /run/qemu-ga.log -d || fail "qemu-ga"
        echo "VMAFS-QGA $dev"
    fi
done

case "$mode" in
    writer)
        wait_dev /dev/vda
        wait_dev /dev/vdb
        echo VMAFS-READY
        # A write can fail (EIO) when a backup's NBD sink dies under it: that is QEMU's way,
        # and the VM must keep running, so say so and start writing again instead of halting.
        while true; do
            /bin/vmafs-guest writer /dev/vda /dev/vdb "$seed"
            echo "VMAFS-ERROR writer exited; restarting"
            sleep 1
        done
        ;;
    latency)
        wait_dev /dev/vda
        echo VMAFS-READY
        /bin/vmafs-guest latency /dev/vda "$count" "$interval_ms" "$seed" || fail "latency"
        ;;
    idle)
        echo VMAFS-READY
        ;;
    files)
        # tools/demo.sh: /dev/vda holds an ext4 file system (made on the host). Mount it on
        # /files, then every interval_ms (default 200) write /files/note-N.txt, N = 1, 2, ...
        # up to count: 100 lines "note N line I" (I = 1..100), sync, and print VMAFS-FILE N.
        grep -qw ext4 /proc/filesystems || fail "no ext4 driver"
        wait_dev /dev/vda
        mkdir -p /files
        mount -t ext4 /dev/vda /files || fail "mount /dev/vda"
        echo VMAFS-READY
        [ "$interval_ms" -gt 0 ] || interval_ms=200
        n=0
        while [ $n -lt "$count" ]; do
            n=$((n + 1))
            awk -v n=$n 'BEGIN { for (i = 1; i <= 100; i++) printf "note %d line %d\n", n, i }' \
                >/files/note-$n.txt || fail "write note-$n.txt"
            sync
            echo "VMAFS-FILE $n"
            usleep $((interval_ms * 1000))
        done
        echo VMAFS-DONE
        ;;
    *)
        fail "unknown mode $mode"
        ;;
esac
while :; do sleep 1000000; done
