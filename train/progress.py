"""Progress that talks whether or not the output is a terminal.

On a terminal, a tqdm bar (as everywhere in the field). When the output is a file or a pipe (a job log, ``nohup``,
CI), tqdm's bar is off, and a long step would be silent for minutes: :class:`Progress` then writes a plain line at
most every :data:`EVERY_S` seconds, and one when the work ends, e.g.
``decoding train images: 1,200/2,000 (60%, 41 img/s, 29 s)``.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

from tqdm import tqdm

#: Seconds between two progress lines when the output is not a terminal.
EVERY_S = 30.0


def is_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """Count ``total`` items of work called ``desc`` (``unit`` each); a context manager.

    Args:
        total: items of work (None: unknown).
        desc: what is done, e.g. ``"decoding train images"``.
        unit: the item's name in rates.
        log: where the plain lines go (default: print to stdout, flushed).
        every_s: seconds between plain lines (default :data:`EVERY_S`).
        enabled: False shows nothing (other ranks of a job).
    """

    def __init__(self, total: int | None, desc: str, unit: str = "img", log: Callable[[str], None] | None = None,
                 every_s: float | None = None, enabled: bool = True) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every_s = EVERY_S if every_s is None else every_s
        self.log = log or (lambda line: print(line, flush=True))
        self.enabled = enabled
        self.count = 0
        self.start = self.last = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                        disable=not (enabled and is_terminal()))
        self.plain = enabled and not is_terminal()
        self.said: int | None = None  # the count of the last plain line

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more items done; a plain line when one is due."""
        self.count += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(**postfix, refresh=False)
        if self.due():
            self.say(postfix)

    def tick(self, n: int = 1) -> None:
        """``n`` more items done, nothing written: the caller asks :meth:`due` and calls :meth:`show`."""
        self.count += n
        self.bar.update(n)

    def show(self, **postfix: Any) -> None:
        """The bar's postfix (``loss=...``); the plain line too when one is due."""
        self.bar.set_postfix(**postfix, refresh=False)
        if self.due():
            self.say(postfix)

    def due(self) -> bool:
        """Whether a plain line is due (never on a terminal: the bar shows it)."""
        return self.plain and time.perf_counter() - self.last >= self.every_s

    def say(self, extra: dict[str, Any] | None = None) -> None:
        """Write the plain line now: count, share, rate, elapsed time and ``extra`` (``loss=0.52`` ...)."""
        if not self.plain:
            return
        now = time.perf_counter()
        elapsed = now - self.start
        details = [f"{100 * self.count / self.total:.0f}%"] if self.total else []
        if elapsed > 0:
            details.append(f"{self.count / elapsed:,.0f} {self.unit}/s")
        details += [f"{elapsed:.0f} s", *(f"{k.replace('_', '/')} {v}" for k, v in (extra or {}).items())]
        count = f"{self.count:,}/{self.total:,}" if self.total else f"{self.count:,}"
        self.log(f"{self.desc}: {count} ({', '.join(details)})")
        self.last, self.said = now, self.count

    def close(self, final: bool = True) -> None:
        """End the bar; with ``final``, a last plain line if an earlier one was written, so that a log shows the
        work finished."""
        self.bar.close()
        if final and self.said is not None and self.said != self.count:
            self.say()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
