#!/usr/bin/env bash
# Installs everything vmafs and its tests need on Debian 12 (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    fuse3 libfuse3-dev pkg-config gcc libc6-dev python3-dev libxxhash-dev \
    qemu-utils qemu-system-x86 qemu-block-extra \
    zstd lzop gzip cpio busybox-static extlinux syslinux-common \
    e2fsprogs fdisk mount util-linux kmod libnbd-bin nbdkit nbdkit-plugin-python python3-libnbd \
    ceph-mon ceph-osd radosgw ceph-common >/dev/null
# also builds vmafs/format/_blocksums.c in place (setup.py; optional: without it the Python sums)
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
# An editable install compiles no bytecode (a wheel install does): compile it once, so every
# `vmafs` command starts without compiling its imports (~40 ms of CPU a start).
python3 -m compileall -q vmafs
