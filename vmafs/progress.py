"""Progress on a terminal (bytes done, rate, ETA) and one-line JSON summaries for scripts."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

from vmafs.format.names import hide_url_queries


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A rate-limited status line on stderr, shown only when stderr is a terminal.

    update() is cheap and thread-safe, so hot loops may call it per chunk.
    """

    def __init__(self, label: str, total: int, *, enabled: bool | None = None,
                 stream: TextIO | None = None, interval: float = 0.25) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.interval = interval
        self.started = time.monotonic()
        self._last = 0.0
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and now - self._last >= self.interval:
                self._last = now
                self._draw(now)

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _draw(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total else 0.0
        self.stream.write(
            f"\r{self.label}: {human_bytes(self.done)} / {human_bytes(self.total)} "
            f"({pct:5.1f}%) {human_bytes(rate)}/s ETA {eta:4.0f}s \x1b[K"
        )
        self.stream.flush()


def print_json(obj: dict[str, Any], stream: TextIO | None = None) -> None:
    """One JSON object on one line, for --json."""
    out = stream or sys.stdout
    out.write(hide_url_queries(json.dumps(obj, sort_keys=True)) + "\n")
    out.flush()
