#!/usr/bin/env bash
# Start a throwaway Ceph RADOS Gateway (S3) on 127.0.0.1 for trying vmafs against S3:
#   tools/rgw.sh > /tmp/rgw.env &   then   . /tmp/rgw.env   (Ctrl-C or kill stops it, all gone)
# Needs tools/setup.sh (ceph-mon ceph-osd radosgw ceph-common). State lives in memory only.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 tests/rgw.py "$@"
