"""Whole-model fusion: every linear branch and BatchNorm folded into plain convs, with an equivalence check."""
from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import Iterable

import torch
import torch.fx
import torch.nn as nn

from models import fusion_math as T
from models.errors import ConfigError, ReparamError, brief
from models.graph import conv_bn_pairs
from models.grow import GrownConv2d
from models.identity import card_of, keep_card, set_card
from models.layers import FoldedNormAct, LambdaReLU, LoRABranch, LoRAConv2d, set_lambda
from models.registry import is_zoo, model_from_config
from models.structure import apply_structure, structure_diff

try:  # timm's BatchNorm with its activation in one module (timm is a dependency; it may move)
    from timm.layers import BatchNormAct2d
except ImportError:  # pragma: no cover
    BatchNormAct2d = None


#: The packages of this project: their blocks' ``reparameterize()`` knows its conv wrappers (a zoo ``ConvBN`` fuses
#: the :class:`LoRAConv2d` inside it); a block from anywhere else (timm's RepVGG, MobileOne, FastViT) is third-party.
_OUR_PACKAGES = frozenset({"models", "reparam", "train"})


def _is_ours(module: nn.Module) -> bool:
    """Whether ``module``'s class is defined in this project (not in timm, torchvision or a user's code)."""
    return type(module).__module__.partition(".")[0] in _OUR_PACKAGES


def _reparameterize(module: nn.Module, prefix: str = "") -> None:
    """timm's ``reparameterize_model`` walk, naming the module that refuses.

    A LoRA branch beside a plain conv is folded into it (:func:`_fused_lora`). A third-party block with its own
    ``reparameterize()`` reads its convs' weights directly, so the LoRA convs inside it are fused first, bottom-up
    (:func:`_fuse_own_convs`), and it sees plain convs; our own blocks fuse theirs themselves, top-down as before.
    """
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if isinstance(child, LoRAConv2d):  # a LoRA branch beside a plain conv (a torchvision/timm student)
            setattr(module, name, _fused_lora(child, path))
            continue
        if hasattr(child, "reparameterize"):
            if not _is_ours(child):
                _fuse_own_convs(child, path + ".")
            _call_reparameterize(child, path)
        _reparameterize(child, path + ".")


def _fuse_own_convs(module: nn.Module, prefix: str) -> None:
    """Fuse every :class:`LoRAConv2d` below ``module`` into a plain conv, in place, children first; a grown conv's
    branch (b) (:class:`~models.grow.GrownConv2d`) is refused, naming it (no third-party block could read it)."""
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if isinstance(child, LoRAConv2d):
            setattr(module, name, _fused_lora(child, path))
        elif isinstance(child, GrownConv2d):
            _call_reparameterize(child, path)  # raises its one-line refusal
        else:
            _fuse_own_convs(child, path + ".")


@torch.no_grad()
def _fused_lora(lora: LoRAConv2d, path: str) -> nn.Conv2d:
    """The plain conv that computes ``lora``: its conv's geometry and padding mode, holding the fused kernel; it has a
    bias where its conv has one or the fused bias is not zero (LoRA adds none, and a third-party block's
    reparameterize() may read the weight alone)."""
    try:
        kernel, bias = lora.fused_kernel()
    except ReparamError as e:
        raise ReparamError(f"cannot fuse {path}: {e}") from None
    base = lora.conv
    conv = nn.Conv2d(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding, base.dilation,
                     base.groups, bias=base.bias is not None or bool(bias.any()), padding_mode=base.padding_mode)
    conv.to(device=kernel.device, dtype=kernel.dtype).weight.copy_(kernel)
    if conv.bias is not None:
        conv.bias.copy_(bias)
    return conv


