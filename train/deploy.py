"""The end of every student's training: fuse it, check the fused model on the test set, export it, report."""
from __future__ import annotations

import json
from typing import Any

import torch.nn as nn

from models import complexity
from models.checkpoint import atomic_write_text
from reparam import compare_on, fuse_model
from reparam.export import export_deploy

from .cli import size_line
from .engine import Trainer


def fuse_check_export(trainer: Trainer, teacher: nn.Module, teacher_view: nn.Module, summary: dict[str, Any],
                      export: bool, metadata: dict[str, Any], student_label: str) -> dict[str, Any]:
    """Fuse ``trainer.model``, check it against the unfused model on the test set, export to ``RUN/deploy``, print.

    The check (:func:`reparam.compare_on`) bounds the logit difference and allows a prediction to differ only on a
    near-tie, where float32 rounding decides: a test accuracy may then differ by such samples, and both
    accuracies are reported.

    Args:
        trainer: the finished trainer (its model, data, run directory and ranks).
        teacher: the teacher, for its size.
        teacher_view: the teacher as it sees the student's batches (its own preprocessing), for its accuracy.
        summary: the training summary (its last test accuracy and size are the unfused model's); the fusion
            results are added and ``summary.json`` is rewritten.
        export: write the deploy files (fused safetensors + JSON, TorchScript, ONNX).
        metadata: stored with the deploy checkpoint.
        student_label: how the student is named in the printed lines.

    Raises:
        ReparamError: the fused model does not compute the unfused one's function; nothing is exported then.
    """
    data, info, run_dir = trainer.data, trainer.dist, trainer.run_dir
    fused = fuse_model(trainer.model)
    check = compare_on(trainer.model, fused, data.test)
    unfused_acc = summary["last_test_acc"]  # the trained model's last evaluation, in the same float32 pass
    fused_eval = trainer.evaluate(fused)
    teacher_eval = trainer.evaluate(teacher_view)
    input_size = (3, data.info.image_size, data.info.image_size)
    sizes = {"teacher": complexity(teacher, (1, *input_size)),
             "student": {"params": summary["params"], "macs": summary["macs"]},
             "fused": complexity(fused, (1, *input_size))}
    summary.update(teacher_test_acc=teacher_eval["test_acc"], unfused_test_acc=unfused_acc,
                   fused_test_acc=fused_eval["test_acc"], fused_check=check, sizes=sizes)
    if info.is_main:
        if export:
            report = export_deploy(trainer.model, run_dir / "deploy", input_size,
                                   metadata={**metadata, "fused_test_acc": fused_eval["test_acc"]})
            summary["deploy"] = {k: str(v) for k, v in report.files.items()}
            summary["export_max_diff"] = report.max_diff
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(f"data: {data.info.label}, {fused_eval['count']} test images")
        kind = f" (e{teacher.config['expansion']})" if "expansion" in teacher.config else ""
        print(size_line(f"teacher {teacher.config['model']}{kind}", sizes["teacher"], teacher_eval["test_acc"]))
        print(size_line(student_label, sizes["student"], unfused_acc))
        print(size_line("fused deploy model", sizes["fused"], fused_eval["test_acc"]))
        print(f"run: {run_dir}" + (f"; deploy files in {run_dir / 'deploy'}" if export else ""))
    return summary
