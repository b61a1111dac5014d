"""One exception type for every expected user error, and the CLI wrapper that prints it as one line."""
from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class ReduceNetError(Exception):
    """An expected error caused by the user's input; its message says what to do."""


class UnknownModelError(ReduceNetError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ConfigError(ReduceNetError, ValueError):
    """An invalid model argument (width, expansion, rank, ...)."""


class ReparamError(ReduceNetError, ValueError):
    """A module that cannot be fused into a plain conv (non-linear branch, LambdaReLU with lambda < 1)."""


class CheckpointError(ReduceNetError, ValueError):
    """A missing, corrupt or mismatched checkpoint."""


class DataError(ReduceNetError, ValueError):
    """Missing, empty or malformed data."""


def brief(e: BaseException | str, limit: int = 160, *, typed: bool = True) -> str:
    """``e`` as a clause of a one-line error message: ``"TypeName: message"`` (``typed=False``: the message alone),
    the message's whitespace collapsed to single spaces and cut at ``limit`` characters, so that a library's
    multi-line error (a shape mismatch, a traceback-like text) cannot break the line or bury the advice after it.
    A string ``e`` (an ``OSError``'s ``strerror``) is the message itself: pass it with ``typed=False``."""
    text = " ".join(str(e).split())[:limit]
    return f"{type(e).__name__}: {text}" if typed else text


def _leave_process_group() -> None:
    """A process of torchrun that stops on an error leaves its process group first: with the group still up, gloo's
    threads can abort the interpreter's exit ("terminate called without an active exception", SIGABRT), and torchrun
    then prints a traceback after the one-line error."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 (leaving is best effort: the error is what the user needs)
            pass


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, torchrun stopping the other processes), raised where the process is, so that
    a run stops as it does on Ctrl-C: its checkpoints kept, the folders a run that never saved one made removed."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def _catch_sigterm() -> Callable[[], None]:
    """Turn SIGTERM into :class:`Terminated` while a CLI runs (in the main thread, when nobody handles it yet);
    returns what puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None
    signal.signal(signal.SIGTERM, _terminate)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def cli_errors(main: F) -> F:
    """Decorate a CLI ``main`` so that a :class:`ReduceNetError` prints ``error: ...`` and exits with 2; Ctrl-C
    prints ``interrupted`` (exit 130), SIGTERM ``terminated`` (exit 143), each after the run has stopped cleanly."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        restore = _catch_sigterm()
        try:
            return main(*args, **kwargs)
        except ReduceNetError as e:
            print(f"error: {e}", file=sys.stderr)
            _leave_process_group()
            sys.exit(2)
        except Terminated:
            print("terminated", file=sys.stderr)
            _leave_process_group()
            sys.exit(143)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:  # the reader went away (``| head``): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        finally:
            restore()

    return wrapper  # type: ignore[return-value]
