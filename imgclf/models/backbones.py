"""Backbones by name: EfficientNet-Lite and torchvision's families, and their preprocessing."""
import os

import torch
from torch import nn

from ..errors import UserError

DEFAULT_ARCH = "efficientnet_lite0"

IMAGENET_MEAN_STD = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

# torchvision families whose classification layer is a plain nn.Linear we can swap out.
TORCHVISION_FAMILIES = ("alexnet", "vgg", "resnet", "resnext", "wide_resnet", "densenet",
                        "efficientnet_b", "efficientnet_v2", "mobilenet_v2", "mobilenet_v3",
                        "convnext", "regnet", "shufflenet", "mnasnet", "vit", "swin", "maxvit")
from .efficientnet_lite import LITE_ARCHS, LITE_MEAN_STD, build_lite_backbone


# ---------------------------------------------------------------------------------------------
# torchvision backbones
# ---------------------------------------------------------------------------------------------
def torchvision_arch_names():
    import torchvision.models as tvm
    return sorted(name for name in tvm.list_models(module=tvm)
                  if name.startswith(TORCHVISION_FAMILIES))


def known_archs():
    return sorted(LITE_ARCHS) + torchvision_arch_names()


def check_arch(arch):
    if arch in LITE_ARCHS:
        return
    if arch not in torchvision_arch_names():
        raise UserError(f"unknown --arch '{arch}'. Choose one of: {', '.join(known_archs())}")


def _last_linear_name(model):
    """The dotted name of the model's classification layer: its last nn.Linear."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1]


def _replace_module(model, dotted_name, new_module):
    parent_name, _, child = dotted_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new_module)


def build_torchvision_backbone(arch, weights_path=None, pretrained=True, weights=None):
    """A torchvision classifier with its last Linear layer removed: it returns features.
    weights: the published weights to load (default: the arch's DEFAULT ones)."""
    import torchvision.models as tvm
    if weights_path or not pretrained:
        model = tvm.get_model(arch, weights=None)
        if weights_path:
            _load_local_weights(model, arch, weights_path)
    else:
        weights = weights or tvm.get_model_weights(arch).DEFAULT
        try:
            model = tvm.get_model(arch, weights=weights)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
            raise UserError(f"cannot get the pretrained weights for --arch {arch}: {weights.url} "
                            f"could not be downloaded ({_short(err)}) and {cache} is not there. "
                            f"Put that file there, or pass --weights PATH to a local state dict "
                            f"for {arch}.") from None
    fc_name = _last_linear_name(model)
    num_features = model.get_submodule(fc_name).in_features
    _replace_module(model, fc_name, nn.Identity())
    model.num_features = num_features
    return model


def _load_local_weights(model, arch, path):
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--weights {path}: no such file") from None
    except Exception as err:
        raise UserError(f"--weights {path}: not a loadable state dict ({_short(err)}); "
                        f"give a file saved with torch.save(model.state_dict())") from None
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise UserError(f"--weights {path}: does not fit --arch {arch} ({_short(err)}); "
                        f"give the state dict of a torchvision {arch}") from None


def _short(err):
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def default_preprocessing(arch):
    """Input size, resize and normalisation the backbone was trained with. Photos smaller than
    the input are enlarged bilinearly: bicubic's overshoot at sharp edges cost 1.5 points of
    test accuracy on 32 px handwritten digits (on 128 px flowers it measured 0.9 points the
    other way, within noise). Larger photos are shrunk bicubically, as in training."""
    if arch in LITE_ARCHS:
        spec = LITE_ARCHS[arch]
        mean, std = LITE_MEAN_STD
        return dict(size=spec["size"], crop_pct=spec["crop_pct"], mean=mean, std=std,
                    upscale="bilinear")
    mean, std = IMAGENET_MEAN_STD
    return dict(size=224, crop_pct=0.875, mean=mean, std=std, upscale="bilinear")


def build_backbone(arch, weights_path=None, pretrained=True):
    check_arch(arch)
    if arch in LITE_ARCHS:
        return build_lite_backbone(arch, weights_path)
    return build_torchvision_backbone(arch, weights_path, pretrained)
