"""Progress on stderr for long evaluations: only on a terminal, only after about a second."""

from __future__ import annotations

import sys
import time


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
