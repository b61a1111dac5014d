"""The end of every student's training: fuse it, check the fused model on the test set, export it, report."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from models import complexity
from reparam import compare_on, fuse_model
from reparam.export import export_deploy

from .callbacks import Callback
from .assemble import size_line
from .engine import Trainer


class FuseCheckExport(Callback):
    """At the end of training: fuse ``trainer.model``, check it against the unfused model on the test set, export
    to ``RUN/deploy``, add the results to the summary and print them.

    The check (:func:`reparam.compare_on`) bounds the logit difference and allows a prediction to differ only on a
    near-tie, where float32 rounding decides: a test accuracy may then differ by such samples, and both
    accuracies are reported. Put it before the writer of ``summary.json``.

    Args:
        teacher: the teacher, for its size.
        teacher_view: the teacher as it sees the student's batches (its own preprocessing), for its accuracy.
        export: write the deploy files (fused safetensors + JSON, TorchScript, ONNX).
        metadata: stored with the deploy checkpoint.
        student_label: how the student is named in the printed lines.
        before: a row printed before the student's: ``{"label", "params", "macs", "acc"}`` (e.g. a trimmed network
            before its fine-tuning).

    Raises:
        ReparamError: the fused model does not compute the unfused one's function; nothing is exported then.
    """

    def __init__(self, teacher: nn.Module, teacher_view: nn.Module, export: bool, metadata: dict[str, Any],
                 student_label: str, before: dict[str, Any] | None = None) -> None:
        self.teacher, self.teacher_view, self.export = teacher, teacher_view, export
        self.metadata, self.student_label, self.before = metadata, student_label, before

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        data, info, run_dir = trainer.data, trainer.dist, trainer.run_dir
        fused = fuse_model(trainer.model)
        check = compare_on(trainer.model, fused, data.test)
        unfused_acc = summary["last_test_acc"]  # the trained model's last evaluation, in the same float32 pass
        fused_eval = trainer.evaluate(fused)
        teacher_eval = trainer.evaluate(self.teacher_view)
        input_size = (3, data.info.image_size, data.info.image_size)
        sizes = {"teacher": complexity(self.teacher, (1, *input_size)),
                 "student": {"params": summary["params"], "macs": summary["macs"]},
                 "fused": complexity(fused, (1, *input_size))}
        summary.update(teacher_test_acc=teacher_eval["test_acc"], unfused_test_acc=unfused_acc,
                       fused_test_acc=fused_eval["test_acc"], fused_check=check, sizes=sizes)
        if not info.is_main:
            return
        if self.export:
            report = export_deploy(trainer.model, run_dir / "deploy", input_size,
                                   metadata={**self.metadata, "fused_test_acc": fused_eval["test_acc"]})
            summary["deploy"] = {k: str(v) for k, v in report.files.items()}
            summary["export_max_diff"] = report.max_diff
        print(f"data: {data.info.label}, {fused_eval['count']} test images")
        config = self.teacher.config
        kind = (f" (grown e{config['grow']['expansion']})" if config.get("grow")
                else f" (e{config['expansion']})" if "expansion" in config else "")
        print(size_line(f"teacher {config['model']}{kind}", sizes["teacher"], teacher_eval["test_acc"]))
        if self.before:
            print(size_line(self.before["label"], self.before, self.before["acc"]))
        print(size_line(self.student_label, sizes["student"], unfused_acc))
        print(size_line("fused deploy model", sizes["fused"], fused_eval["test_acc"]))
        print(f"run: {run_dir}" + (f"; deploy files in {run_dir / 'deploy'}" if self.export else ""))
