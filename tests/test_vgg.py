"""Behaviour tests for the Pyramid's VGG family (models/vgg.py): layers against the original, surgery, fusion.

The expected layers are written out here from the original code (ASHISRAVINDRAN/pyramid_compression,
``LoadModel.py`` for the forward scheme, ``LoadModel_gram_backward.py`` for the backward one), by the same
slices of torchvision's ``vgg19().features`` that it takes, independently of models/vgg.py.
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import models
import reparam
from _shared import one_line
from models import ConfigError
from models.vgg import LEVELS, chain, hint_points, level_name, next_level, svgg_from
from reparam.export import export_deploy

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")
SVGG = [n for n in LEVELS if n.startswith("svgg")]
F64 = torch.float64



# ---------------------------------------------------------------------------------------------------- the original
def C(i: int, o: int) -> str:  # Conv2d(i, o, kernel_size=3, stride=1, padding=1), biased
    return f"C{i}-{o}"


def L(i: int, o: int) -> str:  # Linear(i, o)
    return f"L{i}-{o}"


R, P, D = "R", "P", "D"  # ReLU, MaxPool2d(2, 2), Dropout(0.5)
# torchvision.models.vgg19().features, index by index
VGG19_FEATURES = [C(3, 64), R, C(64, 64), R, P,
                  C(64, 128), R, C(128, 128), R, P,
                  C(128, 256), R, C(256, 256), R, C(256, 256), R, C(256, 256), R, P,
                  C(256, 512), R, C(512, 512), R, C(512, 512), R, C(512, 512), R, P,
                  C(512, 512), R, C(512, 512), R, C(512, 512), R, C(512, 512), R, P]
assert len(VGG19_FEATURES) == 37


def original(level: str, num_classes: int = 100, flat: int = 4608) -> list[str]:
    """The original's layers in execution order (``flat`` = 512·(S/32)², 4608 at its 96 px)."""
    f = VGG19_FEATURES
    mlp = [L(flat, 2048), R, D, L(2048, 512), R, D, L(512, num_classes)]  # VGG19.classifier, modules 0, 3, 6 replaced
    lin = [D, L(flat, num_classes)]  # nn.Sequential(nn.Dropout(p=0.5), nn.Linear(4608, C))
    new5, new4, new3 = [C(512, 512), R, P], [C(256, 512), R, P], [C(128, 256), R, P]
    new2 = [P, C(64, 128), R, P]
    return {
        "pyramid_vgg19": f + mlp,
        # forward: features / compressed_features / frozen_features / classifier
        "svgg17_forward": f[:37] + lin,
        "svgg14_forward": f[:28] + new5 + lin,
        "svgg11_forward": f[:19] + new4 + new5 + lin,
        "svgg8_forward": f[:10] + new3 + new4 + new5 + lin,
        "svgg5_forward": f[:2] + new2 + new3 + new4 + new5 + lin,
        # backward: ersti / idle_features / compressed_features / crunching_features / features / classifier
        "svgg17_backward": f[:2] + new2 + f[10:19] + f[19:] + mlp,
        "svgg14_backward": f[:2] + new2 + new3 + f[19:28] + f[28:] + mlp,
        "svgg11_backward": f[:2] + new2 + new3 + new4 + f[28:37] + mlp,
        "svgg8_backward": f[:2] + new2 + new3 + new4 + new5 + mlp,
        "svgg5_backward": f[:2] + new2 + new3 + new4 + new5 + lin,
    }[level]


def expected_params(layers: list[str], bn: bool = False) -> int:
    """Parameters of a layer list: conv ``9·i·o + o`` (BN: ``9·i·o + 2·o``, no conv bias), linear ``i·o + o``."""
    total = 0
    for t in layers:
        if t[0] in "CL":
            i, o = map(int, t[1:].split("-"))
            total += (9 * i * o + 2 * o if bn else 9 * i * o + o) if t[0] == "C" else i * o + o
    return total


