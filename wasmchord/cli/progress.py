"""Progress bars on stderr for the library's `progress(stage, done, total)` callbacks."""

from __future__ import annotations

import sys


class ProgressBar:
    """A tqdm bar per stage, on stderr; silent when stderr is not a terminal. Use as a context
    manager, or call `close()`, so that the last bar is cleared."""

    def __init__(self):
        self.bar, self.stage = None, None

    def __call__(self, stage: str, done: int, total: int):
        if not sys.stderr.isatty():
            return
        from tqdm import tqdm
        if stage != self.stage:
            self.close()
            unit = "B" if total > 10_000 else "it"
            self.bar = tqdm(total=total, desc=stage, unit=unit, unit_scale=unit == "B", file=sys.stderr, leave=False)
            self.stage = stage
        self.bar.n = done
        self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc):
        self.close()