def _call_reparameterize(block: nn.Module, path: str) -> None:
    """``block.reparameterize()``, its failure one :class:`ReparamError` line naming ``path``. A third-party block's
    error of any kind (timm's MobileOne after trimming: ``ZeroDivisionError``, ``AttributeError``, a shape mismatch)
    is turned into one; an unexpected error in our own blocks is a bug, and stays a traceback."""
    try:
        block.reparameterize()
    except ReparamError as e:
        raise ReparamError(f"cannot fuse {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 (third-party code raises anything; one line says which block and why)
        if _is_ours(block):
            raise
        raise ReparamError(f"cannot fuse {path} ({type(block).__name__}): its own reparameterize() failed "
                           f"({brief(e)}); this happens when trimming or another change left the block's recorded "
                           "channels or layers stale: fuse and export the untrimmed model, or deploy this one unfused "
                           "(models.save_checkpoint, torch.export)") from None


@torch.no_grad()
def fold_batchnorms(model: nn.Module) -> list[str]:
    """Fold every eval-mode BatchNorm that directly follows a conv (whose output feeds nothing else), in place.

    The pairs are found on the model's ``torch.fx`` graph; the conv gets the folded kernel and a bias and the
    BatchNorm becomes ``nn.Identity`` (timm's ``BatchNormAct2d``: its activation, :class:`FoldedNormAct`). A
    BatchNorm elsewhere (after a concatenation, before a conv as in pre-activation nets) stays. Returns the folded
    BatchNorms' names.

    Raises:
        ReparamError: the model cannot be traced by ``torch.fx``, or a BatchNorm is in training mode (it normalises
            by the batch's statistics, which no fixed conv computes); the message names it.
    """
    training = next((n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     and m.training), None)
    if training is not None:
        raise ReparamError(f"cannot fold {training}: it is in training mode and normalises by each batch's "
                           "statistics; call model.eval() first (fuse_model does)")
    try:
        pairs = conv_bn_pairs(model)
    except ConfigError as e:
        raise ReparamError(f"{e}: deploy it unfused (its checkpoint, or torch.export of the model), or give its "
                           "blocks a reparameterize()") from None
    modules = dict(model.named_modules())
    folded = []
    for conv_path, bn_path in pairs:
        conv, bn = modules[conv_path], modules[bn_path]
        rest = _after_folding(bn)
        if rest is None or not bn.track_running_stats:
            continue
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        kernel, bias = T.fold_bn(conv.weight, bias, bn.running_mean, bn.running_var, gamma, beta, bn.eps)
        conv.weight.copy_(kernel)
        conv.bias = nn.Parameter(bias)
        parent, _, name = bn_path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, rest)
        folded.append(bn_path)
    return folded


