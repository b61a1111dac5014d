"""The Pyramid's VGG family: VGG19 and its sub-networks SVGG17 → SVGG14 → SVGG11 → SVGG8 → SVGG5.

"The Pyramid" (Ravindran & Fita Sanmartin, ASHISRAVINDRAN/pyramid_compression) compresses VGG19 one level
at a time: each level replaces ONE part of the level above (a VGG block, or the 3-FC head) by a single conv
(or a single FC layer) and keeps every other tensor of the level above. The new conv is first trained to
imitate the parent's output at the end of the part it replaced (stage 1, a hint/MSE loss), then the whole
network is fine-tuned (stage 2).

``pyramid_vgg19`` is the original's VGG19: torchvision's ``vgg19`` without BatchNorm (3x3 convs, padding 1,
each followed by ReLU; blocks of 2, 2, 4, 4, 4 convs, each block ending in MaxPool 2x2/2; no average pool)
with the classifier ``Linear(512·s², 2048) → ReLU → Dropout(0.5) → Linear(2048, 512) → ReLU → Dropout(0.5)
→ Linear(512, C)``, ``s = image_size / 32`` (the original trained at 96 px, so s = 3 and 4608 inputs)::

    x → block1 [C3→64, C64→64, P] → block2 [C64→128, C128→128, P] → block3 [C128→256, 3×C256→256, P]
      → block4 [C256→512, 3×C512→512, P] → block5 [4×C512→512, P] → head (3 FC)

(``C`` = Conv3x3 [+ BN] + ReLU, ``P`` = MaxPool 2x2/2.) A ``compressed{k}`` unit is one conv with the
channels of block k, then the pool: ``compressed{k} = [C(in_k→out_k), P]``. Replacing block 2 is special,
exactly as in the original: the region from ``conv1_2`` to ``pool2`` becomes ``compressed2 = [P, C64→128, P]``
(block 1 keeps only its first conv, and pool 1 moves before the new conv). The linear head is
``Dropout(0.5) → Linear(512·s², C)``.

The levels (``b`` = a kept VGG block, ``c`` = a ``compressed`` unit; ``1`` = block 1 without conv1_2)::

    level               block 1 2 3 4 5   head     replaces (in the level above)
    pyramid_vgg19             b b b b b   3 FC     -
    svgg17_forward            b b b b b   linear   head
    svgg14_forward            b b b b c   linear   block 5
    svgg11_forward            b b b c c   linear   block 4
    svgg8_forward             b b c c c   linear   block 3
    svgg5_forward             1 c c c c   linear   conv1_2 .. pool2
    svgg17_backward           1 c b b b   3 FC     conv1_2 .. pool2
    svgg14_backward           1 c c b b   3 FC     block 3
    svgg11_backward           1 c c c b   3 FC     block 4
    svgg8_backward            1 c c c c   3 FC     block 5
    svgg5_backward            1 c c c c   linear   head

Both SVGG5 are the same network (5 convs + 1 FC: the name counts the convs, it has 6 weight layers); they
differ in the chain that produced their weights. Module names are stable along a chain: a kept part has the
same path (and so the same state_dict keys) in every level that has it, and a replacing part has its own
name (``features.compressed{k}``, ``head.fc``), so :func:`svgg_from` copies tensors by name.

``bn=True`` (``pyramid_vgg19_bn`` at the top) puts BatchNorm after every conv: every conv is a
:class:`~models.layers.ConvBNAct`, which :func:`reparam.fuse_model` folds into a biased conv. With
``bn=False`` every conv already is that biased conv (``ConvBNAct`` in inference form), so ``inference_mode``
changes nothing, and a fused ``bn=True`` model has exactly the tensors of the ``bn=False`` one.

Shapes: ``[N, 3, S, S] -> features [N, 512, S/32, S/32] -> head [N, num_classes]``; the input must be
``image_size`` pixels square (the head's first Linear takes ``512 * (image_size // 32) ** 2`` features).

Names: ``pyramid_vgg19`` / ``pyramid_vgg19_bn``, not ``vgg19`` / ``vgg19_bn``: :func:`register_model` also
registers with timm, whose own ``vgg19`` / ``vgg19_bn`` it would overwrite (and ``timm:vgg19`` would build
this network instead of timm's).

>>> import models
>>> from models.vgg import hint_points, next_level
>>> teacher = models.create_model("pyramid_vgg19", num_classes=100, image_size=96)
>>> student = next_level(teacher, "forward")          # svgg17_forward, inheriting the 16 convs
>>> points = hint_points("svgg17_forward")             # where its stage-1 loss reads activations

Initialisation: convs as torchvision's VGG (Kaiming normal, fan-out, zero bias); Linears and BatchNorms with
PyTorch's defaults (the original replaced torchvision's Linears, so they had PyTorch's default too; its new
SVGG convs had PyTorch's default where ours have Kaiming).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
from torch import Tensor

from .errors import ConfigError
from .layers import ConvBNAct, check_int
from .registry import model_from_config, register_model
from .surgery import inherit

CONVS = (2, 2, 4, 4, 4)  # convs in VGG19's blocks 1..5
CHANNELS = (3, 64, 128, 256, 512, 512)  # block k maps CHANNELS[k - 1] -> CHANNELS[k]
HIDDEN = (2048, 512)  # the 3-FC head's hidden widths (the original's at 96 px)
DROPOUT = 0.5
TOP = "pyramid_vgg19"
TOP_BN = "pyramid_vgg19_bn"
#: Each scheme's chain below VGG19, as (depth, what that level replaces in the level above): a block number
#: (2 = the region conv1_2 .. pool2) or "head".
SCHEMES: dict[str, tuple[tuple[int, int | str], ...]] = {
    "forward": ((17, "head"), (14, 5), (11, 4), (8, 3), (5, 2)),  # compress from the deep end
    "backward": ((17, 2), (14, 3), (11, 4), (8, 5), (5, "head")),  # compress from the input end
}


@dataclass(frozen=True)
class Level:
    """One architecture of the pyramid.

    Attributes:
        name: registered name, e.g. ``"svgg14_forward"`` (``"pyramid_vgg19"`` at the top).
        scheme: ``"forward"``, ``"backward"``, or None for VGG19.
        parent: the level above in the scheme (None for VGG19).
        replaces: what this level replaced in its parent: a block number 2..5 or ``"head"`` (None for VGG19).
        compressed: the blocks that are a single conv, ascending.
        head: ``"mlp"`` (VGG19's 3 FC layers) or ``"linear"`` (Dropout + one FC layer).
    """

    name: str
    scheme: str | None
    parent: str | None
    replaces: int | str | None
    compressed: tuple[int, ...]
    head: str


def _build_levels() -> dict[str, Level]:
    levels = {TOP: Level(TOP, None, None, None, (), "mlp")}
    for scheme, steps in SCHEMES.items():
        parent = levels[TOP]
        for depth, replaces in steps:
            name = f"svgg{depth}_{scheme}"
            compressed = parent.compressed if replaces == "head" else tuple(sorted({*parent.compressed, replaces}))
            head = "linear" if replaces == "head" else parent.head
            parent = levels[name] = Level(name, scheme, parent.name, replaces, compressed, head)
    return levels


LEVELS: dict[str, Level] = _build_levels()


def chain(scheme: str) -> list[str]:
    """The level names of a scheme from the top: ``["pyramid_vgg19", "svgg17_<scheme>", ..., "svgg5_<scheme>"]``."""
    _check_scheme(scheme)
    return [TOP] + [f"svgg{depth}_{scheme}" for depth, _ in SCHEMES[scheme]]


def _check_scheme(scheme: object) -> str:
    if scheme not in SCHEMES:
        raise ConfigError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    return scheme  # type: ignore[return-value]


def _level(level: object, argument: str = "level") -> Level:
    if not isinstance(level, str) or level not in LEVELS:
        raise ConfigError(f"{argument} must be one of {', '.join(LEVELS)}, got {level!r}")
    return LEVELS[level]


def _conv(in_chs: int, out_chs: int, bn: bool, inference_mode: bool) -> ConvBNAct:
    """Conv3x3 (stride 1, padding 1) + [BN] + ReLU; without BN it is the biased conv of the inference form."""
    return ConvBNAct(in_chs, out_chs, 3, inference_mode=inference_mode or not bn)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=2, stride=2)


class PyramidVGG(nn.Module):
    """VGG19 or one of its SVGG levels (see the module docstring for the table).

    Args:
        level: a name of :data:`LEVELS`, e.g. ``"svgg14_forward"``.
        num_classes: classifier outputs.
        image_size: input height = width, a positive multiple of 32 (the original used 96).
        bn: BatchNorm after every conv (False: as the original).
        inference_mode: the fused deploy form (biased convs, no BatchNorm); loads fused weights strictly.
            Changes nothing when ``bn=False``.

    Attributes:
        level: the :class:`Level` built.
        features: ``nn.Sequential`` of ``block{k}`` (VGG blocks, children ``conv1..convN, pool``) and
            ``compressed{k}`` (children ``[pool_in,] conv, pool``) units.
        head: ``nn.Sequential``: ``flatten, fc1, relu1, drop1, fc2, relu2, drop2, fc3`` or ``flatten, drop, fc``.
    """

    def __init__(self, level: str, num_classes: int = 10, image_size: int = 32, bn: bool = False,
                 inference_mode: bool = False) -> None:
        super().__init__()
        spec = _level(level)
        check_int("num_classes", num_classes, 1, "pass the dataset's class count")
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 32 or image_size % 32:
            raise ConfigError(f"image_size must be a positive multiple of 32 (32 for CIFAR, 96 as in the original), "
                              f"got {image_size!r}")
        for name, value in (("bn", bn), ("inference_mode", inference_mode)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} must be True or False, got {value!r}")
        self.level = spec
        self.config: dict[str, Any] = dict(num_classes=num_classes, image_size=image_size, bn=bn,
                                           inference_mode=inference_mode)
        self.num_classes = num_classes
        self.image_size = image_size
        self.num_features = CHANNELS[5] * (image_size // 32) ** 2

        def conv(i: int, o: int) -> ConvBNAct:
            return _conv(i, o, bn, inference_mode)

        units: OrderedDict[str, nn.Module] = OrderedDict()
        for k in range(1, 6):
            c_in, c_out = CHANNELS[k - 1], CHANNELS[k]
            if k == 1 and 2 in spec.compressed:  # conv1_2 and pool1 went into compressed2
                units["block1"] = nn.Sequential(OrderedDict(conv1=conv(c_in, c_out)))
            elif k in spec.compressed:
                layers = OrderedDict(pool_in=_pool()) if k == 2 else OrderedDict()
                layers.update(conv=conv(c_in, c_out), pool=_pool())
                units[f"compressed{k}"] = nn.Sequential(layers)
            else:
                layers = OrderedDict((f"conv{j}", conv(c_in if j == 1 else c_out, c_out))
                                     for j in range(1, CONVS[k - 1] + 1))
                layers["pool"] = _pool()
                units[f"block{k}"] = nn.Sequential(layers)
        self.features = nn.Sequential(units)

        if spec.head == "mlp":
            self.head = nn.Sequential(OrderedDict(
                flatten=nn.Flatten(1),
                fc1=nn.Linear(self.num_features, HIDDEN[0]), relu1=nn.ReLU(), drop1=nn.Dropout(DROPOUT),
                fc2=nn.Linear(HIDDEN[0], HIDDEN[1]), relu2=nn.ReLU(), drop2=nn.Dropout(DROPOUT),
                fc3=nn.Linear(HIDDEN[1], num_classes),
            ))
        else:
            self.head = nn.Sequential(OrderedDict(
                flatten=nn.Flatten(1), drop=nn.Dropout(DROPOUT), fc=nn.Linear(self.num_features, num_classes),
            ))
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, 3, S, S] -> [N, 512, S/32, S/32]``."""
        return self.features(x)

    def forward_head(self, x: Tensor) -> Tensor:
        """``[N, 512, S/32, S/32] -> [N, num_classes]``."""
        return self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------------- factories
@register_model
def pyramid_vgg19(num_classes: int = 10, image_size: int = 32, inference_mode: bool = False) -> PyramidVGG:
    """The Pyramid's VGG19: 16 convs without BN + 3 FC (20.0M conv + 9.5M FC params at 96 px, 100 classes)."""
    model = PyramidVGG(TOP, num_classes, image_size, False, inference_mode)
    del model.config["bn"]
    return model


@register_model
def pyramid_vgg19_bn(num_classes: int = 10, image_size: int = 32, inference_mode: bool = False) -> PyramidVGG:
    """:func:`pyramid_vgg19` with BatchNorm after every conv (torchvision's ``vgg19_bn`` layout, same head)."""
    model = PyramidVGG(TOP, num_classes, image_size, True, inference_mode)
    del model.config["bn"]
    return model


@register_model
def svgg17_forward(num_classes: int = 10, image_size: int = 32, bn: bool = False,
                   inference_mode: bool = False) -> PyramidVGG:
    """Forward SVGG17: VGG19's 16 convs + Dropout + Linear(512·s², C) (the 3-FC head replaced)."""
    return PyramidVGG("svgg17_forward", num_classes, image_size, bn, inference_mode)


@register_model
def svgg14_forward(num_classes: int = 10, image_size: int = 32, bn: bool = False,
                   inference_mode: bool = False) -> PyramidVGG:
    """Forward SVGG14: SVGG17 with block 5 replaced by Conv512→512 + pool (13 convs + 1 FC)."""
    return PyramidVGG("svgg14_forward", num_classes, image_size, bn, inference_mode)


@register_model
def svgg11_forward(num_classes: int = 10, image_size: int = 32, bn: bool = False,
                   inference_mode: bool = False) -> PyramidVGG:
    """Forward SVGG11: SVGG14 with block 4 replaced by Conv256→512 + pool (10 convs + 1 FC)."""
    return PyramidVGG("svgg11_forward", num_classes, image_size, bn, inference_mode)


@register_model
def svgg8_forward(num_classes: int = 10, image_size: int = 32, bn: bool = False,
                  inference_mode: bool = False) -> PyramidVGG:
    """Forward SVGG8: SVGG11 with block 3 replaced by Conv128→256 + pool (7 convs + 1 FC)."""
    return PyramidVGG("svgg8_forward", num_classes, image_size, bn, inference_mode)


@register_model
def svgg5_forward(num_classes: int = 10, image_size: int = 32, bn: bool = False,
                  inference_mode: bool = False) -> PyramidVGG:
    """Forward SVGG5: SVGG8 with conv1_2 .. pool2 replaced by pool + Conv64→128 + pool (5 convs + 1 FC)."""
    return PyramidVGG("svgg5_forward", num_classes, image_size, bn, inference_mode)


@register_model
def svgg17_backward(num_classes: int = 10, image_size: int = 32, bn: bool = False,
                    inference_mode: bool = False) -> PyramidVGG:
    """Backward SVGG17: VGG19 with conv1_2 .. pool2 replaced by pool + Conv64→128 + pool (14 convs + 3 FC)."""
    return PyramidVGG("svgg17_backward", num_classes, image_size, bn, inference_mode)


@register_model
def svgg14_backward(num_classes: int = 10, image_size: int = 32, bn: bool = False,
                    inference_mode: bool = False) -> PyramidVGG:
    """Backward SVGG14: SVGG17 with block 3 replaced by Conv128→256 + pool (11 convs + 3 FC)."""
    return PyramidVGG("svgg14_backward", num_classes, image_size, bn, inference_mode)


@register_model
def svgg11_backward(num_classes: int = 10, image_size: int = 32, bn: bool = False,
                    inference_mode: bool = False) -> PyramidVGG:
    """Backward SVGG11: SVGG14 with block 4 replaced by Conv256→512 + pool (8 convs + 3 FC)."""
    return PyramidVGG("svgg11_backward", num_classes, image_size, bn, inference_mode)


@register_model
def svgg8_backward(num_classes: int = 10, image_size: int = 32, bn: bool = False,
                   inference_mode: bool = False) -> PyramidVGG:
    """Backward SVGG8: SVGG11 with block 5 replaced by Conv512→512 + pool (5 convs + 3 FC)."""
    return PyramidVGG("svgg8_backward", num_classes, image_size, bn, inference_mode)


@register_model
def svgg5_backward(num_classes: int = 10, image_size: int = 32, bn: bool = False,
                   inference_mode: bool = False) -> PyramidVGG:
    """Backward SVGG5: SVGG8 with the 3-FC head replaced by Dropout + Linear(512·s², C) (5 convs + 1 FC)."""
    return PyramidVGG("svgg5_backward", num_classes, image_size, bn, inference_mode)


# ---------------------------------------------------------------------------------------------------- surgery
def level_name(model: str | None) -> str | None:
    """The level (a name of :data:`LEVELS`) that the registered model ``model`` builds: ``pyramid_vgg19_bn`` is
    the top level with BatchNorm, so ``"pyramid_vgg19"``; a level's own name is itself; anything else is None.

    A chain below either top has the same level names (``svgg17_forward``, ...), their ``bn`` taken from the top.
    """
    return TOP if model == TOP_BN else model if model in LEVELS else None


def level_of(model: nn.Module) -> tuple[str, bool]:
    """``(level name, bn)`` of a model built by ``create_model`` from this family.

    Raises:
        ConfigError: the model is not a :class:`PyramidVGG` with a ``.config``.
    """
    config = getattr(model, "config", None)
    known = (*LEVELS, TOP_BN)
    if not isinstance(model, PyramidVGG) or not isinstance(config, dict) or config.get("model") not in known:
        what = config.get("model") if isinstance(config, dict) else type(model).__name__
        raise ConfigError(f"expected a Pyramid VGG model built by models.create_model (one of {TOP}, {TOP_BN}, "
                          f"svgg*_forward, svgg*_backward), got {what}")
    name = config["model"]
    return (TOP, True) if name == TOP_BN else (name, bool(config.get("bn", False)))


@dataclass(frozen=True)
class HintPoints:
    """Where a level's stage-1 losses read their activations (module paths for forward hooks).

    Kept parts have the same path in parent and child, so ``teacher_input == student_input``. Every path's
    module output is post-ReLU (non-inplace), so a hook's tensor is not modified afterwards.

    Attributes:
        level: the child level; ``parent``: the level above, whose model is the teacher.
        replaced: what was replaced: ``"block{k}"``, ``"conv1_2..pool2"`` or ``"head"``.
        new: the child's new layer: a ``ConvBNAct`` (``features.compressed{k}.conv``: conv + [BN] + ReLU) or
            ``head.fc``; every tensor under it (and under ``student_output``) is freshly initialised.
        teacher_output: the parent module whose output the new part imitates: the end of the replaced block,
            after its pool (``features.block{k}``), or the logits (``head``), as in the original's stage 1.
        student_output: the child module with the same output shape (``features.compressed{k}``, after the
            pool, or ``head``): the hint loss is ``MSE(student_output, teacher_output)``.
        teacher_input / student_input: the module whose output is the replaced part's input (for Gram/FSP).
        teacher_prepool / student_prepool: the end of the replaced / new part before its final pool (for
            Gram/FSP with the input, as the original's Gram variant): ``features.block{k}.conv{N}`` /
            ``features.compressed{k}.conv``; equal to the outputs for a head. At spatial size of the input,
            except for block 2, whose input (``block1.conv1``) has twice their size (the original upsampled
            the output by 2, nearest, before its Gram matrix).
    """

    level: str
    parent: str
    replaced: str
    new: str
    teacher_output: str
    student_output: str
    teacher_input: str
    student_input: str
    teacher_prepool: str
    student_prepool: str


def hint_points(level: str) -> HintPoints:
    """The module paths a level's stage-1 losses use; see :class:`HintPoints`.

    Args:
        level: an SVGG level name, e.g. ``"svgg14_forward"``.

    Raises:
        ConfigError: an unknown level, or VGG19 (it has no parent).
    """
    spec = _level(level)
    if spec.parent is None:
        raise ConfigError(f"level {level!r} is the top of the pyramid and replaced nothing; pass an SVGG level "
                          "such as 'svgg17_forward'")
    if spec.replaces == "head":
        return HintPoints(level, spec.parent, "head", "head.fc", "head", "head", "features", "features",
                          "head", "head")
    k = int(spec.replaces)  # type: ignore[arg-type]
    if k == 2:
        before = "features.block1.conv1"
    else:
        before = f"features.compressed{k - 1}" if k - 1 in spec.compressed else f"features.block{k - 1}"
    unit = f"features.compressed{k}"
    return HintPoints(level, spec.parent, "conv1_2..pool2" if k == 2 else f"block{k}", f"{unit}.conv",
                      f"features.block{k}", unit, before, before, f"features.block{k}.conv{CONVS[k - 1]}",
                      f"{unit}.conv")


def svgg_from(parent: nn.Module, level: str) -> PyramidVGG:
    """Build ``level`` from its parent, inheriting every tensor the two share (the Pyramid's surgery).

    The child is built with the parent's ``num_classes``, ``image_size`` and ``bn``; every state_dict entry
    it shares with the parent (same path, same shape: the kept blocks, compressed units and head, with
    BatchNorm running statistics) is copied bit for bit. Only the part that replaced a block (the new
    ``features.compressed{k}`` conv, see :func:`hint_points`) or the new head keeps its fresh initialisation.

    Args:
        parent: the trained level above ``level`` in its scheme, in training form.
        level: the level to build, e.g. ``"svgg14_forward"`` from an ``svgg17_forward``.

    Returns:
        The child, on the parent's device and dtype and in its train/eval mode, with ``.inherited`` and
        ``.fresh``: tuples of its state_dict keys copied from the parent / freshly initialised.

    Raises:
        ConfigError: ``level`` is unknown or the top, ``parent`` is not its parent level, or ``parent`` is a
            fused ``bn=True`` model (it no longer holds the BatchNorms the child keeps) or a pruned one.
    """
    spec = _level(level)
    if spec.parent is None:
        raise ConfigError(f"level {level!r} is the top of the pyramid; build it with models.create_model")
    parent_level, bn = level_of(parent)
    config = parent.config  # type: ignore[union-attr]
    if parent_level != spec.parent:
        raise ConfigError(f"{level} is built from {spec.parent}, but parent is {config['model']}; "
                          f"pass a {spec.parent} (or use next_level(parent, scheme))")
    if config.get("structure"):
        raise ConfigError(f"parent {config['model']} is pruned or folded (its config has a structure); "
                          "pass the unpruned, unfused model")
    if bn and config.get("inference_mode"):
        raise ConfigError(f"parent {config['model']} is fused (inference_mode=True, no BatchNorm left); pass the "
                          "trained model in training form")
    child = model_from_config({"model": level, "num_classes": config["num_classes"],
                               "image_size": config["image_size"], "bn": bn,
                               "inference_mode": bool(config.get("inference_mode", False))})
    parent_state, child_state = parent.state_dict(), child.state_dict()
    inherited = tuple(k for k in child_state if k in parent_state)
    fresh = tuple(k for k in child_state if k not in parent_state)
    points = hint_points(level)
    new_prefix = "head." if spec.replaces == "head" else f"{points.student_output}."
    wrong = [k for k in inherited if parent_state[k].shape != child_state[k].shape]
    wrong += [k for k in fresh if not k.startswith(new_prefix)]
    if wrong:  # cannot happen with the table above; guards edits to it
        raise ConfigError(f"{level} and {spec.parent} disagree on {wrong[:3]}; the level table is inconsistent")
    inherit(child, parent, inherited)
    child.inherited, child.fresh = inherited, fresh
    return child  # type: ignore[return-value]


def next_level(parent: nn.Module, scheme: str) -> PyramidVGG:
    """The level below ``parent`` in ``scheme``, inheriting its tensors (:func:`svgg_from`).

    Args:
        parent: ``pyramid_vgg19`` / ``pyramid_vgg19_bn`` (either scheme) or an SVGG level of ``scheme``.
        scheme: ``"forward"`` (compress from the deep end) or ``"backward"`` (from the input end).

    Raises:
        ConfigError: an unknown scheme, a parent of the other scheme, or an SVGG5 (the bottom).
    """
    _check_scheme(scheme)
    name, _ = level_of(parent)
    levels = chain(scheme)
    if name not in levels:
        raise ConfigError(f"parent {name} belongs to the {LEVELS[name].scheme} scheme, not scheme={scheme!r}; "
                          f"its next level is next_level(parent, {LEVELS[name].scheme!r})")
    if name == levels[-1]:
        raise ConfigError(f"parent {name} is the bottom of the {scheme} pyramid; there is no level below it")
    return svgg_from(parent, levels[levels.index(name) + 1])
