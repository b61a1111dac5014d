"""``deploy-speed``: latency and throughput of every zoo model's forms, timed side by side.

Forms: the teacher, the unfused student with LoRA, the fused student (eager PyTorch: the module tree
:func:`reparam.fuse_model` returns, and :func:`reparam.flatten` of it), the same network written by hand with
``nn.Conv2d`` and ``F.relu`` (ResNets; it proves fusion leaves nothing behind), the fused student exported
(TorchScript, ``torch.export``'s program as ``model.pt2`` holds it, onnxruntime), each beside the hand-written
net in the same form. Batch 1 (latency) and 128 (throughput), float32, random weights.
"""
from __future__ import annotations

import statistics
import tempfile
import timeit
import warnings
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import complexity, create_model, list_models
from models.deployed import Deployed, session_options
from models.reducenet import ReduceNet
from reparam import flatten, fuse_model
from reparam.export import export_program, trace

from ..provenance import git_commit, hardware
from ..timing import paired_ratio, time_rounds
from .report import write_table
from .specs import LORA_RANK


class HandWrittenResNet(nn.Module):
    """The fused CIFAR ResNet written directly: ``nn.Conv2d`` layers and ``F.relu``, no wrappers, no BatchNorm.

    Built from a fused ReduceNet student, whose weights it copies, so both compute the same function.
    """

    def __init__(self, fused: ReduceNet) -> None:
        super().__init__()

        def copy_conv(conv: nn.Conv2d) -> nn.Conv2d:
            new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            bias=True)
            new.load_state_dict(conv.state_dict())
            return new

        self.stem = copy_conv(fused.stem.conv)
        self.conv1, self.conv2, self.shortcut = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.has_shortcut: list[bool] = []
        for layer in (fused.layer1, fused.layer2, fused.layer3):
            for block in layer:
                self.conv1.append(copy_conv(block.conv1.conv))
                self.conv2.append(copy_conv(block.conv2.conv))
                sc = getattr(block.shortcut, "conv", None)
                self.shortcut.append(copy_conv(sc) if sc is not None else nn.Identity())
                self.has_shortcut.append(sc is not None)
        self.fc = nn.Linear(fused.fc.in_features, fused.fc.out_features)
        self.fc.load_state_dict(fused.fc.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for conv1, conv2, shortcut, has in zip(self.conv1, self.conv2, self.shortcut, self.has_shortcut):
            out = conv2(F.relu(conv1(x)))
            x = F.relu(out + (shortcut(x) if has else x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def onnx_runner(model: nn.Module, image_size: int) -> Callable[[torch.Tensor], Any] | None:
    """A callable running ``model`` through onnxruntime's CPU provider, or None without onnx/onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = Path(tempfile.mkdtemp()) / "model.onnx"
    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    # timed in turn with PyTorch in the same process: ORT's threads must not spin-wait into PyTorch's turn
    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    return lambda t: session.run(None, {"images": t.numpy()})


def exported_program(model: nn.Module, image_size: int) -> nn.Module:
    """``model`` as ``reparam.export`` writes it to ``model.pt2``, loaded back as :func:`models.load_any` serves it."""
    program = export_program(model, torch.randn(2, 3, image_size, image_size))
    return Deployed(program.module(), Path("model.pt2"), "torch.export")


def module_calls(model: nn.Module, image_size: int = 32) -> int:
    """How many ``nn.Module`` calls one forward pass of ``model`` makes (each one costs Python time at batch 1)."""
    calls = [0]
    hooks = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.randn(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()
    return calls[0]


def call_cost_us() -> tuple[float, float]:
    """Microseconds of one ``nn.Module`` call (of an ``nn.Identity``) and of one submodule attribute lookup, here."""
    parent = nn.Module()
    parent.child = nn.Identity()
    x = torch.zeros(1)
    n = 100_000

    def seconds(fn: Callable[[], Any]) -> float:
        return min(timeit.repeat(fn, number=n, repeat=5)) / n

    base, lookup, call = seconds(lambda: x), seconds(lambda: parent.child), seconds(lambda: parent.child(x))
    return 1e6 * (call - lookup), 1e6 * (lookup - base)


def model_forms(name: str) -> tuple[dict[str, Any], dict[str, nn.Module]]:
    """The timed forms of a zoo model (callables) and the modules whose size is reported."""
    torch.manual_seed(0)
    teacher = create_model(name, expansion=1)
    lora = create_model(name, expansion=0, lora_rank=LORA_RANK)
    fused = fuse_model(lora)
    forms: dict[str, Any] = {"teacher": teacher, f"student + LoRA r{LORA_RANK} (unfused)": lora,
                             "fused student": fused, "fused, flattened (torch.fx)": flatten(fused)}
    sizes = dict(forms)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(fused, ReduceNet):
            hand = HandWrittenResNet(fused).eval()
            forms["hand-written plain net"] = sizes["hand-written plain net"] = hand
            forms["hand-written, TorchScript"] = torch.jit.trace(hand, torch.randn(1, 3, 32, 32))
            forms["hand-written, torch.export"] = exported_program(hand, 32)
            sizes["hand-written, TorchScript"] = sizes["hand-written, torch.export"] = hand
        forms["fused, TorchScript"] = trace(fused, torch.randn(1, 3, 32, 32))  # as export writes model.ts
        forms["fused, torch.export (.pt2)"] = exported_program(fused, 32)
    sizes["fused, TorchScript"] = sizes["fused, torch.export (.pt2)"] = fused
    ort = onnx_runner(fused, 32)
    if ort is not None:
        forms["fused, onnxruntime"], sizes["fused, onnxruntime"] = ort, fused
    return forms, sizes


#: Each fused form and the hand-written net in the same form, which it must match in speed.
PLAIN_TWIN = {"fused student": "hand-written plain net", "fused, flattened (torch.fx)": "hand-written plain net",
              "fused, TorchScript": "hand-written, TorchScript",
              "fused, torch.export (.pt2)": "hand-written, torch.export"}


def speed_rows(args) -> list[dict[str, Any]]:
    """Deploy-speed rows: every zoo model in each of its forms, on the CPU (and the GPU, without onnxruntime)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for name in args.models or list_models(reducible=True):
        forms, sizes = model_forms(name)
        table = {form: {"model": name, "form": form, **complexity(sizes[form])} for form in forms}
        for form, model in forms.items():
            if isinstance(model, nn.Module) and not isinstance(model, (Deployed, torch.jit.ScriptModule)):
                table[form]["module_calls"] = module_calls(model)
        for dev in devices:
            tag = "cpu" if dev.type == "cpu" else "gpu"
            timed = {k: v for k, v in forms.items()  # a program's constants stay on the device it was exported on
                     if dev.type == "cpu" or (isinstance(v, nn.Module) and not isinstance(v, Deployed))}
            b1 = time_rounds(timed, 1, dev, args.repeats)
            b128 = time_rounds(timed, 128, dev, max(3, args.repeats // 5), warmup=2)
            for form in timed:
                table[form][f"{tag}_latency_ms_b1"] = 1e3 * statistics.median(b1[form])
                table[form][f"{tag}_img_per_s_b128"] = 128 / statistics.median(b128[form])
            for form, plain_form in PLAIN_TWIN.items():
                if plain_form in timed and form in timed:
                    row = table[form]
                    row[f"{tag}_fused_over_plain"] = paired_ratio(b1[form], b1[plain_form])
                    row[f"{tag}_fused_over_plain_b128"] = paired_ratio(b128[form], b128[plain_form])
            fused = "fused, flattened (torch.fx)"
            table["teacher"][f"{tag}_teacher_over_fused_b1"] = paired_ratio(b1["teacher"], b1[fused])
            table["teacher"][f"{tag}_teacher_over_fused_b128"] = paired_ratio(b128["teacher"], b128[fused])
        table["teacher"]["macs_teacher_over_fused"] = table["teacher"]["macs"] / table["fused student"]["macs"]
        for row in table.values():
            print(f"  {name:18s} {row['form']:32s} {row['cpu_latency_ms_b1']:7.2f} ms", flush=True)
        rows += table.values()
    return rows


def speed_table(args) -> Path:
    rows = speed_rows(args)
    call_us, lookup_us = call_cost_us()
    gpu = torch.cuda.is_available()
    header = [
        f"Generated by `python -m train.reproduce deploy-speed --repeats {args.repeats}` at commit {git_commit()}, "
        f"{date.today().isoformat()}.",
        f"- Hardware: {hardware(torch.device('cpu'))}"
        + (f"; GPU {torch.cuda.get_device_name()}" if gpu else "; no GPU") + f"; torch {torch.__version__}.",
        f"- Random weights, 32x32 input, float32, eval mode, `torch.inference_mode`; median of {args.repeats} timed "
        f"runs at batch 1 and {max(3, args.repeats // 5)} at batch 128. The forms of a model are timed in turn "
        "within each round (each round starting one form further on), so they see the same machine state; every "
        "ratio is the median over rounds of the two forms' ratio in the same round.",
        "- `fused / hand-written` is a fused student's latency (b1) or time per image (b128) over the same ResNet "
        "written directly with `nn.Conv2d` and `F.relu` (same weights), in the same form (eager, traced to "
        "TorchScript, or exported with `torch.export` as `model.pt2` holds it). `module calls` counts the "
        "`nn.Module` calls of one eager forward pass: the op counts of the fused forms and the hand-written net are "
        "equal, and what the module tree adds at b1 is Python, one module call and one submodule lookup at a time "
        f"(measured here: {call_us:.2f} us per call, {lookup_us:.2f} us per lookup). `reparam.flatten` (one flat "
        "torch.fx graph) is the eager deploy form. "
        "`teacher / fused` is the teacher's latency (b1) or time per image (b128) over the flattened fused "
        "student's, beside their MACs ratio.",
        "- glibc's malloc keeps freed memory in this process (`train.timing.keep_freed_memory`): by default it "
        "returns large blocks to the kernel, and each b128 forward pass page-faults its activations back by an "
        "amount that depends on the order in which a form frees its tensors, not on its arithmetic.",
    ]
    columns = [("model", "model"), ("form", "form"), ("params", "params"), ("MACs", "macs"),
               ("module calls", "module_calls"),
               ("CPU latency b1 (ms)", "cpu_latency_ms_b1"), ("CPU img/s b128", "cpu_img_per_s_b128"),
               ("fused / hand-written (CPU b1)", "cpu_fused_over_plain"),
               ("fused / hand-written (CPU b128)", "cpu_fused_over_plain_b128"),
               ("teacher / fused: CPU b1", "cpu_teacher_over_fused_b1"),
               ("CPU b128", "cpu_teacher_over_fused_b128"), ("MACs", "macs_teacher_over_fused")]
    if gpu:
        columns += [("GPU latency b1 (ms)", "gpu_latency_ms_b1"), ("GPU img/s b128", "gpu_img_per_s_b128"),
                    ("fused / hand-written (GPU b1)", "gpu_fused_over_plain"),
                    ("fused / hand-written (GPU b128)", "gpu_fused_over_plain_b128")]
    return write_table("deploy-speed", header, rows, columns, Path(args.results), [])