def _after_folding(bn: nn.Module) -> nn.Module | None:
    """What a BatchNorm becomes once folded: ``Identity``, or for timm's ``BatchNormAct2d`` its dropout and
    activation (:class:`~models.layers.FoldedNormAct`); None for a BatchNorm of another kind, which stays."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if BatchNormAct2d is not None and type(bn) is BatchNormAct2d:
        return FoldedNormAct.of(bn)
    return None


def fuse_model(model: nn.Module) -> nn.Module:
    """Return a deep-copied, eval-mode model with every LoRA branch and BatchNorm fused into its convs.

    Zoo models: every fusable layer's ``reparameterize()`` runs (timm's protocol), and the result is the plain
    deploy form, built from the model's config with ``inference_mode=True``, into which the fused weights are
    loaded strictly. torchvision/timm models (and pruned ones): the same walk, then every BatchNorm that
    follows a conv is folded (:func:`fold_batchnorms`); the changed layers are recorded in the config's
    ``structure``, so the result saves and rebuilds like any model.

    Raises:
        ReparamError: a module cannot be fused (a teacher's non-linear branch, a LambdaReLU with lam < 1, a
            third-party block whose own ``reparameterize()`` fails); the message names it.
    """
    if not isinstance(model, nn.Module):
        raise ReparamError(f"fuse_model needs a torch.nn.Module, got {type(model).__name__}")
    fused = copy.deepcopy(model).eval()
    _reparameterize(fused)
    config = getattr(model, "config", None)
    zoo = bool(config) and is_zoo(config)
    if not zoo:
        fold_batchnorms(fused)
    survivors = (LoRABranch, LambdaReLU) + ((nn.modules.batchnorm._BatchNorm,) if zoo else ())
    for name, m in fused.named_modules():
        if isinstance(m, survivors):
            raise ReparamError(f"{name} ({type(m).__name__}) survived fusion: it sits outside a ConvBN; "
                               "give its block a reparameterize() method")
    if not config:
        return fused
    deploy_config = {k: v for k, v in config.items() if k not in ("structure", "lora")}
    if zoo:  # the plain deploy form: no teacher branch, no LoRA (for the families that have them)
        deploy_config.update({k: 0 for k in ("expansion", "lora_rank") if k in config}, inference_mode=True)
    deploy = model_from_config(deploy_config)
    patch = structure_diff(fused, deploy)
    if patch:
        apply_structure(deploy, patch)
    param = next(model.parameters())
    try:
        deploy.to(device=param.device, dtype=param.dtype).load_state_dict(fused.state_dict(), strict=True)
    except RuntimeError as e:  # a reparameterize() that changed the model in a way no structure patch records
        raise ReparamError(f"the fused {type(model).__name__} does not rebuild from its config ({_first_problem(e)}): "
                           "a reparameterize() changed it in a way a checkpoint cannot record; save and export the "
                           "unfused model (models.save_checkpoint, torch.export)") from None
    set_card(deploy, replace(card_of(deploy), structure=patch or None, preprocess=getattr(model, "preprocess", None)))
    return deploy.eval()


def check_fusable(model: nn.Module) -> None:
    """Refuse now what :func:`fuse_model` would refuse once ``model`` has trained: a model ``torch.fx`` cannot trace,
    a block whose own ``reparameterize()`` fails, a layer that would survive fusion. Its LambdaReLUs are taken as
    linear (lam 1), as stage 2's schedule ends; ``model`` itself is left as it is (a copy is fused).

    Raises:
        ReparamError: as :func:`fuse_model`; the message names the module.
    """
    probe = copy.deepcopy(model)
    set_lambda(probe, 1.0)
    fuse_model(probe)


def _first_problem(error: RuntimeError) -> str:
    """The first key that ``load_state_dict`` names in ``error``: missing, unexpected or of another size."""
    found = re.search(r'(Missing|Unexpected) key\(s\) in state_dict: "([^"]+)"|size mismatch for ([^:]+)', str(error))
    if found is None:
        return str(error).splitlines()[0][:200]
    return f"{found[1].lower()} key {found[2]}" if found[1] else f"{found[3]} has another shape"


_FUNCTIONAL = {nn.ReLU: torch.relu, nn.ReLU6: nn.functional.relu6}


def flatten(model: nn.Module) -> nn.Module:
    """The same model as one flat ``torch.fx`` graph: no container, wrapper or ``Identity`` calls left.

    A fused model keeps the module tree of its family (blocks, ``ConvBN`` wrappers whose BatchNorm became
    ``nn.Identity``); each call through that tree costs a few microseconds of Python, which shows at batch 1.
    Flattened, its ``forward`` calls only the convs, linears and pools, with ReLUs as functions: what a hand-written
    net does. The parameters keep their names (the state_dict is the same), and the model's card
    (:mod:`models.identity`) is carried over, so it saves like the model it came from.

    Raises:
        ReparamError: the model cannot be traced by ``torch.fx``.
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises many kinds on data-dependent control flow
        raise ReparamError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}); use it "
                           "unflattened") from None
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if isinstance(module, nn.Identity):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif type(module) in _FUNCTIONAL:
            with gm.graph.inserting_after(node):
                fn = gm.graph.call_function(_FUNCTIONAL[type(module)], node.args)
            node.replace_all_uses_with(fn)
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    flat = _bind_at_top(gm)
    keep_card(model, flat)
    return flat.train(model.training)


