"""The checkpoint format: a plain dict of tensors and primitives, written atomically,
loaded with weights_only=True, checked before it is trusted."""
import errno
import os
import platform
import re
import warnings

import numpy as np
import torch

from .data.decode import RESIZE_FILTERS, upscale_filter
from .errors import UserError
from .models.backbones import _short, torchvision_arch_names
from .models.classifier import ImageClassifier, build_head, build_model
from .models.efficientnet_lite import LITE_ARCHS
from .models.weights import (
    file_sha256,
    lite_package,
    published_backbone,
    published_weights_file,
    torchvision_weights,
)
from .utils import atomic

CHECKPOINT_FORMAT = "image-classifier-checkpoint"
# The newest format this tool reads. A checkpoint holding the whole network is written as
# version 1, which earlier versions of this tool read too; one that names the published
# backbone weights instead of holding them (backbone_weights) is version 2, which they refuse.
CHECKPOINT_VERSION = 2
FULL_VERSION, REFERENCE_VERSION = 1, 2


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
# The checkpoint
# ---------------------------------------------------------------------------------------------
def checkpoint_weights(model, arch, reference):
    """The checkpoint's entries for the network's weights: the whole state dict, or, with
    reference (a frozen backbone whose weights are published), the head's alone and the name
    and SHA-256 of the published backbone weights, which loading rebuilds it from."""
    state_dict = model.state_dict()
    if not reference:
        return dict(format_version=FULL_VERSION, state_dict=state_dict)
    name = (lite_package(arch) if arch in LITE_ARCHS
            else str(torchvision_weights(arch, None)))
    path = published_weights_file(arch, name, f"--arch {arch}")
    return dict(format_version=REFERENCE_VERSION,
                state_dict={k: v for k, v in state_dict.items() if k.startswith("head.")},
                backbone_weights=dict(name=name, sha256=file_sha256(path)))


def make_checkpoint(config, options, scan, names, preprocess, model, result):
    """One copy of the weights (or, for a frozen published backbone, the head's and the name
    of the backbone's); the state to resume from only where the run was interrupted."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "model_args": dict(arch=config.arch, num_classes=len(scan.classes),
                           hidden_units=list(config.hidden_units), dropout=config.dropout,
                           flip_tta=bool(model.flip_tta)),
        "classes": list(scan.classes),
        "class_to_idx": scan.class_to_idx,
        "class_names": [names[c] for c in scan.classes],
        "preprocess": preprocess,
        **checkpoint_weights(model, config.arch,
                                         references_published_backbone(config, options)),
        "finetuned": bool(config.finetune),
        "epoch": result.best_epoch,
        "epochs_run": result.epoch,
        "complete": not result.interrupted,
        "metrics": result.metrics,
        "history": result.history,
        "args": options,
        "data": dict(root=os.path.abspath(scan.root), layout=scan.layout,
                     split_files=scan.split_files, excluded=list(scan.excluded),
                     counts={s: len(v) for s, v in scan.samples.items()}),
        "versions": dict(torch=str(torch.__version__), python=platform.python_version(),
                         numpy=np.__version__),
    }
    if result.interrupted:
        checkpoint["train_state"] = result.train_state
    # The unknown verdict's data (heads/novelty.py); None where the run was stopped before
    # fitting it, which predict tells apart from a checkpoint older than the verdict
    checkpoint["novelty"] = getattr(result, "novelty", None)
    return checkpoint


def references_published_backbone(config, options):
    """Whether the checkpoint names the backbone's published weights instead of holding them:
    where they stayed frozen and were not --weights PATH, unless --full_checkpoint."""
    return not (config.finetune or config.weights or options.get("full_checkpoint"))
