"""Import checkpoints of other projects: ``python -m models.convert SOURCE FILE... --out DIR``.

Sources:
    reducenet-original  a state_dict ``.pth`` of the original ReduceNet (ohmydroid/reducenet, ``main.py``), teacher
                        (``scaler`` 1) or student (``scaler`` 0). It becomes our ``reduceN`` with the same depth,
                        width and expansion (0 for the student) and the original's preprocessing: none, the images
                        go in as ``ToTensor()`` values in [0, 1].

Every ``.pth`` is read with ``torch.load(weights_only=True)``, so no code in it runs. Each FILE becomes
``DIR/<stem>.safetensors`` + ``.json``, written only after every FILE has converted and every one of these names
was found free (or ``--overwrite`` given); a write that fails then leaves DIR as it was.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import (WriteError, file_sha256, remove_stale_temps, save_checkpoint, stale_temps, temp_prefix,
                         user_path)
from .errors import CheckpointError, ConfigError, ReduceNetError, brief, cli_errors
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
        CheckpointError: a key that does not map, a missing tensor or one of another shape (each named), a scaler
            that is not 0 or 1, or an unknown depth.
    """
    if "scaler" not in state or "linear.weight" not in state or "conv1.0.weight" not in state:
        raise CheckpointError(f"{name} is not an original ReduceNet state_dict (it lacks scaler, conv1.0.weight "
                              "or linear.weight)")
    redo = "pass the checkpoint as the original's main.py saved it (torch.save(net.state_dict()))"
    for key, tensor in state.items():
        if _FLAGS.match(key) and key.endswith("scaler") and tensor.numel() != 1:
            raise CheckpointError(f"{name}: {key} has shape {tuple(tensor.shape)}, but the original's scaler is a "
                                  f"single number (1 teacher, 0 student); {redo}")
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
    stem, head = state["conv1.0.weight"], state["linear.weight"]
    if stem.dim() != 4 or stem.shape[0] % 16 or not stem.shape[0]:
        raise CheckpointError(f"{name}: conv1.0.weight has shape {tuple(stem.shape)}; the original's stem conv has "
                              f"16 x width output channels, a positive multiple of 16 ([16 * width, 3, 3, 3]); {redo}")
    if head.dim() != 2 or not head.shape[0] or not head.is_floating_point():
        raise CheckpointError(f"{name}: linear.weight has shape {tuple(head.shape)} ({head.dtype}); the original's "
                              f"classifier is a float [classes, 64 * width] matrix; {redo}")
    width = stem.shape[0] // 16
    expansion = 0
    if teacher:
        key = "layer1.0.branch1.0.weight"
        if key not in state:
            raise CheckpointError(f"{name} lacks {key}, which a teacher (scaler 1) has: its width gives the "
                                  f"expansion; {redo}")
        mid = state[key].shape[0] if state[key].dim() == 4 else 0
        if not mid or mid % (16 * width):
            raise CheckpointError(f"{name}: {key} has shape {tuple(state[key].shape)}; a teacher of width {width} "
                                  f"(conv1.0.weight) has 16 * width * expansion output channels there, a positive "
                                  f"multiple of {16 * width}; {redo}")
        expansion = mid // (16 * width)

    converted: dict[str, Tensor] = {}
    theirs: dict[str, str] = {}  # our key -> the original's, for the messages
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
        theirs[f"{prefix}{table[module]}.{leaf}"] = key
    flags = {float(v) for k, v in state.items() if k.endswith("scaler")}
    if len(flags) != 1:
        raise CheckpointError(f"{name} mixes scaler values {sorted(flags)} across blocks; it is neither a teacher "
                              "nor a student")
    arch = f"reduce{depth} (width {width}, expansion {expansion}, {head.shape[0]} classes)"
    try:
        with torch.device("meta"):  # the shapes first, without memory: a wrong width could ask for gigabytes
            expected = {k: v.shape for k, v in create_model(
                f"reduce{depth}", num_classes=head.shape[0], width=width, expansion=expansion).state_dict().items()}
    except ConfigError as e:
        raise CheckpointError(f"{name}: cannot build reduce{depth} with width {width}, expansion {expansion} ({e})") \
            from None
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    if missing or unexpected:
        key, what = (_their_key(missing[0]), "missing") if missing else (theirs[unexpected[0]], "unexpected")
        raise CheckpointError(f"{name} does not fill {arch}: {key} is {what} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected tensors); {redo}")
    for k, shape in expected.items():
        if converted[k].shape != shape:
            raise CheckpointError(f"{name}: {theirs[k]} has shape {tuple(converted[k].shape)}, but {arch}, as read "
                                  f"from conv1.0.weight, layer1.0.branch1.0.weight and linear.weight, needs "
                                  f"{tuple(shape)} there; {redo}")
    model = create_model(f"reduce{depth}", num_classes=head.shape[0], width=width, expansion=expansion)
    model.to(head.dtype)  # keep the stored precision
    model.load_state_dict(converted)
    set_preprocess(model, dict(NO_NORMALISATION))
    return model.eval()


def _their_key(ours: str) -> str:
    """The original's name of our state_dict key ``ours`` (the inverse of the key tables)."""
    m = _BLOCK.match(ours)
    prefix, rest, table = (f"layer{m[1]}.{m[2]}.", m[3], _BLOCK_KEYS) if m else ("", ours, _TOP_KEYS)
    for their_module, our_module in table.items():
        if rest.startswith(our_module + "."):
            return prefix + their_module + rest[len(our_module):]
    return ours


