"""Paths and assertions shared by the test modules (import as ``from _shared import ...``)."""
from __future__ import annotations

import os
from pathlib import Path

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