def trace(model: nn.Module, size: int) -> tuple[list[str], torch.Tensor]:
    """The leaf layers a forward pass runs, as tokens (checking every conv/pool/dropout's settings)."""
    seen: list[str] = []

    def token(m: nn.Module) -> str | None:
        if isinstance(m, nn.Conv2d):
            assert (m.kernel_size, m.stride, m.padding, m.groups) == ((3, 3), (1, 1), (1, 1), 1)
            return C(m.in_channels, m.out_channels) + ("" if m.bias is not None else "/nobias")
        if isinstance(m, nn.BatchNorm2d):
            return "B"
        if isinstance(m, nn.ReLU):
            return R
        if isinstance(m, nn.MaxPool2d):
            assert (m.kernel_size, m.stride, m.padding) == (2, 2, 0)
            return P
        if isinstance(m, nn.Dropout):
            assert m.p == 0.5
            return D
        if isinstance(m, nn.Linear):
            return L(m.in_features, m.out_features)
        assert isinstance(m, (nn.Identity, nn.Flatten)), type(m)
        return None

    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(token(m)))
             for m in model.modules() if not list(m.children())]
    try:
        param = next(model.parameters())
        y = model(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    return [t for t in seen if t is not None], y


def meta_model(name: str, **kwargs) -> nn.Module:
    """A model with shapes but no data: fast to build and run when only the structure matters."""
    with torch.device("meta"):
        return models.create_model(name, **kwargs)


# ---------------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("level", list(LEVELS))
def test_layers_and_param_count_match_original(level):
    model = meta_model(level, num_classes=100, image_size=96)
    layers, y = trace(model, 96)
    assert layers == original(level)
    assert y.shape == (1, 100)
    assert models.count_params(model) == expected_params(original(level))
    weight_layers = sum(t[0] in "CL" for t in layers)
    depth = 19 if level == "pyramid_vgg19" else int(level[4:].split("_")[0])
    assert weight_layers == (6 if depth == 5 else depth)  # SVGG5 counts its 5 convs; it has 1 FC as well


def test_vgg19_param_count_by_hand():
    # 16 convs 20,024,384 (torchvision's vgg19 features) + 4608·2048+2048 + 2048·512+512 + 512·100+100
    model = meta_model("pyramid_vgg19", num_classes=100, image_size=96)
    assert models.count_params(model.features) == 20_024_384
    assert models.count_params(model) == 20_024_384 + 9_439_232 + 1_049_088 + 51_300


@pytest.mark.parametrize("level", ["pyramid_vgg19_bn", "svgg14_forward", "svgg5_forward", "svgg17_backward",
                                   "svgg8_backward"])
def test_bn_puts_batchnorm_after_every_conv(level):
    kwargs = {} if level == "pyramid_vgg19_bn" else {"bn": True}
    model = meta_model(level, num_classes=100, image_size=96, **kwargs)
    layers, _ = trace(model, 96)
    base = "pyramid_vgg19" if level == "pyramid_vgg19_bn" else level
    convs = [i for i, t in enumerate(layers) if t.startswith("C")]
    assert convs and all(layers[i].endswith("/nobias") and layers[i + 1:i + 3] == ["B", R] for i in convs)
    assert [t.removesuffix("/nobias") for t in layers if t != "B"] == original(base)
    assert models.count_params(model) == expected_params(original(base), bn=True)


@pytest.mark.parametrize("size", [32, 64, 96, 160])
def test_head_follows_image_size(size):
    for level in ("pyramid_vgg19", "svgg17_forward", "svgg5_backward"):
        model = meta_model(level, num_classes=10, image_size=size)
        layers, y = trace(model, size)
        assert layers == original(level, 10, 512 * (size // 32) ** 2) and y.shape == (1, 10)


# ---------------------------------------------------------------------------------------------------- registry
def test_registered_names_and_timm_untouched():
    names = models.list_models("*vgg*")
    assert names == ["pyramid_vgg19", "pyramid_vgg19_bn"] + SVGG
    assert len(SVGG) == 10 and set(chain("forward")[1:]) | set(chain("backward")[1:]) == set(SVGG)
    m = timm.create_model("svgg11_backward", num_classes=7)
    assert m.config["model"] == "svgg11_backward" and m.head.fc3.out_features == 7
    # timm's own VGGs keep their names (ours would have overwritten them, with a warning, as vgg19/vgg19_bn)
    for name in ("vgg19", "vgg19_bn"):
        assert timm.models.model_entrypoint(name).__module__ == "timm.models.vgg"


def test_level_name_maps_either_top_to_the_top_level():
    """What a chain compares a --teacher's model name with: pyramid_vgg19_bn is the top level, with BatchNorm."""
    assert level_name("pyramid_vgg19_bn") == level_name("pyramid_vgg19") == "pyramid_vgg19"
    assert [level_name(name) for name in chain("backward")] == chain("backward")
    assert level_name("reduce20") is None and level_name(None) is None and level_name("svgg14_bn") is None


@pytest.mark.parametrize("name", ["pyramid_vgg19", "pyramid_vgg19_bn", "svgg14_forward", "svgg5_backward"])
def test_config_rebuilds_model(name, make_images):
    model = models.create_model(name, num_classes=100).eval()
    assert model.config["model"] == name and model.config["num_classes"] == 100 and model.num_classes == 100
    assert model.config["image_size"] == 32 and model.config["inference_mode"] is False
    assert ("bn" in model.config) == name.startswith("svgg")
    again = models.model_from_config(model.config)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        y = model(make_images(2))
    assert y.shape == (2, 100) and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------------- surgery
def check_step(parent: nn.Module, child: nn.Module, size: int) -> None:
    """The child inherits exactly what it shares with the parent, bit for bit, and nothing else."""
    level = child.config["model"]
    points = hint_points(level)
    ps, cs = parent.state_dict(), child.state_dict()
    assert set(child.inherited) | set(child.fresh) == set(cs) and not set(child.inherited) & set(child.fresh)
    assert child.inherited and child.fresh
    for k in child.inherited:
        assert torch.equal(cs[k], ps[k]) and cs[k].dtype == ps[k].dtype, k
        assert cs[k].data_ptr() != ps[k].data_ptr(), k  # copies: training the child leaves the parent alone
    new_prefix = "head." if points.replaced == "head" else points.student_output + "."
    assert all(k.startswith(new_prefix) and k not in ps for k in child.fresh)
    new_weight = child.get_submodule(points.new).state_dict()[
        "conv.weight" if points.replaced != "head" else "weight"]
    assert not any(v.shape == new_weight.shape and torch.equal(v, new_weight) for v in ps.values())
    bn = child.config["bn"]
    assert len(child.fresh) == (2 if points.replaced == "head" or not bn else 6)  # conv/fc (+ BN with its stats)

    # the kept input side computes the same, and the new part produces the replaced part's shapes
    acts: dict[str, torch.Tensor] = {}
    hooks = [m.get_submodule(path).register_forward_hook(lambda mod, i, o, key=key: acts.__setitem__(key, o))
             for m, path, key in ((parent, points.teacher_input, "t_in"), (child, points.student_input, "s_in"),
                                  (parent, points.teacher_output, "t_out"), (child, points.student_output, "s_out"),
                                  (parent, points.teacher_prepool, "t_pre"), (child, points.student_prepool, "s_pre"))]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert parent.eval()(x).shape == child.eval()(x).shape == (1, child.num_classes)
    for h in hooks:
        h.remove()
    assert torch.equal(acts["t_in"], acts["s_in"])
    assert acts["t_out"].shape == acts["s_out"].shape
    assert acts["t_pre"].shape == acts["s_pre"].shape
    if points.replaced.startswith("block"):  # Gram/FSP pairs: input and pre-pool output of the same size
        assert acts["t_pre"].shape[-2:] == acts["t_in"].shape[-2:]
    elif points.replaced == "conv1_2..pool2":
        assert acts["t_pre"].shape[-1] * 2 == acts["t_in"].shape[-1]
    if points.replaced != "head":  # the inherited head computes what the parent's did
        z = torch.randn(2, 512, size // 32, size // 32)
        with torch.no_grad():
            assert torch.equal(parent.head(z), child.head(z))


@pytest.mark.parametrize("scheme", ["forward", "backward"])
@pytest.mark.parametrize("size, bn", [(32, True), (96, False)])
def test_whole_chain_inherits_step_by_step(scheme, size, bn):
    top = models.create_model("pyramid_vgg19_bn" if bn else "pyramid_vgg19", num_classes=100, image_size=size)
    top.preprocess = {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, size, size]}
    model, names = top.train(), [top.config["model"]]
    for expected in chain(scheme)[1:]:
        child = next_level(model, scheme)
        assert child.config == {"model": expected, "num_classes": 100, "image_size": size, "bn": bn,
                                "inference_mode": False}
        assert child.training and child.preprocess == top.preprocess
        check_step(model, child, size)
        model = child.train()
        names.append(expected)
    assert names[1:] == chain(scheme)[1:] and model.config["model"] == f"svgg5_{scheme}"


def test_svgg_from_keeps_dtype_and_the_two_svgg5_are_one_network():
    parent = models.create_model("svgg8_backward").to(F64).eval()
    child = svgg_from(parent, "svgg5_backward")
    assert next(child.parameters()).dtype == F64 and not child.training
    forward5 = models.create_model("svgg5_forward")
    assert {k: v.shape for k, v in forward5.state_dict().items()} == \
        {k: v.shape for k, v in child.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- fusion
FUSE_LEVELS = ["pyramid_vgg19_bn", "svgg14_forward", "svgg5_forward", "svgg17_backward", "svgg8_backward"]


def bn_model(name: str, dtype=torch.float32) -> nn.Module:
    kwargs = {} if name == "pyramid_vgg19_bn" else {"bn": True}
    return models.create_model(name, num_classes=10, **kwargs).to(dtype)


@pytest.mark.parametrize("name", FUSE_LEVELS)
def test_fuse_bn_model_float32_and_checkpoint(name, randomize, make_images, tmp_path):
    model = randomize(bn_model(name)).train()
    fused = reparam.fuse_model(model)
    assert model.training and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not fused.training and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert fused.config["inference_mode"] is True and "structure" not in fused.config
    x = make_images(2)
    with torch.no_grad():
        ref = model.eval()(x)
        assert ref.abs().max() > 1e-2  # a meaningful comparison
        assert (fused(x) - ref).abs().max().item() <= 1e-4
    # the fused form has exactly the tensors of the BatchNorm-free network
    plain = models.create_model("pyramid_vgg19" if name == "pyramid_vgg19_bn" else name, num_classes=10)
    plain.load_state_dict(fused.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), fused(x))

    path = models.save_checkpoint(fused, tmp_path / "fused")
    loaded = models.load_checkpoint(path)
    assert loaded.config == fused.config
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), fused(x))


@pytest.mark.parametrize("name", ["svgg5_forward", "svgg8_backward"])
def test_a_trained_level_exports_files_that_compute_it(name, randomize, make_images, tmp_path):
    """The deploy files of a Pyramid level (what train.pyramid writes unless --no-export) compute the unfused net."""
    import onnxruntime as ort

    model = randomize(bn_model(name)).eval()
    x = make_images(3, seed=5)
    with torch.no_grad():
        ref = model(x)
    atol = 1e-4 * max(1.0, ref.abs().max().item())
    report = export_deploy(model, tmp_path / "deploy")
    names = {"model.safetensors", "model.json", "model.ts", "model.onnx", "model.pt2"}
    assert {p.name for p in report.files.values()} == names
    assert set(report.max_diff) == {"fused", "safetensors", "torchscript", "onnx", "pt2"}
    with torch.no_grad():
        assert (torch.jit.load(str(report.files["torchscript"]))(x) - ref).abs().max().item() <= atol
        deploy = models.load_checkpoint(report.files["safetensors"]).eval()
        assert deploy.config["model"] == name and not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
        assert (deploy(x) - ref).abs().max().item() <= atol
    session = ort.InferenceSession(str(report.files["onnx"]), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert (onnx_out - ref).abs().max().item() <= atol


@pytest.mark.parametrize("name", ["pyramid_vgg19_bn", "svgg11_backward"])
def test_fuse_bn_model_float64(name, randomize, make_images):
    model = randomize(bn_model(name, F64)).eval()
    fused = reparam.fuse_model(model)
    assert next(fused.parameters()).dtype == F64
    x = make_images(2, dtype=F64)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max().item() <= 1e-9


def test_fuse_plain_model_changes_nothing(make_images):
    model = models.create_model("svgg8_forward").eval()
    fused = reparam.fuse_model(model)
    assert fused.state_dict().keys() == model.state_dict().keys()
    x = make_images(2)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name, kwargs, word", [
    ("svgg14_forward", {"image_size": 33}, "image_size"),
    ("svgg14_forward", {"image_size": 0}, "image_size"),
    ("svgg14_forward", {"image_size": -32}, "image_size"),
    ("svgg14_forward", {"image_size": 96.0}, "image_size"),
    ("pyramid_vgg19", {"image_size": True}, "image_size"),
    ("svgg5_backward", {"num_classes": 0}, "num_classes"),
    ("svgg5_backward", {"bn": "yes"}, "bn"),
    ("svgg5_backward", {"inference_mode": 1}, "inference_mode"),
    ("pyramid_vgg19", {"expansion": 1}, "expansion"),
    ("svgg17_backward", {"lora_rank": 4}, "lora_rank"),
    ("svgg17_backward", {"lora_targets": ["features.*"]}, "lora_targets"),
    ("pyramid_vgg19", {"bn": True}, "bn"),  # the BN form is pyramid_vgg19_bn
])
def test_bad_arguments_are_one_line_config_errors(name, kwargs, word):
    with pytest.raises(ConfigError) as e:
        models.create_model(name, **kwargs)
    assert word in one_line(e)


