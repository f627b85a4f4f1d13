"""The bot's children are batch work: they never preempt its event loop (Linux).

Issue 12's profile of ``writer_process=True, delivery_process=True`` at 50 real-time
calls: the bot's CPU was near the recording no-op's, but its event loop lagged more and
it was preempted half as often again (involuntary context switches, counted by the
kernel). Each record written to the writer child, and each wake of the delivery child,
woke that child on the bot's own CPU, where it preempted the loop. With the children
pinned to the other CPU the gap was gone; pinning is not ours to do in a user's
process, but ``SCHED_BATCH`` is: a batch process is never scheduled ahead of the task
it woke (no wakeup preemption), and keeps the CPU share of nice 0, so it never starves:
under full load it commits and delivers as before. Anything else (another OS, a
sandbox that refuses it) leaves the default: only the bot's lag is at stake.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["run_as_batch_work"]


def run_as_batch_work() -> None:
    """Make this process (a child of the bot) ``SCHED_BATCH``, where the OS allows it."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or refused
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
