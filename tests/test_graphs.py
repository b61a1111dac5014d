"""The training step captured whole (train/graphs.py, ``--cuda-graph``), checked on the CPU: there the captured
function runs eagerly through the graph's static buffers, so these tests check what the capture relies on (the
schedule of eager steps and captures, the static inputs, sums and learning rate changed in place, resume), and
the GPU branch's order of streams, capture and replays with torch.cuda's streams and graphs stood in for; the
CUDA graph itself runs only on a GPU (``make gpu-check``)."""
from __future__ import annotations

import pytest
import torch

from _shared import one_line
from test_engine import StopAfter, tiny_data, tiny_model
from train.engine import Dist, EpochSums, TrainConfig, Trainer
from train.graphs import FIRST_WARMUP_STEPS, GraphedStep, python_state
from train.spec import RuntimeSpec
from train.tasks import Classify
from models.errors import ConfigError, ReduceNetError

DROP = ("images_per_s", "epoch_s")


def rows(trainer: Trainer) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in DROP} for r in trainer.history]


def same_rows(a: Trainer, b: Trainer) -> bool:
    """The same metrics rows, to float32 rounding (the fused optimizer of a captured step adds in another order)."""
    return len(a.history) == len(b.history) and all(
        x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7) for k in x)
        for x, y in zip(rows(a), rows(b)))


def fit(tmp_path, graph: bool, optimizer: str = "sgd", epochs: int = 3, **kwargs) -> Trainer:
    cfg = TrainConfig(epochs=epochs, lr=0.05, optimizer=optimizer, cuda_graph=graph, warmup_epochs=0.5)
    trainer = Trainer(Classify(tiny_model()), tiny_data(), cfg, tmp_path, log=lambda line: None, **kwargs)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_captured_step_trains_as_the_eager_loop(tmp_path, optimizer):
    """Same losses, accuracies, learning rates and weights; captured once per epoch, after the eager steps."""
    eager, graphed = fit(tmp_path / "eager", False, optimizer), fit(tmp_path / "graph", True, optimizer)
    assert same_rows(graphed, eager)
    for a, b in zip(eager.model.state_dict().values(), graphed.model.state_dict().values()):
        # fused Adam rounds a tiny gradient's normalised update otherwise than the eager one: 1e-4 apart
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 if optimizer == "sgd" else 1e-4)
    steps = len(graphed.data.train)
    assert graphed.graphed.captures == 1 and graphed.graphed.done == 3 * steps  # one capture, replayed throughout
    assert steps > FIRST_WARMUP_STEPS + 1
    assert all(group["lr"] is graphed.lr_tensor for group in graphed.optimizer.param_groups)
    assert graphed.lr_tensor.item() == pytest.approx(graphed.current_lr()) and eager.lr_tensor is None


def test_the_replays_read_each_batch_from_the_static_buffers(tmp_path):
    """After the capture, a step sees its own batch only by the copy into the static input: the step is called
    with the static tensors, whose contents are the batch."""
    seen = []

    def step(x, y):
        seen.append((x.data_ptr(), x.clone(), y.clone()))

    phase = {"value": 1}
    graphed = GraphedStep(step, lambda: None, torch.device("cpu"), key=lambda: phase["value"])
    batches = [(torch.full((2, 3), float(i)), torch.tensor([i, i])) for i in range(6)]
    for x, y in batches:
        graphed(x, y)
    assert graphed.captures == 1
    replays = seen[FIRST_WARMUP_STEPS:]
    assert len({ptr for ptr, _, _ in replays}) == 1  # one static buffer from the capture on
    for (_, x, y), (bx, by) in zip(replays, batches[FIRST_WARMUP_STEPS:]):
        assert torch.equal(x, bx) and torch.equal(y, by)
    graphed.new_epoch()  # nothing the step reads changed: the graph stays
    graphed(*batches[0])
    assert graphed.captures == 1 and seen[-1][0] == replays[0][0]
    phase["value"] = 2  # a callback changed a Python value the step reads: one eager step, then a new capture
    graphed.new_epoch()
    graphed(*batches[1])
    assert graphed.captures == 1 and seen[-1][0] == batches[1][0].data_ptr()
    graphed(*batches[2])
    assert graphed.captures == 2 and graphed.captured_key == 2


def test_a_python_value_a_callback_changes_makes_a_new_capture(tmp_path):
    """The DKD warm-up sets its loss's epoch in Python before every epoch: each epoch is captured anew, as the
    graph would otherwise replay the first epoch's weight of the DKD term."""
    from train.distill import DistillLoss
    from train.tasks import Distill

    def task():
        return Distill(tiny_model(), tiny_model().eval(), DistillLoss("dkd", warmup_epochs=2))

    cfg = TrainConfig(epochs=3, lr=0.05, cuda_graph=True)
    trainer = Trainer(task(), tiny_data(), cfg, log=lambda line: None)
    state = python_state(trainer.task)
    assert ("loss", "epoch", 0.0) in state and ("student", "training", True) in state
    trainer.fit()
    assert trainer.graphed.captures == 3
    eager = Trainer(task(), tiny_data(), TrainConfig(epochs=3, lr=0.05), log=lambda line: None)
    eager.fit()
    assert same_rows(trainer, eager)


