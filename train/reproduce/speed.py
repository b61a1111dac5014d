"""``deploy-speed``: latency and throughput of every zoo model's forms, timed side by side.

Forms: the teacher, the unfused student with LoRA, the fused student (eager PyTorch), the same network written
by hand with ``nn.Conv2d`` and ``F.relu`` (ResNets; it proves fusion leaves nothing behind), TorchScript and
onnxruntime of the fused student. Batch 1 (latency) and 128 (throughput), float32, random weights.
"""
from __future__ import annotations

import tempfile
import warnings
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import complexity, create_model, list_models
from models.reducenet import ReduceNet
from reparam import flatten, fuse_model

from ..provenance import git_commit, hardware
from ..timing import measure
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
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # timed in turn with PyTorch in the same process: ORT's threads must not spin-wait into PyTorch's turn
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda t: session.run(None, {"images": t.numpy()})


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
            sizes["hand-written, TorchScript"] = hand
        forms["fused, TorchScript"] = torch.jit.trace(fused, torch.randn(1, 3, 32, 32))
    sizes["fused, TorchScript"] = fused
    ort = onnx_runner(fused, 32)
    if ort is not None:
        forms["fused, onnxruntime"], sizes["fused, onnxruntime"] = ort, fused
    return forms, sizes


#: Each fused form and the hand-written net in the same form, which it must match in speed.
PLAIN_TWIN = {"fused student": "hand-written plain net", "fused, flattened (torch.fx)": "hand-written plain net",
              "fused, TorchScript": "hand-written, TorchScript"}


def speed_rows(args) -> list[dict[str, Any]]:
    """Deploy-speed rows: every zoo model in each of its forms, on the CPU (and the GPU, without onnxruntime)."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for name in args.models or list_models(reducible=True):
        forms, sizes = model_forms(name)
        table = {form: {"model": name, "form": form, **complexity(sizes[form])} for form in forms}
        for dev in devices:
            tag = "cpu" if dev.type == "cpu" else "gpu"
            timed = {k: v for k, v in forms.items() if dev.type == "cpu" or isinstance(v, nn.Module)}
            b1 = measure(timed, 1, dev, args.repeats)
            b128 = measure(timed, 128, dev, max(3, args.repeats // 5), warmup=2)
            for form in timed:
                table[form][f"{tag}_latency_ms_b1"] = 1e3 * b1[form]
                table[form][f"{tag}_img_per_s_b128"] = 128 / b128[form]
            fused, teacher = table["fused, flattened (torch.fx)"], table["teacher"]
            for form, plain_form in PLAIN_TWIN.items():
                if plain_form in timed and form in timed:
                    row, plain = table[form], table[plain_form]
                    row[f"{tag}_fused_over_plain"] = row[f"{tag}_latency_ms_b1"] / plain[f"{tag}_latency_ms_b1"]
                    row[f"{tag}_fused_over_plain_b128"] = plain[f"{tag}_img_per_s_b128"] / row[f"{tag}_img_per_s_b128"]
            t_row, f_row = teacher, fused
            t_row[f"{tag}_teacher_over_fused_b1"] = t_row[f"{tag}_latency_ms_b1"] / f_row[f"{tag}_latency_ms_b1"]
            t_row[f"{tag}_teacher_over_fused_b128"] = f_row[f"{tag}_img_per_s_b128"] / t_row[f"{tag}_img_per_s_b128"]
        table["teacher"]["macs_teacher_over_fused"] = table["teacher"]["macs"] / table["fused student"]["macs"]
        for row in table.values():
            print(f"  {name:18s} {row['form']:32s} {row['cpu_latency_ms_b1']:7.2f} ms", flush=True)
        rows += table.values()
    return rows


def speed_table(args) -> Path:
    rows = speed_rows(args)
    gpu = torch.cuda.is_available()
    header = [
        f"Generated by `python -m train.reproduce deploy-speed --repeats {args.repeats}` at commit {git_commit()}, "
        f"{date.today().isoformat()}.",
        f"- Hardware: {hardware(torch.device('cpu'))}"
        + (f"; GPU {torch.cuda.get_device_name()}" if gpu else "; no GPU") + f"; torch {torch.__version__}.",
        f"- Random weights, 32x32 input, float32, eval mode, `torch.inference_mode`; median of {args.repeats} timed "
        f"runs at batch 1 and {max(3, args.repeats // 5)} at batch 128; the forms of a model are timed in turn "
        "within each round, so they see the same machine state.",
        "- `fused / hand-written` is a fused student's latency (b1) or time per image (b128) over the same ResNet "
        "written directly with `nn.Conv2d` and `F.relu` (same weights), in the same form (eager, or both traced to "
        "TorchScript). At b1 the fused module tree pays Python's call overhead of its wrappers and `Identity` "
        "BatchNorms; `reparam.flatten` (one flat torch.fx graph) removes most of it. `teacher / fused` is the "
        "teacher's latency (b1) or time per image (b128) over the flattened fused student's, beside their MACs "
        "ratio.",
        "- glibc's malloc keeps freed memory in this process (`train.timing.keep_freed_memory`): by default it "
        "returns large blocks to the kernel, and each b128 forward pass page-faults its activations back by an "
        "amount that depends on the order in which a form frees its tensors, not on its arithmetic.",
    ]
    columns = [("model", "model"), ("form", "form"), ("params", "params"), ("MACs", "macs"),
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
