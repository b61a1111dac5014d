"""Import checkpoints of other projects: ``python -m models.convert SOURCE FILE... --out DIR``.

Sources:
    reducenet-original  a state_dict ``.pth`` of the original ReduceNet (ohmydroid/reducenet, ``main.py``), teacher
                        (``scaler`` 1) or student (``scaler`` 0). It becomes our ``reduceN`` with the same depth,
                        width and expansion (0 for the student) and the original's preprocessing: none, the images
                        go in as ``ToTensor()`` values in [0, 1].

Every ``.pth`` is read with ``torch.load(weights_only=True)``, so no code in it runs. Each FILE becomes
``DIR/<stem>.safetensors`` + ``.json``, written only after every FILE has converted.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from torch import Tensor

from .checkpoint import file_sha256, save_checkpoint
from .errors import CheckpointError, ConfigError, cli_errors
from .identity import set_preprocess
from .reducenet import DEPTHS, ReduceNet
from .registry import create_model
from .weights import read_state_dict

SOURCES = ("reducenet-original",)
#: The original fed ``ToTensor()`` images, without ``Normalize`` (commented out in its main.py).
NO_NORMALISATION = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "input_size": [3, 32, 32]}

# The original block's key names -> ours (see models/reducenet.py). ``branch1`` is branch (b).
_BLOCK_KEYS = {
    "branch2.0": "conv1.conv",  # branch (a): a bare Conv3x3
    "fuse.0": "conv1.bn",  # the BN after the sum of both branches
    "fuse.2": "conv2.conv",
    "fuse.3": "conv2.bn",
    "shortcut.0": "shortcut.conv",
    "shortcut.1": "shortcut.bn",
    "branch1.0": "branch_b.conv1.conv",
    "branch1.1": "branch_b.conv1.bn",
    "branch1.3": "branch_b.conv2.conv",
    "branch1.4": "branch_b.conv2.bn",
}
_TOP_KEYS = {"conv1.0": "stem.conv", "conv1.1": "stem.bn", "linear": "fc"}
_FLAGS = re.compile(r"^(layer\d+\.\d+\.)?(scaler|lora)$")
_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")


def from_reducenet_original(state: dict[str, Tensor], name: str = "checkpoint") -> ReduceNet:
    """Our ``reduceN`` with the weights of an original ReduceNet state_dict.

    The depth, width, expansion and class count are read from the tensors; ``scaler`` 1 makes a teacher,
    ``scaler`` 0 a student (whose unused branch (b) tensors are dropped). ``lora_branch`` tensors (never used
    by the original's released code) and the ``scaler``/``lora`` flags are ignored by name; any other key that
    does not map is refused.

    Args:
        state: the original's state_dict.
        name: how to call it in error messages.

    Raises:
        CheckpointError: a key that does not map, a missing tensor, or an unknown depth.
    """
    if "scaler" not in state or "linear.weight" not in state or "conv1.0.weight" not in state:
        raise CheckpointError(f"{name} is not an original ReduceNet state_dict (it lacks scaler, conv1.0.weight "
                              "or linear.weight)")
    scaler = float(state["scaler"])
    if scaler not in (0.0, 1.0):
        raise CheckpointError(f"{name} has scaler={scaler:g}; the original uses 1 (teacher) or 0 (student)")
    teacher = scaler == 1.0
    blocks = {(int(m[1]), int(m[2])) for m in map(_BLOCK.match, state) if m}
    per_stage = 1 + max((j for i, j in blocks if i == 1), default=-1)
    depth = 6 * per_stage + 2
    if depth not in DEPTHS.values() or {i for i, _ in blocks} != {1, 2, 3}:
        raise CheckpointError(f"{name} has {per_stage} blocks per stage (depth {depth}); ReduceNet has "
                              f"depth {', '.join(map(str, DEPTHS.values()))}")
    width = state["conv1.0.weight"].shape[0] // 16
    expansion = state["layer1.0.branch1.0.weight"].shape[0] // (16 * width) if teacher else 0

    converted: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if _FLAGS.match(key) or ".lora_branch." in key or (not teacher and ".branch1." in key):
            continue
        m = _BLOCK.match(key)
        prefix, rest, table = (f"layer{m[1]}.{m[2]}.", m[3], _BLOCK_KEYS) if m else ("", key, _TOP_KEYS)
        module, _, leaf = rest.rpartition(".")
        if module not in table:
            raise CheckpointError(f"{name}: key {key!r} does not map to ReduceNet; is this an original ReduceNet "
                                  "checkpoint of the released code (ohmydroid/reducenet)?")
        converted[f"{prefix}{table[module]}.{leaf}"] = tensor
    flags = {float(v) for k, v in state.items() if k.endswith("scaler")}
    if len(flags) != 1:
        raise CheckpointError(f"{name} mixes scaler values {sorted(flags)} across blocks; it is neither a teacher "
                              "nor a student")
    try:
        model = create_model(f"reduce{depth}", num_classes=state["linear.weight"].shape[0], width=width,
                             expansion=expansion)
    except ConfigError as e:
        raise CheckpointError(f"{name}: cannot build reduce{depth} with width {width}, expansion {expansion} ({e})") \
            from None
    model.to(state["linear.weight"].dtype)  # keep the stored precision
    result = model.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"{name} does not fill reduce{depth} (missing {result.missing_keys[:3]}, unexpected "
                              f"{result.unexpected_keys[:3]})")
    shapes = [k for k, v in model.state_dict().items() if v.shape != converted[k].shape]
    if shapes:
        raise CheckpointError(f"{name}: tensor {shapes[0]} has another shape than reduce{depth} expects")
    set_preprocess(model, dict(NO_NORMALISATION))
    return model.eval()


@cli_errors
def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=SOURCES, help="which project wrote the files")
    p.add_argument("files", nargs="+", help=".pth state_dicts to convert")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--dataset", default=None, choices=("cifar10", "cifar100", "imagefolder"),
                   help="dataset the weights were trained on, recorded for train.stage2/evaluate "
                        "(default: cifar10 for 10 classes, cifar100 for 100)")
    p.add_argument("--overwrite", action="store_true", help="replace existing checkpoints of the same names")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; pass a folder")
    jobs = []
    stems: dict[str, Path] = {}
    for f in map(Path, args.files):
        if f.stem in stems:  # both would be written to one file, the second over the first
            raise CheckpointError(f"{stems[f.stem]} and {f} would both be written to {out / f.stem}.safetensors; "
                                  "convert them into separate --out folders or rename one")
        stems[f.stem] = f
        dest = out / f"{f.stem}.safetensors"
        if dest.exists() and not args.overwrite:
            raise CheckpointError(f"{dest} exists; pass --overwrite to replace it or choose another --out")
        model = from_reducenet_original(read_state_dict(f), name=str(f))
        classes = model.config["num_classes"]
        known = {"cifar10": 10, "cifar100": 100}
        if args.dataset in known and known[args.dataset] != classes:
            raise CheckpointError(f"{f} classifies {classes} classes, but --dataset {args.dataset} has "
                                  f"{known[args.dataset]}; pass the dataset it was trained on, or leave --dataset out")
        dataset = args.dataset or {n: name for name, n in known.items()}.get(classes)
        meta = {"converted_from": str(f.absolute()), "source": args.source, "sha256": file_sha256(f),
                "role": "teacher" if model.config["expansion"] else "student", "preprocessing": "none ([0, 1] pixels)"}
        if dataset:
            meta["dataset"] = dataset
        jobs.append((model, dest, meta))
    written = []
    for model, dest, meta in jobs:
        save_checkpoint(model, dest, meta)
        role, cfg = meta["role"], model.config
        print(f"{dest}: {cfg['model']} {role} (width {cfg['width']}, expansion {cfg['expansion']}, "
              f"{cfg['num_classes']} classes), inputs not normalised")
        written.append(dest)
    return written


if __name__ == "__main__":
    main()
