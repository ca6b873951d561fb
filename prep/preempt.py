"""Preemption: SIGTERM (what Slurm, Kubernetes and spot reclaim send first) or SIGUSR1 (what a Slurm
job asks for with `--signal=USR1@60`) stops `prep build` at a clean point, with exit code 75
(EX_TEMPFAIL, as the trainer's preemption), and the same command run again resumes.

The clean point is the end of the next shard: its resume state is saved, and the build stops there,
keeping all the work done. Shards are written every few seconds on a real build (1024 x 32k tokens
at tens of M tokens/s), but a stalled source (a hub stream waiting on the network) could delay the
next one for any time, and the scheduler kills 30 s after its signal by default. So the wait is
bounded: GRACE_S after the signal, or at a second signal, the build exits at once, as a kill would,
and its rerun resumes from the last saved state (a kill at any moment is safe: prep/state.py),
redoing only the unfinished shard. The first clean point is before the stages start, when the
resume state is first saved; the tokenizer (~2 s for SmolLM3's, one call into Rust) loads on a
thread of its own meanwhile, so a signal that comes later in start-up waits for the first shard.
On the embedded sample (scripts/chaos_prep.py --term 10), signal to exit took 0.08 to 2.0 s,
median 0.52 s (0.06 to 1.7 s, median 0.56 s, when builds still waited for the tokenizer's load
before their first state save).

Python runs signal handlers on the main thread only; the reader threads and the encoder pool
don't see the signal, and stop when the build's main thread unwinds (build.py closes them).
"""

import os
import signal
import sys
import threading
from contextlib import contextmanager

EX_TEMPFAIL = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
GRACE_S = 20.0  # under the 30 s Slurm (KillWait) and Kubernetes (terminationGracePeriodSeconds) give by default


class Preempted(Exception):
    """The build stopped at a clean point because it was asked to; the message is one line."""


class StopSignals:
    """Records a stop signal; `check` raises Preempted at the next clean point once one came."""

    def __init__(self, grace_s: float = GRACE_S):
        self.grace_s = grace_s
        self.received: str | None = None
        self.shards_done = 0  # as of the last clean point

    def on_signal(self, signum: int, frame) -> None:
        if self.received is not None:
            self.stop_now(f"a second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGALRM, lambda signum, frame: self.stop_now(f"{self.grace_s:g} s after it"))
        signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def check(self, shards_done: int) -> None:
        """At a clean point (the resume state of `shards_done` shards just saved): stop if a signal came."""
        self.shards_done = shards_done
        if self.received is not None:
            raise Preempted(f"stopped by {self.received} after {shards_done} shards (the resume state is "
                            "saved); rerun the same command to resume")

    def stop_now(self, why: str) -> None:
        """Exit at once, without unwinding: as safe as a kill, and bounded."""
        print(f"stopped by {self.received} at once: the shard in progress was not finished {why}; "
              f"{self.shards_done} shards are saved, rerun the same command to resume", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EX_TEMPFAIL)


@contextmanager
def stop_signals(grace_s: float = GRACE_S):
    """StopSignals handling SIGTERM and SIGUSR1 for the block, then the previous handlers again. Off
    the main thread (a build run by a library user's worker) signals can't be handled: the build
    then runs as before, and a signal does what it did."""
    stop = StopSignals(grace_s)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {signum: signal.signal(signum, stop.on_signal) for signum in SIGNALS}
    previous_alarm = signal.getsignal(signal.SIGALRM)
    try:
        yield stop
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.signal(signal.SIGALRM, previous_alarm)
