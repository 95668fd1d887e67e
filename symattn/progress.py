"""Progress on stderr for long evaluations: a live line only on a terminal, only after about a second; one
line at the start of a long run, terminal or not."""

from __future__ import annotations

import sys
import time

LONG = 1 << 16  # a run with this much work (score entries plus entries asked for) says what it computes


def announce(text: str, work: int, stream=None) -> None:
    """``symattn: text`` on stderr, once, at the start of a run with at least LONG units of ``work``, terminal
    or not: a piped or logged run that computes for a minute is not silent, and a short one prints nothing."""
    if work < LONG:
        return
    stream = sys.stderr if stream is None else stream
    stream.write(f"symattn: {text}\n")
    stream.flush()


def count(n: int, one: str, many: str | None = None) -> str:
    """'1 head', '2,048 heads'; '1 entry', '3 entries' with ``many``."""
    return f"{n:,} {one if n == 1 else many or one + 's'}"


class Progress:
    """Call with a stage (and optionally done/total) as work goes on; ``close()`` wipes the line.

    ``enabled=None`` shows progress only when the stream is a terminal, so piped output and JSON
    stay clean; True or False force it on or off.
    """

    def __init__(self, enabled: bool | None = None, stream=None, delay: float = 1.0):
        self.stream = sys.stderr if stream is None else stream
        if enabled is None:
            enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.enabled = enabled
        self.delay = delay
        self.start = time.monotonic()
        self.shown = False

    def __call__(self, stage: str, done: int | None = None, total: int | None = None) -> None:
        if not self.enabled or time.monotonic() - self.start < self.delay:
            return
        text = stage if done is None else f"{stage} {done}/{total} entries"
        self.stream.write(f"\r\x1b[Ksymattn: {text} ({time.monotonic() - self.start:.1f} s)")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False
