"""Progress of an engine stage: a bar on a terminal, lines in a log, or nothing."""
from __future__ import annotations

import sys
import time
from typing import TextIO

# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------

class _Progress:
    """A progress bar on a TTY, else one line at a stage's start and end."""

    def __init__(self, stage: str, total: int, mode: str, where: str,
                 stream: TextIO | None = None) -> None:
        self.stage, self.total, self.where = stage, total, where
        self.stream = stream if stream is not None else sys.stdout
        if mode == "auto":
            is_tty = getattr(self.stream, "isatty", lambda: False)()
            mode = "bar" if is_tty else "lines"
        self.mode = mode
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = 0.0

    def start(self) -> None:
        if self.mode == "lines":
            self._print(f"blmm: stage {self.stage}: {self.total} tasks started {self.where}")
        elif self.mode == "bar":
            self._draw(force=True)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.mode == "bar":
            self._draw(force=self.done >= self.total)

    def finish(self, ok: bool) -> None:
        elapsed = _format_seconds(time.monotonic() - self.started)
        if self.mode == "bar":
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
        if self.mode in ("bar", "lines"):
            state = "done" if ok else "FAILED"
            self._print(f"blmm: stage {self.stage}: {state}, "
                        f"{self.done}/{self.total} tasks in {elapsed}")

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.2:  # redraw at most 5 times a second
            return
        self._last_draw = now
        width = 30
        fraction = self.done / self.total if self.total else 1.0
        filled = int(round(width * fraction))
        elapsed = now - self.started
        if 0 < self.done < self.total:
            eta = "ETA " + _format_seconds(elapsed / self.done * (self.total - self.done))
        elif self.done >= self.total:
            eta = "in " + _format_seconds(elapsed)
        else:
            eta = "ETA --:--"
        line = (f"\r{self.stage} |{'#' * filled}{'.' * (width - filled)}| "
                f"{self.done}/{self.total} {100 * fraction:3.0f}% {eta}")
        self.stream.write(line)
        self.stream.flush()

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
