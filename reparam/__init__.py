"""Reparameterization above the model zoo: whole-model fusion (``fusion``) and deployment export (``export``).

The fusion maths itself (pure functions on tensors) lives in :mod:`models.fusion_math`, because every fusable
layer's ``reparameterize()`` (timm's protocol) uses it; packages import downwards only: ``train`` -> ``reparam``
-> ``models``. ``python -m reparam.fuse CHECKPOINT --out DIR`` is the command-line entry point.
"""
from .fusion import check_fusable, compare_on, flatten, fold_batchnorms, fuse_model, max_abs_diff

__all__ = ["fuse_model", "check_fusable", "flatten", "fold_batchnorms", "compare_on", "max_abs_diff"]
