"""Fixtures shared by every test module: the test vectors and the real `vmafs` command."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"  # a copy of the project's shared vectors, carried here

# What vmafs learns when it opens an archive is cached in $XDG_CACHE_HOME/vmafs: the tests' own
# archives go to a directory of this run, not the user's home.
_CACHE = tempfile.mkdtemp(prefix="vmafs-test-xdg-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


def run_vmafs(*args: str | os.PathLike[str], input: bytes | None = None,
              env: dict[str, str] | None = None, timeout: float = 300,
              cwd: str | os.PathLike[str] | None = None) -> tuple[int, bytes, str]:
    """Run `python -m vmafs ARGS...` as a real subprocess: (returncode, stdout bytes, stderr).

    stdout stays bytes (archives and configs may go there); stderr is decoded text. Without
    `input` the command's stdin is /dev/null, so a command never waits on the terminal.
    """
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [sys.executable, "-m", "vmafs", *map(str, args)],
        input=input, stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True, env=full_env, timeout=timeout, cwd=cwd or ROOT, check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr.decode(errors="replace")


def fuse_missing() -> str | None:
    """Why this machine cannot run FUSE tests, or None if it can."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "fusermount3 not installed"
    return None


def assert_one_line_error(rc: int, stderr: str, *fragments: str) -> str:
    """A user error: exit non-zero, exactly one line on stderr, no traceback, naming the problem."""
    assert rc != 0, "expected a failure"
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="session")
def vectors() -> Path:
    """tests/vectors: archives nobody here wrote, with the real Proxmox reader's verdicts. They
    are part of the repository, so their absence is a failure, never a skip."""
    assert VECTORS.is_dir(), f"test vectors missing at {VECTORS}"
    return VECTORS


@pytest.fixture(scope="session")
def proxmox_manifest(vectors: Path) -> dict[str, Any]:
    return json.loads((vectors / "proxmox" / "MANIFEST.json").read_text())


@pytest.fixture(scope="session")
def spec_manifest(vectors: Path) -> dict[str, Any]:
    return json.loads((vectors / "spec" / "MANIFEST.json").read_text())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With VMAFS_TESTS_NO_SKIP=1 (.ci/run sets it) a skipped test fails the run: every skip
    names what the machine lacks, and tools/setup.sh installs all of it, so a skip in CI means
    a test did not run that should have."""
    if os.environ.get("VMAFS_TESTS_NO_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        for report in skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
            print(f"\nskipped in CI: {report.nodeid}: {reason}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
