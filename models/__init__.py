"""Model zoo: ReduceNet and ReduceMobileNetV2 teachers, students and deploy forms.

>>> import models
>>> teacher = models.create_model("reduce56", num_classes=10, expansion=1)
>>> student = models.student_from_teacher(teacher, lora_rank=8)
"""
from . import mobilenetv2, reducenet, vgg  # noqa: F401  (registers the families)
from .checkpoint import load_checkpoint, load_weights, read_record, save_checkpoint
from .complexity import complexity, count_macs, count_params
from .deployed import load_any
from .grow import grow, ungrow
from .errors import CheckpointError, ConfigError, ReduceNetError, ReparamError, UnknownModelError
from .layers import ConvBN, LambdaReLU, LoRABranch, add_lora, set_lambda
from .registry import create_model, list_models, model_from_config
from .surgery import student_from_teacher

__all__ = [
    "create_model", "list_models", "model_from_config", "student_from_teacher", "grow", "ungrow",
    "save_checkpoint", "load_checkpoint", "load_weights", "read_record", "load_any",
    "complexity", "count_params", "count_macs",
    "ConvBN", "LambdaReLU", "LoRABranch", "add_lora", "set_lambda",
    "ReduceNetError", "UnknownModelError", "ConfigError", "ReparamError", "CheckpointError",
]