def test_surgery_refusals_are_one_line_config_errors():
    vgg19 = meta_model("pyramid_vgg19")
    cases = [
        (lambda: next_level(vgg19, "sideways"), "scheme"),
        (lambda: chain("up"), "scheme"),
        (lambda: hint_points("svgg15_forward"), "level"),
        (lambda: hint_points("pyramid_vgg19"), "top"),
        (lambda: svgg_from(vgg19, "svgg99_forward"), "level"),
        (lambda: svgg_from(vgg19, "pyramid_vgg19"), "top"),
        (lambda: svgg_from(vgg19, "svgg14_forward"), "svgg17_forward"),  # not the level above
        (lambda: svgg_from(meta_model("svgg14_backward"), "svgg11_forward"), "svgg14_forward"),
        (lambda: next_level(meta_model("svgg14_forward"), "backward"), "scheme"),
        (lambda: next_level(meta_model("svgg5_forward"), "forward"), "bottom"),
        (lambda: next_level(meta_model("svgg5_backward"), "backward"), "bottom"),
        (lambda: next_level(meta_model("reduce20", expansion=0), "forward"), "reduce20"),
        (lambda: next_level(nn.Linear(2, 2), "forward"), "Linear"),
        (lambda: next_level(meta_model("pyramid_vgg19_bn", inference_mode=True), "forward"), "fused"),
    ]
    for call, word in cases:
        with pytest.raises(ConfigError) as e:
            call()
        assert word in one_line(e), (word, str(e.value))


def test_fused_plain_parent_is_accepted():
    # without BatchNorm the fused form is the same network, so it can still be a parent
    parent = meta_model("svgg17_forward", inference_mode=True)
    child = next_level(parent, "forward")
    assert child.config["model"] == "svgg14_forward" and child.config["inference_mode"] is True
