"""Paths and assertions shared by the test modules (import as ``from _shared import ...``)."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
#: The data folder beside the checkout (``../shared/data``), or ``$REDUCENET_SHARED_DATA``.
SHARED = Path(os.environ.get("REDUCENET_SHARED_DATA") or ROOT.parent / "shared" / "data")
CIFAR10 = SHARED / "cifar-10-subset"
CIFAR100 = SHARED / "cifar-100-subset"


def one_line(excinfo) -> str:
    """The message of a raised exception, asserted to be a single non-empty line."""
    msg = str(excinfo.value)
    assert msg.strip() and "\n" not in msg, f"expected a one-line message, got {msg!r}"
    return msg


def run_main(main: Callable[[list[str]], object], argv: Sequence[str]) -> subprocess.CompletedProcess:
    """A CLI's ``main(argv)`` run in this process, as ``subprocess.run(..., capture_output=True, text=True)`` would
    report it: its exit code (``SystemExit``'s, 0 when it returns), stdout and stderr. An unexpected exception is
    raised, failing the test, where a subprocess would print a traceback. A fresh interpreter costs about 4 s of
    imports on 2 cores: each CLI keeps one test through ``python -m``, the others call its ``main`` here."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())
