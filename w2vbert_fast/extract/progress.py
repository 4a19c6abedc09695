"""Progress of a long extraction: clips, hours of audio, audio-hours per second and the time left, as one live
line on a terminal or a plain line every so often otherwise (logs, batch schedulers).

Only counting (``Tally``), arithmetic and formatting live here; the numbers come from the caller. Under torchrun
each rank reports a ``Snapshot`` of its own share and rank 0 shows the job as a whole (``combine`` and
``eta_seconds`` over all ranks), so the time left is that of the slowest rank, not of the average one.
"""

import threading
import time
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Snapshot:
    """One rank's share of the job so far. ``elapsed``: seconds since that rank started its first batch."""

    batches_done: int = 0
    batches: int = 0
    clips_done: int = 0
    clips: int = 0
    seconds_done: float = 0.0
    seconds: float = 0.0
    failed: int = 0
    elapsed: float = 0.0


class Tally:
    """This rank's counters: set up once the work is planned, updated by the batch loop after each batch, read by
    whoever shows or publishes them (under torchrun, the heartbeat thread: hence the lock)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.lock = threading.Lock()
        self.current = Snapshot()
        self.started = clock()

    def start(self, batches, clips, seconds):
        """The work to do; ``elapsed`` counts from here."""
        with self.lock:
            self.current = Snapshot(batches=batches, clips=clips, seconds=seconds)
            self.started = self.clock()

    def update(self, batches_done, clips_done, seconds_done, failed, clips=None, seconds=None) -> Snapshot:
        """``clips`` and ``seconds``: the totals now, when they changed (failed clips leave them)."""
        with self.lock:
            totals = {key: value for key, value in (("clips", clips), ("seconds", seconds)) if value is not None}
            self.current = replace(self.current, batches_done=batches_done, clips_done=clips_done,
                                   seconds_done=seconds_done, failed=failed, elapsed=self.clock() - self.started,
                                   **totals)
            return self.current

    def snapshot(self) -> Snapshot:
        with self.lock:
            return self.current


def combine(snapshots) -> Snapshot:
    """The whole job: counts summed, elapsed the longest (the ranks run side by side)."""
    snapshots = list(snapshots)
    return Snapshot(*(sum(getattr(s, field) for s in snapshots) for field in
                      ("batches_done", "batches", "clips_done", "clips", "seconds_done", "seconds", "failed")),
                    elapsed=max((s.elapsed for s in snapshots), default=0.0))


def eta_seconds(snapshots):
    """Seconds until the last rank is done, or None while no rank has finished a batch to measure its rate.

    Each rank's rest of audio over its own rate (audio seconds per second so far, warm-up included, so the
    estimate errs long early on); a rank that has not measured a rate yet is assumed to run at the mean rate
    of those that have."""
    snapshots = list(snapshots)
    rates = [s.seconds_done / s.elapsed for s in snapshots if s.seconds_done > 0 and s.elapsed > 0]
    if not rates:
        return 0.0 if all(s.seconds_done >= s.seconds for s in snapshots) else None
    mean_rate = sum(rates) / len(rates)
    eta = 0.0
    for s in snapshots:
        left = max(s.seconds - s.seconds_done, 0.0)
        if left > 0:
            rate = s.seconds_done / s.elapsed if s.seconds_done > 0 and s.elapsed > 0 else mean_rate
            eta = max(eta, left / rate)
    return eta


def format_duration(seconds) -> str:
    """45s, 6m05s, 2h07m, 3d04h: two units at most, which is all an ETA can promise."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_line(snapshots) -> str:
    """[batch 3/7] 120/500 clips, 1.53/6.21 h of audio, 0.0120 audio-h/s (43.2x real time), 2 failed, ETA 6m30s"""
    snapshots = list(snapshots)
    job = combine(snapshots)
    rate = job.seconds_done / job.elapsed if job.elapsed > 0 else 0.0
    return (f"[batch {job.batches_done}/{job.batches}] {job.clips_done}/{job.clips} clips, "
            f"{job.seconds_done / 3600:.3f}/{job.seconds / 3600:.3f} h of audio in {format_duration(job.elapsed)}, "
            f"{rate / 3600:.3g} audio-h/s ({rate:.1f}x real time), {job.failed} failed, "
            f"ETA {format_duration(eta_seconds(snapshots))}")


class Display:
    """Shows progress lines on ``stream``: rewritten in place (``\\r``) on a terminal at most every ``live_every``
    seconds, else one plain line at the first call, then every ``every`` seconds, and always the final one."""

    def __init__(self, stream, quiet=False, live=None, every=30.0, live_every=0.2, clock=time.monotonic):
        self.stream, self.quiet, self.every, self.live_every, self.clock = stream, quiet, every, live_every, clock
        self.live = bool(live if live is not None else getattr(stream, "isatty", lambda: False)())
        self.last_shown = None  # clock time of the last line written
        self.width = 0  # of the live line on screen, to blank what a shorter line leaves behind

    def show(self, snapshots, final=False) -> bool:
        """Write the line for ``snapshots`` (one per rank) if it is due; True if written."""
        if self.quiet:
            return False
        now = self.clock()
        interval = self.live_every if self.live else self.every
        if not final and self.last_shown is not None and now - self.last_shown < interval:
            return False
        line = format_line(snapshots)
        if self.live:
            self.stream.write("\r" + line.ljust(self.width) + ("\n" if final else ""))
            self.width = 0 if final else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.last_shown = now
        return True
