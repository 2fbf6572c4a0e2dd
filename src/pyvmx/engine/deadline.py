"""A wall-clock limit on host time that works wherever the host spends it.

Guest time (retired instructions) bounds what a guest may do; host time bounds what a run may
cost.  The two differ when the host's own work grows without guest time moving -- a translation
block refilled through Python on every iteration, an exit handled again and again.  A signal
(SIGALRM) cannot end such a run: its handler raises inside a Unicorn callback, where ctypes
swallows the exception, so a 5-line CR3-reload loop outlived ``--timeout 5`` by minutes.

:class:`HostDeadline` is polled instead.  Whoever runs guest code checks :meth:`HostDeadline.passed`
at each place it regains control (between two runs of the core, at each VM exit, between batches
of an emulated string instruction); and while the core runs native code with no Python in
between, a timer thread calls the core's stop function (``uc_emu_stop``, which is safe from
another thread and ends the run at the next translation-block boundary) every few milliseconds
once the deadline has passed, until nobody is attached.  Nothing is raised from a signal handler.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

STOP_INTERVAL = 0.01  # seconds between two stop requests after the deadline passed
MAX_SLEEP = 3600.0  # the timer thread looks at the clock at least this often (seconds)

StopFunction = Callable[[], None]


class HostDeadline:
    """A point in host (monotonic wall-clock) time after which runs stop.

    ``seconds``: from now; ``math.inf`` or None never passes.  Attach the stop function of each
    CPU engine that runs under it (:meth:`attached`); the deadline stops them when it passes."""

    def __init__(self, seconds: float | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds is not None and not seconds >= 0:
            raise ValueError(f"a host deadline needs a time >= 0 seconds, not {seconds!r}")
        self.seconds = seconds
        self._clock = clock
        self.at = None if seconds is None else clock() + seconds
        self._stops: list[StopFunction] = []
        self._lock = threading.RLock()  # reentrant: expire() may run in a signal handler of the holder
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"HostDeadline({self.seconds!r}s, passed={self.passed()})"

    def passed(self) -> bool:
        """Whether the deadline is behind us (cheap: one clock read)."""
        return self.at is not None and self._clock() >= self.at

    def expire(self) -> None:
        """Make the deadline pass now (Ctrl-C): every run under it stops as if its time were up.
        Safe from a signal handler (the lock is reentrant)."""
        with self._lock:
            self.at = self._clock()
            self._wake.notify_all()

    def remaining(self) -> float | None:
        """Seconds left (0 once passed); None for a deadline that never passes."""
        return None if self.at is None else max(0.0, self.at - self._clock())

    # --- stopping engines that run native code --------------------------------------------------
    def attach(self, stop: StopFunction) -> None:
        """Have ``stop`` called (from a timer thread) while attached and the deadline has passed.
        Cheap: one sleeping thread per deadline, started at the first attach, serves them all."""
        if self.at is None:
            return
        with self._lock:
            self._stops.append(stop)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="pyvmx-host-deadline", daemon=True)
                self._thread.start()
            self._wake.notify_all()

    def detach(self, stop: StopFunction) -> None:
        with self._lock:
            if stop in self._stops:
                self._stops.remove(stop)

    def attached(self, stop: StopFunction) -> _Attachment:
        """``with deadline.attached(cpu.stop): ...`` -- attach for the block's duration."""
        return _Attachment(self, stop)

    def _watch(self) -> None:
        """The timer thread: sleep until the deadline, then stop every attached engine every
        STOP_INTERVAL (a stop that arrives between two runs of a core is lost -- the next one
        is not); end once the deadline has passed and nothing is attached (the next attach
        starts another)."""
        assert self.at is not None
        with self._lock:
            while True:
                left = self.at - self._clock()
                if left > 0:
                    self._wake.wait(min(left, MAX_SLEEP))
                    continue
                if not self._stops:
                    break
                stops = list(self._stops)
                self._lock.release()
                try:
                    for stop in stops:
                        stop()
                finally:
                    self._lock.acquire()
                self._wake.wait(STOP_INTERVAL)
            self._thread = None


class _Attachment:
    def __init__(self, deadline: HostDeadline, stop: StopFunction) -> None:
        self.deadline = deadline
        self.stop = stop

    def __enter__(self) -> HostDeadline:
        self.deadline.attach(self.stop)
        return self.deadline

    def __exit__(self, *exc: object) -> None:
        self.deadline.detach(self.stop)
