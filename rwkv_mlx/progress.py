"""Progress lines on stderr for long work (loading, converting, prefill).

On a terminal the line redraws in place; otherwise only a final line is
written, so logs stay readable.  Output never goes to stdout, which carries
generated text.
"""

from __future__ import annotations

import sys
import time

CLEAR_LINE = "\033[K"  # ANSI: erase from the cursor to the end of the line


class Progress:
    def __init__(self, label: str, total: int, unit: str = "", stream=None, enabled: bool = True):
        self.label, self.total, self.unit = label, max(int(total), 1), unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.enabled and getattr(self.stream, "isatty", lambda: False)()
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.done = 0
        self.line = ""  # the progress line as last drawn (terminal only)

    def update(self, done: int, note: str = "") -> None:
        self.done = done
        now = time.perf_counter()
        if self.tty and (now - self.last_draw > 0.1 or done >= self.total):
            self.last_draw = now
            width = 24
            fill = int(width * done / self.total)
            bar = "#" * fill + "-" * (width - fill)
            self.line = f"{self.label} [{bar}] {done}/{self.total}{self.unit} {note[:40]:<40}"
            self.stream.write("\r" + self.line)
            self.stream.flush()

    def print_above(self, text: str) -> None:
        """A line of text above the progress line: on a terminal the line is cleared, the text written, the bar redrawn."""
        if self.tty:
            self.stream.write(f"\r{CLEAR_LINE}{text}\n" + (f"\r{self.line}" if self.line else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, summary: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        end = f"{self.label}: {summary or f'{self.done}/{self.total}{self.unit}'} in {elapsed:.2f} s"
        self.stream.write(f"\r{CLEAR_LINE}{end}\n" if self.tty else end + "\n")
        self.stream.flush()
