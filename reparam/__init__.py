"""Reparameterization: fusion maths (``transforms``), whole-model fusion (``fusion``) and export (``export``).

``python -m reparam.fuse CHECKPOINT --out DIR`` is the command-line entry point.
"""
from . import transforms
from .fusion import fuse_model, max_abs_diff

__all__ = ["transforms", "fuse_model", "max_abs_diff"]