def _bind_at_top(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with every called module an attribute of the root (``layer1_0_conv1_conv``), so that its generated
    code makes one attribute lookup per call, not one per level of the tree (``getattr(self.layer1, "0").conv1
    .conv``: each costs about as much as a module call at batch 1). ``state_dict`` and ``load_state_dict`` keep the
    tree's names and order, so the result saves and loads like the model it came from. A graph that reads
    parameters directly (``get_attr``) is returned as it is."""
    if any(node.op == "get_attr" for node in gm.graph.nodes):
        return gm
    modules = dict(gm.named_modules())
    root, names = nn.Module(), {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        if node.target not in names:
            name = node.target.replace(".", "_")
            while name in root._modules:
                name += "_"
            names[node.target] = name
            root.add_module(name, modules[node.target])
        node.target = names[node.target]
    tree_keys = list(gm.state_dict(keep_vars=True))
    flat_of = {f"{path}.{key}": f"{name}.{key}" for path, name in names.items()
               for key in modules[path].state_dict(keep_vars=True)}
    if sorted(flat_of) != sorted(tree_keys):  # a tensor outside the called modules: keep the tree
        return gm
    flat = torch.fx.GraphModule(root, gm.graph, class_name=type(gm).__name__)

    def save_tree_names(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
        mine = {key[len(prefix):]: state.pop(key) for key in [k for k in state if k.startswith(prefix)]}
        for key in tree_keys:
            state[prefix + key] = mine[flat_of[key]]

    def load_tree_names(state: dict, prefix: str, *_) -> None:
        for key in tree_keys:
            if prefix + key in state:
                state[prefix + flat_of[key]] = state.pop(prefix + key)

    flat.register_state_dict_post_hook(save_tree_names)
    flat.register_load_state_dict_pre_hook(lambda module, *args: load_tree_names(*args))
    return flat


@torch.no_grad()
def compare_on(model: nn.Module, fused: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
               rtol: float = 1e-3) -> dict[str, float]:
    """Check ``fused`` against ``model`` on real data: the largest logit difference, and the predictions that differ.

    Rounding can flip a prediction only where the unfused top-2 margin is within twice that sample's largest
    logit difference; such *near-tie* flips are allowed, any other flip, or a logit difference above ``rtol``
    times the largest logit magnitude (at least 1), is an error.

    Returns:
        ``{"max_abs_diff", "flips", "count"}``.

    Raises:
        ReparamError: the fused model does not compute the model's function.
    """
    modes = model.training, fused.training
    model.eval(), fused.eval()
    worst, scale, flips, count = 0.0, 1.0, 0, 0
    try:
        for x, _ in batches:
            a, b = model(x).float(), fused(x).float()
            diff = (a - b).abs().amax(1)
            top2 = a.topk(2, dim=1).values
            flipped = a.argmax(1) != b.argmax(1)
            unexplained = flipped & (top2[:, 0] - top2[:, 1] > 2 * diff)
            if unexplained.any():
                raise ReparamError(f"the fused model predicts another class than the unfused one for a sample whose "
                                   f"logit margin ({(top2[:, 0] - top2[:, 1])[unexplained].min().item():.3g}) is far "
                                   "above the rounding difference: fusion is wrong for this model")
            worst, scale = max(worst, diff.max().item()), max(scale, a.abs().max().item())
            flips += int(flipped.sum())
            count += len(x)
    finally:
        model.train(modes[0]), fused.train(modes[1])
    if not worst <= rtol * scale:  # also NaN
        raise ReparamError(f"the fused model's logits differ from the unfused ones by {worst:.3g} "
                           f"(> {rtol:g} x {scale:.3g}): fusion is wrong for this model")
    return {"max_abs_diff": worst, "flips": flips, "count": count}


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """``max |a(x) - b(x)|`` with both models in eval mode (their modes are restored)."""
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        return (a(x) - b(x)).abs().max().item()
    finally:
        a.train(modes[0]), b.train(modes[1])
