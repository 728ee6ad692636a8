"""Progress bars on stderr, by bytes or by rows, updated from worker threads."""

from __future__ import annotations

import sys
import threading
from typing import Any


class NoProgress:
    def update(self, _n: int) -> None:
        pass

    def close(self) -> None:
        pass


class SharedProgress:
    """A tqdm bar that several writer threads update."""

    def __init__(self, bar: Any) -> None:
        self.bar, self.lock = bar, threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress_bar(total: int, enabled: bool, desc: str = "writing", unit: str = "B") -> Any:
    if not enabled:
        return NoProgress()
    from tqdm import tqdm

    scale = {"unit_scale": True, "unit_divisor": 1000} if unit == "B" else {}
    return SharedProgress(tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=False, **scale))
