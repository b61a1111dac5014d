"""Checkpoints: safetensors weights plus a JSON record that rebuilds the model; atomic writes.

A checkpoint ``NAME.safetensors`` holds the state_dict and, in its metadata, the record as JSON:
``{"format", "config", "preprocess", "metadata"}``. ``config`` rebuilds the model, ``preprocess`` says how its
inputs must be prepared (``mean``, ``std`` in [0, 1] units and ``input_size``, as timm's ``pretrained_cfg``;
``None`` when unknown) and ``metadata`` is free-form (dataset, epoch, ...). ``NAME.json`` beside it is a
human-readable copy. Files are written to a temporary file in the same folder and moved into place with
``os.replace``, so a crash never leaves a torn file. Nothing is unpickled.

Formats: ``reducenet-2`` (current). ``reducenet-1`` (before the teacher block followed the published
ReduceNet) still loads for students and deploy models; its teachers are refused, since that block no longer
exists.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, ConfigError, ReduceNetError, brief
from .identity import card_of, check_preprocess, set_card
from .registry import create_model, is_zoo, model_from_config
from .weights import read_state_dict, with_versions

FORMAT = "reducenet-2"
_OLD_FORMATS = ("reducenet-1",)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp's own files are 0600


class WriteError(ReduceNetError, OSError):
    """A file could not be written (disk full, read-only folder, ...); the previous file is unchanged. ``reason``:
    why, in a few words."""

    reason: str = ""


def temp_prefix(path: Path) -> str:
    """The start of the names of the temp files (or folders) made for ``path`` (:func:`atomic_write`'s): they say
    whose they are, so that :func:`remove_stale_temps` finds those a killed process left."""
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}."


def process_running(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: running
        return True
    return True


def stale_temps(path: Path) -> list[tuple[Path, int]]:
    """The temp files (or folders) of ``path`` (named by :func:`temp_prefix`) that processes of this machine left
    when they were killed (SIGKILL, a power cut): those whose process no longer runs, with its pid. Another
    process's write in progress, here or on another machine sharing the folder, is not one."""
    start = f".{path.name}.{socket.gethostname()}-"
    try:
        candidates = [p for p in path.parent.iterdir() if p.name.startswith(start) and p.name.endswith(".tmp")]
    except OSError:
        return []
    found = []
    for p in candidates:
        pid = p.name[len(start):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_running(int(pid)):
            found.append((p, int(pid)))
    return found


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the :func:`stale_temps` of ``path``; one that cannot be removed (another user's, in a shared folder)
    is left. Returns those removed."""
    removed = []
    for p, _ in stale_temps(path):
        try:
            if p.is_dir() and not p.is_symlink():  # a staging folder (models.convert's)
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        except OSError:  # the write goes on
            continue
        removed.append(p)
    return removed


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically; removes the temp file on error.

    An ``OSError`` is raised again as :class:`WriteError` (still an ``OSError``), which the CLIs print as one line.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        # safetensors and torch.save report a full disk or a failed write as their own errors, not as OSError
        failed_write = isinstance(e, SafetensorError) or (isinstance(e, RuntimeError) and any(
            w in str(e) for w in ("PytorchStreamWriter", "inline_container", "file write failed")))
        full = failed_write and _disk_full(path.parent)  # before the partial file is removed
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if (isinstance(e, OSError) or failed_write) and not isinstance(e, ReduceNetError):
            reason = brief(getattr(e, "strerror", None) or e, typed=False)  # "No space left on device", no errno
            if full and "No space" not in reason:
                reason = f"no space left on the disk: {reason}"
            code = getattr(e, "errno", None)
            advice = ("choose a writable folder" if code in (errno.EACCES, errno.EPERM, errno.EROFS) else
                      "a file is in the way of the folder: move it, or choose another folder"
                      if code in (errno.ENOTDIR, errno.EEXIST) else
                      f"a folder has the name {path.name}: move it, or choose another name" if code == errno.EISDIR
                      else "free some disk space or choose a writable folder")
            error = WriteError(f"cannot write {path} ({reason}); the previous {path.name}, if any, is unchanged: "
                               + advice)
            error.reason = reason
            raise error from None
        raise
    return path


def _disk_full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize < 1 << 20
    except OSError:
        return False


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def user_path(path: str | os.PathLike) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded as a shell would: a quoted ``'~/runs'``, an ``--out=~/runs``
    (no shell expands a ``~`` after ``=``) or a path in a JSON spec reaches a program unexpanded.

    Raises:
        ConfigError: ``~user`` names no user, or the home directory is unknown.
    """
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise ConfigError(f"{path}: cannot expand {str(path).split('/')[0]} (no such user, or no home directory); "
                          "write the path out in full") from None


def resolve(path: str | Path, default_name: str = "last") -> Path:
    """The ``.safetensors`` file meant by ``path``: the file, its ``.json`` twin, a run directory (its
    ``default_name``) or a deploy folder (its ``model.safetensors``, where the folder holds no ``last``)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise CheckpointError(f"a checkpoint is named by a path (a .safetensors file or a run directory), got {path!r}")
    given = p = user_path(path)
    if p.suffix in (".onnx", ".pt2", ".ts") and p.is_file():
        raise CheckpointError(f"{given} is a deploy program ({p.suffix}), which holds no model record to build or "
                              f"train: pass its {p.with_suffix('.safetensors').name} beside it, or the run directory")
    if p.is_dir():
        p = p / f"{default_name}.safetensors"
        if default_name == "last" and not p.is_file() and (given / "model.safetensors").is_file():
            p = given / "model.safetensors"  # reparam.fuse's and stage 2's deploy folder
    elif p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    elif p.suffix in (".pth", ".pt") and p.is_file():
        raise CheckpointError(f"{given} is a PyTorch file, not a checkpoint (safetensors + JSON) that records its "
                              "model: make one with models.create_model(NAME), models.weights.load_pretrained(model, "
                              "FILE) and models.save_checkpoint(model, PATH), or train from it with stage 1 --weights; "
                              "the original ReduceNet's: python -m models.convert")
    elif not p.exists() and checkpoint_file(p).is_file():  # the name it was saved under (save_checkpoint(m, "t"))
        p = checkpoint_file(p)
    programs = [n for n in ("model.onnx", "model.pt2", "model.ts") if given.is_dir() and (given / n).is_file()]
    if not p.is_file() and programs:
        raise CheckpointError(f"no checkpoint at {given}: the deploy folder holds {', '.join(programs)} but no "
                              f"model.safetensors; evaluate and compare take a program itself ({given / programs[0]}), "
                              "and training and fusion need the checkpoint (export it again with python -m "
                              "reparam.fuse)")
    if not p.is_file():
        why = ("does not exist" if not given.exists() else
               f"holds no {p.name}" if given.is_dir() else f"has no weights beside it ({p.name})")
        raise CheckpointError(f"no checkpoint at {given}: it {why}; pass a .safetensors file, a run directory "
                              f"written by train.stage1/stage2 or a deploy folder")
    return p


def can_save(model: nn.Module) -> bool:
    """Whether :func:`save_checkpoint` can save ``model`` (or the model torch.compile wraps): it has a ``.config``
    dict naming its model."""
    config = getattr(getattr(model, "_orig_mod", model), "config", None)
    return isinstance(config, dict) and "model" in config


def checkpoint_file(path: str | Path) -> Path:
    """The ``.safetensors`` file a checkpoint named ``path`` is saved as: its ``.json``/``.pt``/``.pth`` suffix
    replaced, any other name with ``.safetensors`` added (``resnet20_v1.5`` keeps its ``.5``)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json", ".pt", ".pth"):
        return path.with_suffix(".safetensors")
    return path.with_name(path.name + ".safetensors")


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None,
                    preprocess: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (which needs ``.config``) as ``path`` (.safetensors) plus its ``.json`` record.

    Args:
        model: a model built by :func:`models.create_model` (or loaded from a checkpoint).
        path: destination: ``NAME.safetensors`` (a ``.json``, ``.pt`` or ``.pth`` suffix is replaced by it, and any
            other name gets it added: ``teacher.e1`` saves as ``teacher.e1.safetensors``) and ``NAME.json``.
        metadata: free-form JSON-serialisable facts (dataset, epoch, ...).
        preprocess: ``{"mean", "std", "input_size"}`` of the model's inputs; default ``model.preprocess``.
    """
    path = checkpoint_file(path)
    model, record = _record_of(model, path, metadata, preprocess)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _check_rebuilds(record, state, path)
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"reducenet": json.dumps(record)}))
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return path


def check_saves(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Refuse now, writing nothing, what :func:`save_checkpoint` would refuse to save as ``path``: for a trainer
    that saves after every epoch, so that a model no checkpoint can hold is refused before the first step, not
    after an epoch of training.

    Raises:
        CheckpointError: as :func:`save_checkpoint`.
    """
    path = checkpoint_file(path)
    model, record = _record_of(model, path, metadata, None)
    _check_rebuilds(record, model.state_dict(), path)


def _record_of(model: nn.Module, path: Path, metadata: dict[str, Any] | None,
               preprocess: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """The model :func:`save_checkpoint` saves (torch.compile's wrapper taken off) and the record it writes."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: its tensors' names carry "_orig_mod."
    config = getattr(model, "config", None)
    if not can_save(model):
        raise CheckpointError("this model has no .config naming a registered model; build it with "
                              "models.create_model to save it")
    preprocess = preprocess if preprocess is not None else getattr(model, "preprocess", None)
    metadata = metadata if metadata is not None else getattr(model, "checkpoint_metadata", None)
    try:
        check_preprocess(preprocess)
        json.dumps(metadata)
    except ConfigError as e:
        raise CheckpointError(f"cannot save {path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot save {path}: its metadata is not JSON data ({e})") from None
    return model, {"format": FORMAT, "config": config, "preprocess": preprocess, "metadata": metadata or {}}


def _check_rebuilds(record: dict[str, Any], state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse to write a checkpoint that :func:`load_checkpoint` would refuse: a record it does not accept, or
    tensors that the record's model (built on the meta device) does not hold, with these names and shapes (a model
    changed after it was built, without its config saying so). A model whose name no registry of this process
    knows is saved unchecked."""
    name = record["config"]["model"]
    if not (is_zoo(name) or isinstance(name, str) and name.startswith(("torchvision:", "timm:"))):
        return  # registered elsewhere, perhaps: the process that loads it may know it
    check_config(record["config"], record["preprocess"], f"cannot save {path}")
    built = build_on_meta(record["config"])
    expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    extra = next((k for k in state if k not in expected), None)
    missing = next((k for k in expected if k not in state), None)
    wrong = next((k for k in state if k in expected and tuple(state[k].shape) != expected[k]), None)
    if extra or missing or wrong:
        what = (f"{extra} is not in it" if extra else f"{missing} is missing" if missing else
                f"{wrong} is {tuple(state[wrong].shape)}, not {expected[wrong]}")
        raise CheckpointError(f"cannot save {path}: its config rebuilds {record['config']['model']} with other tensors "
                              f"({what}); the model was changed after it was built without its config saying so: make "
                              "such changes with the functions that record them (models.create_model(..., "
                              "lora_rank=R), student_from_teacher, grow)")


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Place checkpoint ``src`` (its ``.safetensors`` and ``.json``) at ``dst`` too, atomically, without writing
    it again: each file a hard link where the filesystem has them (a later :func:`save_checkpoint` over either name
    replaces that name's file and leaves the other), else a copy."""
    src, dst = checkpoint_file(src), checkpoint_file(dst)

    def link_or_copy(source: Path, tmp: str) -> None:
        os.unlink(tmp)  # atomic_write's fresh temp name, taken by the link
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (FAT, some network filesystems)
            shutil.copyfile(source, tmp)

    atomic_write(dst, functools.partial(link_or_copy, src))
    atomic_write(dst.with_suffix(".json"), functools.partial(link_or_copy, src.with_suffix(".json")))
    return dst


def read_record(path: str | Path) -> dict[str, Any]:
    """The ``{"format", "config", "metadata"}`` record of a checkpoint, without loading its tensors."""
    p = resolve(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                              "it may be truncated: use another checkpoint or retrain") from None
    if "reducenet" not in meta:
        raise CheckpointError(f"{p} has no reducenet config in its metadata; save it with "
                              "models.save_checkpoint or load its tensors with safetensors directly")
    try:
        record = json.loads(meta["reducenet"])
    except (json.JSONDecodeError, RecursionError):  # RecursionError: JSON nested thousands deep
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) or "model" not in record["config"]:
        raise CheckpointError(f"{p} has a malformed reducenet config in its metadata; re-save it with "
                              "models.save_checkpoint")
    fmt = record.get("format")
    if fmt in _OLD_FORMATS and record["config"].get("expansion"):
        raise CheckpointError(f"{p} is a teacher saved by reducenet 0.1, whose block (a BN and ReLU on each branch "
                              "before the sum) is not the published ReduceNet block and is no longer built: "
                              "retrain it with train.stage1, or import the original's with models.convert")
    if fmt != FORMAT and fmt not in _OLD_FORMATS:
        raise CheckpointError(f"{p} has checkpoint format {fmt!r}, which this version does not read "
                              f"(it reads {FORMAT} and {', '.join(_OLD_FORMATS)}); upgrade reducenet")
    record.setdefault("preprocess", None)
    return record


def load_checkpoint(path: str | Path, map_location: str | torch.device | None = "cpu", **overrides: Any) -> nn.Module:
    """Rebuild the model from a checkpoint's config and load its weights strictly.

    The model gets ``.preprocess`` (the record's, or None) and ``.checkpoint_metadata``.

    Args:
        path: a ``.safetensors`` file, its ``.json`` twin or a run directory (its ``last`` checkpoint).
        map_location: device to put the model on (None: the CPU).
        **overrides: config entries to change; the checkpoint's tensors must still fit the model they build (a
            fused checkpoint records ``inference_mode=True`` itself; to fuse a trained student, load it and call
            :func:`reparam.fuse_model`).
    """
    device = _device(map_location)
    p = resolve(path)
    record = read_record(p)
    check_config(record["config"], record.get("preprocess"), p)
    try:
        with skip_init():  # the strict load below overwrites every parameter and persistent buffer
            model = model_from_config(record["config"], **overrides)
    except ReduceNetError as e:
        raise CheckpointError(f"{p}: its config cannot be built ({e})") from None
    try:
        load_weights(model, p)
    except CheckpointError as e:
        if not overrides:
            raise
        given = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
        raise CheckpointError(f"{e} (with {given}: the checkpoint's tensors must fit the model the changed config "
                              "builds; to fuse a trained student, load it as it is and call reparam.fuse_model)") \
            from None
    try:
        set_card(model, replace(card_of(model), preprocess=record["preprocess"], metadata=record.get("metadata", {})))
    except ConfigError as e:
        raise CheckpointError(f"{p}: {e}") from None
    return model.to(device)


#: The arguments a torchvision/timm checkpoint record may carry: none that names a file to read, a download, a
#: configuration to merge or a device (timm opens ``checkpoint_path``, merges ``pretrained_cfg_overlay``).
EXTERNAL_ARGS = frozenset({"num_classes", "image_size", "img_size", "in_chans", "drop_rate", "drop_path_rate",
                           "global_pool"})
#: The largest model a checkpoint record may ask for (8 GB of float32): checked on the meta device, before any
#: memory is allocated, so a record asking for 10^9 classes is refused instead of exhausting memory.
MAX_PARAMS = 2_000_000_000


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def check_config(config: dict[str, Any], preprocess: Any, where: Path | str) -> None:
    """Refuse, in one line, a checkpoint record that could make loading do anything but build its model: an
    argument the model does not declare (or, for torchvision/timm, one outside :data:`EXTERNAL_ARGS`), a value
    that is not plain JSON data, a structure patch that does not fit the model it patches, or a size beyond
    :data:`MAX_PARAMS`. The model is built on the meta device (no memory) and runs one forward pass there, so
    a patch whose layers disagree fails here rather than at the first real forward.

    Raises:
        CheckpointError: naming the file and what is wrong with its record.
    """
    name = config.get("model")
    if not isinstance(name, str):
        raise CheckpointError(f"{where}: its config names model {name!r}; a model is named by a string")
    args = {k: v for k, v in config.items() if k not in ("model", "structure", "grow", "lora")}
    allowed = _declared_args(name) if is_zoo(name) else EXTERNAL_ARGS
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise CheckpointError(f"{where}: its config passes {unknown[0]!r} to {name}, which a checkpoint may not set "
                              f"(allowed: {', '.join(sorted(allowed))}); re-save the model with models.save_checkpoint")
    bad = next((k for k, v in args.items()
                if not (_scalar(v) or isinstance(v, list) and len(v) <= 64 and all(map(_scalar, v)))), None)
    if bad is not None:
        raise CheckpointError(f"{where}: its config's {bad!r} is not a number, string or list of them")
    for key, size in (("grow", "expansion"), ("lora", "rank")):
        record = config.get(key)
        if record is not None and not (isinstance(record, dict) and set(record) == {size, "modules"}
                                       and isinstance(record["modules"], list) and len(record["modules"]) <= 10_000
                                       and all(isinstance(m, str) for m in record["modules"])):
            raise CheckpointError(f"{where}: its {key} record is not {{'{size}': n, 'modules': [conv paths]}}")
    structure = config.get("structure")
    if structure is not None and not (isinstance(structure, dict) and all(
            isinstance(k, str) and isinstance(v, dict) and all(_scalar(x) or isinstance(x, list) and len(x) <= 8
                                                               and all(map(_scalar, x)) for x in v.values())
            for k, v in structure.items())):
        raise CheckpointError(f"{where}: its structure patch is not a {{module path: layer spec}} object")
    try:
        model = build_on_meta(config)
    except ReduceNetError as e:
        raise CheckpointError(f"{where}: its config cannot be built ({e})") from None
    except Exception as e:  # a builder given a wrong type or size raises many kinds
        raise CheckpointError(f"{where}: its config cannot be built ({brief(e)})") from None
    params = sum(t.numel() for t in model.parameters())
    if params > MAX_PARAMS:
        raise CheckpointError(f"{where}: its config asks for {params:,} parameters ({params * 4 / 2**30:,.0f} GiB), "
                              f"more than {MAX_PARAMS:,}; the record is damaged or crafted")
    if structure:
        x = torch.empty(1, 3, *_test_size(model, args, preprocess), device="meta")
        try:
            with torch.no_grad():
                model.eval()(x)
        except NotImplementedError:  # an operation without a meta kernel: the real forward will tell
            pass
        except Exception as e:
            raise CheckpointError(f"{where}: its structure patch does not fit the model ({brief(e)})") from None


def _test_size(model: nn.Module, args: dict[str, Any], preprocess: Any) -> tuple[int, int]:
    """The H x W a patched model is test-run at: its preprocess's input size, else the size its config builds it
    for (``image_size``, timm's ``img_size``), else its own default (timm's ``pretrained_cfg``: a LeViT takes
    224 px only), else 32."""
    default = getattr(model, "pretrained_cfg", None) or {}
    for size in ((preprocess or {}).get("input_size") if isinstance(preprocess, dict) else None,
                 args.get("image_size"), args.get("img_size"), default.get("input_size")):
        hw = list(size[-2:]) if isinstance(size, (list, tuple)) else [size, size]
        if all(isinstance(v, int) and 8 <= v <= 1024 for v in hw) and len(hw) == 2:
            return hw[0], hw[1]
    return 32, 32


def build_on_meta(config: dict[str, Any]) -> nn.Module:
    """The model of ``config`` with every parameter and buffer on the meta device (shapes, no memory): built under
    ``torch.device("meta")``; or, for a builder that computes with tensors while it builds (torchvision's RegNet
    reads its widths with ``.tolist()``, which a meta tensor cannot), built on the CPU with each parameter and
    buffer moved to the meta device as it is registered (one layer's worth of memory at a time, never written)."""
    try:
        with torch.device("meta"), skip_init():
            return model_from_config(config)
    except NotImplementedError:
        pass
    with _registered_on_meta(), skip_init():
        return model_from_config(config)


@contextlib.contextmanager
def _registered_on_meta() -> Iterator[None]:
    """Within, a module's parameters and buffers move to the meta device as they are registered (accelerate's
    ``init_empty_weights``); it patches ``nn.Module`` for the whole process while it lasts, as :func:`skip_init`."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(module, name, param)
        if param is not None:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    def buffer_on_meta(module: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
        register_buffer(module, name, tensor, persistent)
        if tensor is not None:
            module._buffers[name] = tensor.to("meta")

    nn.Module.register_parameter, nn.Module.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


@functools.lru_cache(maxsize=None)
def _declared_args(name: str) -> frozenset[str]:
    """The arguments zoo model ``name`` declares: the config of its default build (on the meta device)."""
    with torch.device("meta"), skip_init():
        return frozenset(create_model(name).config) - {"model", "structure"}


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Within, ``torch.nn.init``'s initialisers return their tensor untouched: for a model whose every parameter is
    overwritten next (a strict load) or never read (a build on the meta device, where each initialiser runs
    torch's Python reference code, about 1 ms a call). As ``transformers``' ``no_init_weights``, it patches the
    module for the whole process while it lasts: build nothing real in another thread meanwhile."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_") and callable(getattr(nn.init, n))]
    saved = {n: getattr(nn.init, n) for n in names}

    def keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    try:
        for n in names:
            setattr(nn.init, n, keep)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _device(map_location: str | torch.device | None) -> torch.device:
    """``map_location`` as a device that exists here, else a one-line :class:`CheckpointError`."""
    try:
        device = torch.device("cpu" if map_location is None else map_location)
    except (RuntimeError, TypeError):
        raise CheckpointError(f"map_location {map_location!r} is not a device; pass 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"map_location {map_location!r} asks for a GPU but none is visible; pass 'cpu'")
    return device


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint's weights into an existing ``model``, refusing another architecture."""
    p = resolve(path)
    record = read_record(p)
    mine, theirs = getattr(model, "config", {}), record["config"]
    keys = ("model", "width", "expansion", "num_classes")
    if mine and any(mine.get(k) != theirs.get(k) for k in keys):
        have = ", ".join(f"{k}={theirs.get(k)}" for k in keys)
        want = ", ".join(f"{k}={mine.get(k)}" for k in keys)
        raise CheckpointError(f"{p} holds another architecture ({have}) than this model ({want})")
    state = read_state_dict(p)
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # keep the stored precision (e.g. a float64 checkpoint stays float64)
        model.to(dtypes.pop())
    try:
        model.load_state_dict(with_versions(state, model), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{p} does not fit this model ({brief(e, 200, typed=False)})") from None
    return model