def _check_destination(path: Path, overwrite: bool) -> None:
    """Refuse an output name that is taken, before anything is written: a folder there always; any other entry (a
    file, a link, even a dangling one) unless ``overwrite``."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise CheckpointError(f"cannot check {path} ({brief(e.strerror or e, typed=False)}); choose another --out") \
            from None
    if stat.S_ISDIR(mode):
        raise CheckpointError(f"{path} is a folder, where convert writes a file; move it away or choose another --out")
    if not overwrite:
        what = (f"exists (a link to {os.readlink(path)}, which does not exist)"
                if stat.S_ISLNK(mode) and not path.exists() else "exists")
        raise CheckpointError(f"{path} {what}; pass --overwrite to replace it or choose another --out")


#: The folder, inside a staging folder, of the files an ``--overwrite`` moved aside until every new file is in place.
PREVIOUS = ".previous"


def _recover_stale(out: Path) -> None:
    """Put back the files that a convert killed mid-way (SIGKILL: no cleanup ran) had moved aside in its staging
    folder, where their names in ``out`` are free; a file whose name is taken (the new one was placed) is kept in
    ``out/.convert-kept-PID``, which is said on stderr, so that :func:`remove_stale_temps` removes nothing of the
    user's."""
    for stage, pid in stale_temps(out / "convert"):
        aside = stage / PREVIOUS
        if not aside.is_dir():
            continue
        for f in sorted(aside.iterdir()):
            if not os.path.lexists(out / f.name):
                os.replace(f, out / f.name)
                print(f"restored {out / f.name}, which a stopped convert (pid {pid}) had moved aside", file=sys.stderr)
        if any(aside.iterdir()):
            kept = out / f".convert-kept-{pid}"
            os.replace(aside, kept)
            print(f"warning: {kept} holds the files a stopped convert (pid {pid}) replaced; they are kept there",
                  file=sys.stderr)


def _write_all(jobs: list[tuple[ReduceNet, Path, dict]], out: Path, overwrite: bool) -> None:
    """Save every job's checkpoint into a temporary folder in ``out``, then move them into place; on any failure,
    remove what this run wrote and put back the files it replaced, so that ``out`` is as it was."""
    made = []  # the folders this run creates, deepest first
    folder = out
    while not os.path.lexists(folder):
        made.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        where = "is not a folder" if folder == out else f"is inside {folder}, which is not a folder"
        raise CheckpointError(f"--out {out} {where}; pass a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write in {folder} (permission denied); choose a writable --out")
    stage, target = None, out
    placed: list[tuple[Path, Path | None, bool]] = []  # (destination, its previous file moved aside, placed yet)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _recover_stale(out)  # what a killed convert had moved aside goes back, then its staging folder goes
        remove_stale_temps(out / "convert")
        stage = Path(tempfile.mkdtemp(prefix=temp_prefix(out / "convert"), suffix=".tmp", dir=out))
        for model, dest, meta in jobs:
            try:
                save_checkpoint(model, stage / dest.name, meta)
            except WriteError as e:
                raise CheckpointError(f"cannot write {dest} ({e.reason or e}); nothing was written: free some disk "
                                      "space or choose a writable --out") from None
        for _, dest, _ in jobs:
            for target in (dest, dest.with_suffix(".json")):
                _check_destination(target, overwrite)  # again: the conversions took a while
                previous = None
                if os.path.lexists(target):  # --overwrite: kept aside until every file is in place
                    previous = stage / PREVIOUS / target.name  # a folder of its own: no new file has its name
                    previous.parent.mkdir(exist_ok=True)
                    os.replace(target, previous)
                placed.append((target, previous, False))
                os.replace(stage / target.name, target)
                placed[-1] = (target, previous, True)
    except BaseException as e:
        kept = _undo(placed)
        if stage is not None and not kept:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(e, OSError) and not isinstance(e, ReduceNetError):
            where = f"; the files it replaced are in {stage}" if kept else ""
            raise CheckpointError(f"cannot write {target} ({brief(e.strerror or e, typed=False)}); nothing was "
                                  f"written{where}: choose a writable --out") from None
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _undo(placed: list[tuple[Path, Path | None, bool]]) -> bool:
    """Take back the moves of :func:`_write_all`; True where a previous file could not be put back."""
    kept = False
    for target, previous, done in reversed(placed):
        try:
            if done:
                target.unlink()
            if previous is not None:
                os.replace(previous, target)
        except OSError:
            kept = kept or previous is not None
    return kept


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
    out = user_path(args.out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; pass a folder")
    jobs = []
    stems: dict[str, Path] = {}
    for f in map(user_path, args.files):
        if f.stem in stems:  # both would be written to one file, the second over the first
            raise CheckpointError(f"{stems[f.stem]} and {f} would both be written to {out / f.stem}.safetensors; "
                                  "convert them into separate --out folders or rename one")
        stems[f.stem] = f
        dest = out / f"{f.stem}.safetensors"
        for path in (dest, dest.with_suffix(".json")):
            _check_destination(path, args.overwrite)
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
    _write_all(jobs, out, args.overwrite)
    for model, dest, meta in jobs:
        role, cfg = meta["role"], model.config
        print(f"{dest}: {cfg['model']} {role} (width {cfg['width']}, expansion {cfg['expansion']}, "
              f"{cfg['num_classes']} classes), inputs not normalised")
    return [dest for _, dest, _ in jobs]


if __name__ == "__main__":
    main()
