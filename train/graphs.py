"""The whole training step as one CUDA graph: forward, backward, optimizer step and the epoch's sums, replayed
with one launch per step instead of hundreds (``--cuda-graph``; torch's "whole-network capture").

At batch 128 a CIFAR ResNet's step is hundreds of small kernels, each of which the host must launch: the GPU
waits on Python. A captured graph is replayed with one call. What it needs from the step, and how the engine
gives it (:class:`train.engine.Trainer`):

- the same input tensors at every step: each batch is copied into static buffers before the replay;
- no host-device synchronisation inside the step: the loss, accuracy and a non-finite flag are summed on the
  device, in place (:class:`train.engine.EpochSums`);
- the learning rate as a device tensor that the scheduler fills in place (fused optimizer, ``lr`` a tensor), and
  per-step schedules that change tensors in place (the LambdaReLU anneal fills its buffers);
- gradients made by the captured backward: they are set to None before the capture, so every replay writes them
  afresh instead of adding to them.

The step is captured after three ordinary steps (they build the optimizer's state, pick cuDNN's kernels and
compile a compiled model, none of which may happen during a capture) and replayed from then on, across epochs.
Python values the step reads are frozen into the graph at its capture: the plain values held by the task's
modules (numbers, strings, flags, the train/eval mode: :func:`python_state`) are compared at the start of every
epoch, and when a callback has changed one (the DKD warm-up's epoch, the Pyramid's phase), the step is captured
again after one ordinary step. A value changed within an epoch would stay frozen until the next: per step, change
tensors in place (the LambdaReLU anneal fills its buffers).

On the CPU there are no CUDA graphs: the captured function runs eagerly at every step through the same static
buffers, with the gradients reset as the capture has them (what the tests check), as ``torch.compile``'s
``reduce-overhead`` mode runs without graphs there.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
import torch.nn as nn
from torch import Tensor

from models.errors import ReduceNetError, brief

#: Ordinary steps before the first capture of a run, and before a capture again (a Python value changed).
FIRST_WARMUP_STEPS, EPOCH_WARMUP_STEPS = 3, 1


def python_state(module: nn.Module) -> tuple[Any, ...]:
    """The plain Python values (numbers, strings, flags, None; the train/eval mode among them) held by ``module``
    and its submodules, by module path and attribute: what a captured step reads as constants."""
    return tuple((path, name, value) for path, m in module.named_modules() for name, value in vars(m).items()
                 if value is None or isinstance(value, (bool, int, float, str)))


class GraphedStep:
    """Runs ``step(x, y)`` (a whole training step that leaves its results in tensors updated in place): the first
    :data:`FIRST_WARMUP_STEPS` eagerly, then captured as a CUDA graph on ``device`` and replayed for every later
    batch, until :meth:`new_epoch` finds that ``key()`` changed: then one eager step and a new capture.

    Args:
        step: the training step; it must not read ``.grad`` as it was before it (the graph's backward makes it).
        zero_grad: sets the gradients to None (before each eager step and before the capture).
        device: a CUDA device captures; any other runs the step eagerly through the static buffers.
        key: the Python values the step reads (:func:`python_state` of the task); default: none.
    """

    def __init__(self, step: Callable[[Tensor, Tensor], None], zero_grad: Callable[[], None],
                 device: torch.device, key: Callable[[], Hashable] = tuple) -> None:
        self.step, self.zero_grad, self.device, self.key = step, zero_grad, torch.device(device), key
        self.capture = self.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[Tensor, Tensor] | None = None
        self.captured_key: Hashable = None
        self.warmup, self.done = FIRST_WARMUP_STEPS, 0  # eager steps due before the next capture; steps done
        self.captures = 0

    def new_epoch(self) -> None:
        """Before an epoch: when a Python value the step reads has changed since the capture, drop the graph; the
        epoch then captures its own after :data:`EPOCH_WARMUP_STEPS` eager steps."""
        if self.static is not None and self.key() != self.captured_key:
            self.graph = self.static = None
            self.warmup = EPOCH_WARMUP_STEPS

    def __call__(self, x: Tensor, y: Tensor) -> None:
        """One training step on the batch ``(x, y)``."""
        if self.warmup > 0:
            self.warmup -= 1
            self._eager(x, y)
        elif self.static is None or self.static[0].shape != x.shape or self.static[1].shape != y.shape:
            self._capture(x, y)
        else:
            self.static[0].copy_(x)
            self.static[1].copy_(y)
            self._replay()
        self.done += 1

    def _eager(self, x: Tensor, y: Tensor) -> None:
        self.zero_grad()
        if not self.capture:
            self.step(x, y)
            return
        side = torch.cuda.Stream(self.device)  # warm-up on a side stream, as torch's capture recipe does
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.step(x, y)
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _capture(self, x: Tensor, y: Tensor) -> None:
        """Capture the step on copies of ``(x, y)`` (the static buffers), then replay it once for this batch: a
        capture records the kernels without running them."""
        self.graph = None  # the last graph and its memory go first
        self.static = (x.clone(), y.clone())
        self.captured_key = self.key()
        self.zero_grad()  # the captured backward allocates the gradients, which every replay writes afresh
        if self.capture:
            self.graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: a loader's pinning thread may touch CUDA while this thread captures
                with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                    self.step(*self.static)
            except RuntimeError as e:  # a value read back, a shape that depends on data, an op CUDA cannot capture
                self.graph = None
                raise ReduceNetError("--cuda-graph: the training step cannot be captured as a CUDA graph "
                                     f"({brief(e, typed=False)}); "
                                     "a captured step may not wait for the GPU (.item(), data-dependent shapes): "
                                     "train without --cuda-graph") from None
        self.captures += 1
        self._replay()

    def _replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:  # no CUDA graphs: the captured function itself, with the gradients as the capture had them
            self.zero_grad()
            self.step(*self.static)