def test_the_sums_stay_in_the_same_tensors():
    """A captured step adds to the tensors it was captured with: record and reset change them in place."""
    sums = EpochSums(torch.device("cpu"))
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    sums.add(torch.tensor(1.0), logits, y, {"term": torch.tensor(0.5)})
    tensors = [sums.loss, sums.correct, sums.steps, sums.seen, sums.bad_step, sums.bad_loss, sums.bad_flags,
               sums.terms["term"]]
    ptrs = [t.data_ptr() for t in tensors]
    sums.add(torch.tensor(float("nan")), logits, y, {"term": torch.tensor(1.0)})
    assert sums.read()["bad"]["step"] == 1 and sums.read()["terms"] == {"term": 3.0} and sums.read()["seen"] == 4
    sums.reset()
    now = [sums.loss, sums.correct, sums.steps, sums.seen, sums.bad_step, sums.bad_loss, sums.bad_flags,
           sums.terms["term"]]
    assert all(a is b and a.data_ptr() == p for a, b, p in zip(tensors, now, ptrs))
    assert sums.read() == {"loss": 0.0, "correct": 0.0, "seen": 0, "bad": None, "terms": {"term": 0.0}}


def test_a_run_resumes_into_the_captured_step_and_keeps_its_learning_rate_tensor(tmp_path):
    """1 epoch eager, a Ctrl-C, then --resume with --cuda-graph: the optimizer reads the trainer's lr tensor,
    and the run ends as one captured from the start."""
    straight = fit(tmp_path / "straight", True)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b", False, callbacks=[StopAfter(1)])
    cfg = TrainConfig(epochs=3, lr=0.05, cuda_graph=True, warmup_epochs=0.5)
    again = Trainer(Classify(tiny_model()), tiny_data(), cfg, tmp_path / "b", log=lambda line: None)
    again.resume()
    assert all(group["lr"] is again.lr_tensor for group in again.optimizer.param_groups)
    again.fit()
    assert same_rows(again, straight)


def test_what_cannot_share_the_graph_is_refused_in_one_line():
    with pytest.raises(ConfigError) as e:
        RuntimeSpec(compile=True, compile_mode="reduce-overhead", cuda_graph=True).validate()
    assert "--compile-mode default" in one_line(e)
    RuntimeSpec(compile=True, compile_mode="default", cuda_graph=True).validate()
    with pytest.raises(ReduceNetError) as e:
        Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(cuda_graph=True), dist_info=Dist(0, 2, 0))
    assert "torchrun" in one_line(e)


class FakeCuda:
    """Stands in for torch.cuda's streams and graphs on the CPU: records what GraphedStep asks of them. A capture
    runs the step (a real one only records its kernels) and a replay counts; ``fail`` makes the capture raise as
    torch does for a step that waits on the GPU."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail
        self.capturing = False
        fake = self

        class Stream:
            def __init__(self, device=None):
                fake.calls.append("side stream")

            def wait_stream(self, other):
                fake.calls.append("side waits")

        class Current:
            def wait_stream(self, other):
                fake.calls.append("current waits")

        class CUDAGraph:
            def replay(self):
                fake.calls.append("replay")

        class StreamContext:
            def __init__(self, stream):
                pass

            def __enter__(self):
                fake.calls.append("on side")

            def __exit__(self, *exc):
                return False

        class GraphContext:
            def __init__(self, graph, pool=None, stream=None, capture_error_mode="global"):
                assert isinstance(graph, CUDAGraph)
                fake.calls.append(f"capture ({capture_error_mode})")

            def __enter__(self):
                fake.capturing = True
                if fake.fail:
                    raise RuntimeError(fake.fail)

            def __exit__(self, *exc):
                fake.capturing = False
                return False

        self.Stream, self.CUDAGraph, self.stream, self.graph = Stream, CUDAGraph, StreamContext, GraphContext
        self.current_stream = lambda device=None: Current()

    def install(self, monkeypatch) -> None:
        for name in ("Stream", "CUDAGraph", "stream", "graph", "current_stream"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))


def test_on_a_gpu_the_warm_up_runs_on_a_side_stream_then_one_capture_is_replayed(monkeypatch):
    """The CUDA branch, with torch.cuda's streams and graphs stood in for: three eager steps on a side stream
    that waits for the current one (and the current for it), each after the gradients are reset; then the
    gradients reset, one capture of the step on the static buffers (thread-local errors: a loader thread may use
    CUDA meanwhile), and a replay for that batch and every later one, without calling the step again."""
    import inspect

    assert "capture_error_mode" in inspect.signature(torch.cuda.graph).parameters  # this torch's own API
    fake = FakeCuda()
    fake.install(monkeypatch)
    log: list = []
    graphed = GraphedStep(lambda x, y: log.append(("step", x.data_ptr(), fake.capturing)),
                          lambda: log.append("zero_grad"), torch.device("cuda"))
    assert graphed.capture
    batches = [(torch.full((2, 3), float(i)), torch.tensor([i, i])) for i in range(6)]
    for x, y in batches:
        graphed(x, y)
    eager = ["zero_grad", ("step", None, False)]
    assert [("step", None, e[2]) if isinstance(e, tuple) else e for e in log] == (
        eager * FIRST_WARMUP_STEPS + ["zero_grad", ("step", None, True)])
    assert log[-1][1] == graphed.static[0].data_ptr()  # captured on the static buffer
    warm = ["side stream", "side waits", "on side", "current waits"]
    assert fake.calls == warm * FIRST_WARMUP_STEPS + ["capture (thread_local)"] + ["replay"] * 3
    assert torch.equal(graphed.static[0], batches[-1][0]) and graphed.captures == 1


def test_a_step_that_cannot_be_captured_ends_in_one_line(monkeypatch):
    FakeCuda(fail="CUDA error: operation not permitted when stream is capturing\nmore detail").install(monkeypatch)
    graphed = GraphedStep(lambda x, y: None, lambda: None, torch.device("cuda"))
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
    for _ in range(FIRST_WARMUP_STEPS):
        graphed(x, y)
    with pytest.raises(ReduceNetError) as e:
        graphed(x, y)
    message = one_line(e)
    assert "not permitted when stream is capturing more detail" in message
    assert "train without --cuda-graph" in message and graphed.graph is None
