"""A one-line progress bar and a short clock, for every long loop."""
import sys
import time

# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------
CLEAR_LINE_END = "\033[K"  # a shorter redraw leaves no characters of the longer one


class Progress:
    """A one-line progress bar on stderr; on a non-terminal only the final line is written."""

    def __init__(self, total, desc, stream=None):
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, n=1):
        self.done += n
        now = time.monotonic()
        if self.live and (now - self.last > 0.1 or self.done >= self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now, suffix="", end=""):
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * 24)
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-9)
        left = f" {clock(max(0, self.total - self.done) / rate)} left" if 0 < frac < 1 else ""
        self.stream.write(f"\r{self.desc} [{bar:<24}] {self.done}/{self.total} "
                          f"{clock(elapsed)} {rate:6.1f}/s{left}{suffix}{CLEAR_LINE_END * self.live}{end}")
        self.stream.flush()

    def close(self, suffix=""):
        self._draw(time.monotonic(), suffix, end="\n")


def clock(seconds):
    """5.2s, 3:07 or 1:02:09: short for a progress bar, exact enough to plan a coffee."""
    if seconds < 60:
        return f"{seconds:4.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
