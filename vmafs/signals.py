"""The signals that stop a long command (Ctrl-C, kill, a closed terminal), caught so that the
command's undo steps run instead of Python's default handlers cutting it short."""

from __future__ import annotations

import signal
from collections.abc import Callable

import trio

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def on_stop_signal(act: Callable[[int], None], *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Calls ACT with each stop signal's number; start it with `nursery.start` so the handlers
    are in place before the work begins. ACT usually records the signal and cancels a scope."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        task_status.started()
        async for signum in signals:
            act(signum)
