"""Backbones: the real offline default weights, and torchvision archs offline."""
import glob
import os
from collections import Counter

import pytest
import torch

from conftest import FAST, FLOWERS5, needs_flowers5
from imgclf.cli import train
from imgclf.data import decode
from imgclf.errors import UserError
from imgclf.models import backbones, classifier, efficientnet_lite


@needs_flowers5
def test_default_backbone_has_the_real_imagenet_weights():
    """The untouched EfficientNet-Lite0 names daisy photos 'daisy' (ImageNet class 985) far
    more often than anything else; random weights would not."""
    state = torch.load(efficientnet_lite.lite_weights_path("efficientnet_lite0"), weights_only=True)
    backbone = efficientnet_lite.build_lite_backbone("efficientnet_lite0").eval()
    fc = torch.nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    preprocess = dict(backbones.default_preprocessing("efficientnet_lite0"), size=128)
    files = sorted(glob.glob(os.path.join(FLOWERS5, "test", "daisy", "*")))[:60]
    batch = torch.stack([torch.from_numpy(decode.eval_array(decode.load_rgb(f), preprocess))
                         for f in files])
    with torch.no_grad():
        top1 = fc(backbone(batch)).argmax(1).tolist()
    votes = Counter(top1)
    assert votes.most_common(1)[0][0] == 985
    assert votes[985] / len(files) > 0.3


def test_lite_backbone_is_built_from_its_weights():
    # Lite2 repeats stages 2-6 1.2x, rounded up: 1+3+3+4+4+5+1 blocks.
    for arch, blocks in [("efficientnet_lite0", 16), ("efficientnet_lite2", 21)]:
        backbone = efficientnet_lite.build_lite_backbone(arch)
        assert len(backbone._blocks) == blocks
        out = backbone.eval()(torch.zeros(1, 3, 96, 96))
        assert out.shape == (1, 1280)


@pytest.mark.parametrize("arch, width", [("alexnet", 4096), ("vgg16", 4096),
                                         ("densenet121", 1024), ("resnet18", 512),
                                         ("efficientnet_b0", 1280), ("mobilenet_v3_small", 1024),
                                         ("convnext_tiny", 768)])
def test_torchvision_heads_are_replaced_per_family(arch, width):
    model = classifier.build_model(arch, num_classes=7, hidden_units=[32], pretrained=False)
    assert model.backbone.num_features == width
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64 if arch != "alexnet" else 96, 64 if arch != "alexnet"
                                 else 96)).shape == (1, 7)


def test_torchvision_arch_offline_says_what_to_do(torch_home):
    with pytest.raises(UserError, match=r"resnet18.*resnet18-.*\.pth.*--weights PATH"):
        classifier.build_model("resnet18", num_classes=3)


def _put_in_torch_cache(torch_home, arch):
    import torchvision.models as tvm
    weights = tvm.get_model_weights(arch).DEFAULT
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tvm.get_model(arch, weights=None).state_dict(),
               folder / os.path.basename(weights.url))


def test_torchvision_arch_trains_from_torch_cache(torch_home, image_folder, tmp_path, capsys):
    """Weights of the right shapes where torchvision's cache looks: no download needed."""
    _put_in_torch_cache(torch_home, "mobilenet_v3_small")
    assert train.main([image_folder, "--arch", "mobilenet_v3_small", "--save_dir",
                       str(tmp_path / "run"), *FAST]) == 0
    assert "test acc" in capsys.readouterr().out


def test_weights_flag_loads_a_local_state_dict(torch_home, image_folder, tmp_path):
    import torchvision.models as tvm
    path = tmp_path / "r18.pth"
    torch.save(tvm.resnet18().state_dict(), path)
    assert train.main([image_folder, "--arch", "resnet18", "--weights", str(path), "--save_dir",
                       str(tmp_path / "run"), *FAST]) == 0


def test_weights_flag_rejects_a_state_dict_of_another_arch(torch_home, tmp_path):
    import torchvision.models as tvm
    path = tmp_path / "wrong.pth"
    torch.save(tvm.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(UserError, match="does not fit --arch resnet18"):
        classifier.build_model("resnet18", num_classes=3, weights_path=str(path))


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(UserError, match="unknown --arch 'resnet9000'.*vgg16"):
        backbones.check_arch("resnet9000")


def test_flip_tta_averages_the_logits_of_the_photo_and_its_mirror_image():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten())
    head = torch.nn.Linear(4, 3)
    plain = classifier.ImageClassifier(backbone, head).eval()
    mirrored = classifier.ImageClassifier(backbone, head, flip_tta=True).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = (plain(x) + plain(x.flip(-1))) / 2
        assert torch.allclose(mirrored(x), expected, atol=1e-6)
        assert not torch.allclose(plain(x), expected, atol=1e-3)
