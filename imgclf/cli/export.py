"""Export a checkpoint from train.py to ONNX, so that prediction needs no PyTorch.

    python export.py CHECKPOINT [--out model.onnx] [--quantize] [--check_images DIR]

The ONNX model is the whole network, backbone and head, with the softmax included:
  input  "image":         float32 (N, 3, SIZE, SIZE), preprocessed exactly as predict.py does
                          (decode.eval_array: resize, centre crop, normalise); N is free
  output "probabilities": float32 (N, classes), each row sums to 1, columns in class order
  output "novelty":       float32 (N,), where the checkpoint has the unknown verdict's data
                          (heads/novelty.py: its bank of features is inside the model); a
                          photo is unknown above metadata "unknown_threshold"
Its metadata_props carry, as JSON strings, what prediction needs besides the weights: "classes"
(folder names, output order), "class_names", "preprocess" {size, crop_pct, upscale, mean, std},
"arch", and "unknown_threshold" with the novelty output.
predict.py and serve.py read them, so the .onnx file alone is enough to predict.

Every export is checked before the file is written: on real photos (the test images of the data
the checkpoint was trained on, or --check_images DIR; generated images where neither is there)
ONNX Runtime's probabilities must match PyTorch's within 1e-4 and name the same top class, and
its novelty PyTorch's within 1e-3.

Needs the optional packages of the export extra (onnx, onnxruntime): pip install -e '.[export]'.
"""
import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter

import numpy as np

from .. import errors
from ..data import decode, scanning
from ..errors import UserError
from ..utils import atomic
from ..version import __version__

ONNX_FORMAT = "image-classifier-onnx"
ONNX_FORMAT_VERSION = 1
OPSET = 17
CHECK_COUNT = 32            # photos checked where --check_count is not given
GENERATED_CHECK_IMAGES = 8  # where no photos are at hand
PARITY_ATOL = 1e-4          # the largest |probability difference| a float export may show
NOVELTY_ATOL = 1e-3         # the largest |novelty difference| (a sum of two z-scores, ~0-10)
INSTALL_HINT = "pip install -e '.[export]'"


class CheckFailed(Exception):
    """The exported model does not compute what the checkpoint computes: a bug, not a user
    mistake, but reported in one line all the same (exit status 1), and the file is not
    written."""
    exit_status = 1

    def __init__(self, why):
        super().__init__(f"the export failed its check, nothing written: {why}")


def build_parser():
    p = argparse.ArgumentParser(
        description="Export a checkpoint from train.py to an ONNX model (softmax included, "
                    "class names and preprocessing in its metadata), checked against PyTorch.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pth written by train.py")
    p.add_argument("--out", metavar="PATH",
                   help="the .onnx file to write (default: model.onnx beside the checkpoint, "
                        "model.int8.onnx with --quantize)")
    p.add_argument("--quantize", action="store_true",
                   help="write an 8-bit model: about 4x smaller, slightly less exact; static "
                        "per-channel int8 calibrated on training images (default: float32)")
    p.add_argument("--check_images", metavar="DIR",
                   help="photos to check the export on: a folder of class folders, a data "
                        "folder with test/ or valid/, or a folder of photos (default: the test "
                        "images of the data the checkpoint was trained on)")
    p.add_argument("--check_count", type=int, metavar="N",
                   help=f"how many of those photos to check, spread over the classes; 0 for "
                        f"all of them (default: {CHECK_COUNT})")
    return p


def main(argv=None):
    return errors.run_main(build_parser, run, argv, one_line=(UserError, CheckFailed))


def run(args):
    onnx, ort = require_onnx()
    if (args.check_count or 0) < 0:
        raise UserError(f"--check_count {args.check_count}: must be 0 (all) or more")
    from .. import checkpoints
    from ..heads import novelty
    ckpt = checkpoints.load_checkpoint(args.checkpoint)
    model = checkpoints.model_from_checkpoint(ckpt, args.checkpoint)
    scorer = novelty.scorer_from_checkpoint(ckpt, args.checkpoint)
    if scorer is not None:  # the unknown verdict's data goes into the model, as its 2nd output
        model = novelty.ScoredClassifier(model, scorer).eval()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                   "model.int8.onnx" if args.quantize else "model.onnx")
    check = load_check_images(args.check_images, ckpt, args.check_count)
    print(f"checking on {check.describe()}")

    with tempfile.TemporaryDirectory(prefix="export-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        reference = export_and_check(model, ckpt["preprocess"]["size"], path, check, ort,
                                     with_novelty=scorer is not None)
        if args.quantize:
            path = quantize_and_report(ort, ckpt, path, check, reference)
        add_metadata(onnx, path, ckpt, quantized=args.quantize)
        write_file_atomic(path, out)
    print(f"wrote {out} ({mb(out)})")
    return 0


def export_and_check(model, size, path, check, ort, with_novelty=False):
    """Export, then compare with PyTorch on the check images; returns PyTorch's answers. With
    novelty (model a novelty.ScoredClassifier), its novelty is compared too."""
    import torch
    t0 = time.perf_counter()
    export_onnx(model, size, path, with_novelty)
    print(f"exported to ONNX in {time.perf_counter() - t0:.1f}s")
    with torch.inference_mode():  # float32, no autocast: the network exactly as trained
        out = batched(lambda x: model(torch.from_numpy(x)).numpy(), check.arrays)
    logits = out[:, :-1] if with_novelty else out
    reference = torch.softmax(torch.from_numpy(logits), 1).numpy()
    probs = batched(onnx_runner(ort, path), check.arrays)
    print(parity_line("ONNX Runtime (float32) vs PyTorch", probs, reference, check))
    check_parity(probs, reference)
    if with_novelty:
        novelty = batched(onnx_runner(ort, path, output=1), check.arrays)
        check_novelty_parity(novelty, out[:, -1], model.scorer.threshold)
    return reference


def check_novelty_parity(novelty, reference, threshold):
    """The exported novelty against PyTorch's: within NOVELTY_ATOL, the same verdict."""
    diff = float(np.abs(novelty - reference).max())
    print(f"novelty (the unknown verdict's score): max |difference| {diff:.2e}, same verdict "
          f"on {int(((novelty > threshold) == (reference > threshold)).sum())}/{len(novelty)}")
    if diff > NOVELTY_ATOL:
        raise CheckFailed(f"ONNX Runtime's novelty differs from PyTorch's by up to {diff:.2e} "
                          f"(allowed {NOVELTY_ATOL:.0e})")


def quantize_and_report(ort, ckpt, float_path, check, reference):
    """The int8 model beside the float one; prints how far its answers moved and its size."""
    path = float_path.replace(".onnx", ".int8.onnx")
    calibration = load_calibration_images(ckpt, check)
    print(f"quantizing to int8, calibrated on {calibration.describe()}")
    quantize_static_int8(ort, float_path, path, calibration.arrays)
    probs = batched(onnx_runner(ort, path), check.arrays)
    print(parity_line("int8 vs PyTorch", probs, reference, check))
    print(f"size: float32 {mb(float_path)}, int8 {mb(path)} "
          f"({os.path.getsize(float_path) / os.path.getsize(path):.1f}x smaller)")
    return path


def require_onnx():
    """onnx and onnxruntime are optional: say in one line how to get them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise UserError(f"export needs the optional package {err.name}: {INSTALL_HINT}") from None
    return onnx, onnxruntime


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def export_onnx(model, size, path, with_novelty=False):
    """Trace the whole network, softmax included, at the checkpoint's input size; with_novelty
    (model a novelty.ScoredClassifier, its novelty in the last column) as a second output."""
    import torch

    class WithSoftmax(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image):
            out = self.net(image)
            if with_novelty:
                return torch.softmax(out[:, :-1], dim=1), out[:, -1]
            return torch.softmax(out, dim=1)

    example = torch.zeros(2, 3, size, size)
    names = ["probabilities", "novelty"] if with_novelty else ["probabilities"]
    with warnings.catch_warnings():
        # Conv2dSame computes its padding from the input's height and width in Python; the
        # tracer warns that it records them as constants. That is what we want: the input size
        # is fixed by the checkpoint's preprocessing, and only the batch axis stays free.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The TorchScript exporter, on purpose: it needs no package beyond torch and onnx (the
        # newer dynamo exporter needs onnxscript too), and it traces this network (plain
        # convolutions, pads and means) exactly, as the parity check shows. Its deprecation
        # notice is for the maintainers, not for the person exporting.
        warnings.simplefilter("ignore", DeprecationWarning)
        # The exporter puts the module back in the mode it found it in: eval, for the checks.
        torch.onnx.export(WithSoftmax(model).eval(), (example,), path, dynamo=False,
                          input_names=["image"], output_names=names,
                          dynamic_axes={name: {0: "batch"} for name in ["image", *names]},
                          opset_version=OPSET, do_constant_folding=True)


def add_metadata(onnx, path, ckpt, quantized):
    """Store classes, names and preprocessing in the model file, as JSON strings."""
    model = onnx.load(path)
    meta = {
        "format": ONNX_FORMAT,
        "format_version": str(ONNX_FORMAT_VERSION),
        "classes": json.dumps(list(ckpt["classes"])),
        "class_names": json.dumps(list(ckpt.get("class_names") or ckpt["classes"])),
        "preprocess": json.dumps(dict(ckpt["preprocess"])),
        "arch": str(ckpt["model_args"].get("arch", "")),
        "output": "probabilities (softmax applied)",
        "quantization": "int8 static per-channel (QDQ)" if quantized else "none (float32)",
        "averages_mirror": json.dumps(bool(ckpt["model_args"].get("flip_tta", False))),
    }
    if ckpt.get("novelty") is not None:
        meta["unknown_threshold"] = json.dumps(float(ckpt["novelty"]["threshold"]))
        meta["output"] += ("; novelty (N,): the unknown verdict's score, a photo is unknown "
                           "above metadata unknown_threshold")
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = ("Image classifier exported by export.py: input 'image' (N, 3, H, W) "
                        "preprocessed as described in metadata 'preprocess'; output "
                        "'probabilities' (N, classes) in the order of metadata 'classes'.")
    onnx.save(model, path)


def write_file_atomic(src, dest):
    """Copy src over dest through a temporary file in dest's folder, then rename."""
    import shutil
    try:
        out = atomic.AtomicFile(dest)
    except OSError as err:
        raise UserError(f"--out {dest}: cannot write there ({err.strerror})") from None
    with out as f, open(src, "rb") as s:
        shutil.copyfileobj(s, f)


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------
def quantize_static_int8(ort, src, dest, calibration_arrays):
    """Static int8, weights per channel, activations calibrated on real images.

    Why, measured on the 868 flowers5 test photos (EfficientNet-Lite0 head, float32 76.5%):
    static per-channel QDQ 77.4%, 3.5x smaller, faster than float; dynamic int8 62.4% and 4x
    slower than float (ConvInteger); static per-tensor 62.4%. The softmax stays float."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"image": a[None]} for a in calibration_arrays])

        def get_next(self):
            return next(self.batches, None)

    prepared = dest + ".prep.onnx"
    quant_pre_process(src, prepared, skip_symbolic_shape=True)
    quantize_static(prepared, dest, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm", "Add", "GlobalAveragePool",
                                          "ReduceMean", "Clip", "Relu"])
    os.remove(prepared)


# ---------------------------------------------------------------------------------------------
# Checking
# ---------------------------------------------------------------------------------------------
def onnx_runner(ort, path, output=0):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x})[output]


def batched(fn, arrays, batch_size=16):
    return np.concatenate([fn(np.stack(arrays[i:i + batch_size]))
                           for i in range(0, len(arrays), batch_size)])


def check_parity(probs, reference):
    diff = float(np.abs(probs - reference).max())
    if diff > PARITY_ATOL:
        raise CheckFailed(f"ONNX Runtime's probabilities differ from PyTorch's by up to "
                          f"{diff:.2e} (allowed {PARITY_ATOL:.0e})")
    differ = int((probs.argmax(1) != reference.argmax(1)).sum())
    if differ:
        raise CheckFailed(f"ONNX Runtime names another top class than PyTorch on {differ} "
                          f"image(s)")


def parity_line(what, probs, reference, check):
    same = int((probs.argmax(1) == reference.argmax(1)).sum())
    line = (f"{what}: max |probability difference| {np.abs(probs - reference).max():.2e}, "
            f"top-1 same on {same}/{len(probs)}")
    if check.labels is not None:
        line += (f"; accuracy {accuracy(probs, check.labels):.2f}% "
                 f"(PyTorch {accuracy(reference, check.labels):.2f}%)")
    return line


def accuracy(probs, labels):
    return 100.0 * float((probs.argmax(1) == np.asarray(labels)).mean())


def mb(path):
    return f"{os.path.getsize(path) / 1e6:.1f} MB"


class ImageSet:
    """Preprocessed images, their labels (or None), and where they came from."""

    def __init__(self, arrays, labels, source, skipped=0):
        self.arrays, self.labels, self.source, self.skipped = arrays, labels, source, skipped

    def describe(self):
        text = f"{len(self.arrays)} {self.source}"
        return text + (f" ({self.skipped} unreadable, left out)" if self.skipped else "")


def load_check_images(folder, ckpt, count):
    """The photos to check an export on, preprocessed as the checkpoint says."""
    classes = list(ckpt["classes"])
    wanted = CHECK_COUNT if count is None else count
    if folder is not None:
        if not os.path.isdir(folder):
            raise UserError(f"--check_images {folder}: no such folder; give a folder of photos")
        found = find_images(folder, classes, splits=("test", "valid", None))
        if not found[0]:
            raise UserError(f"--check_images {folder}: no image files found in it")
        return preprocess_images(*found[:2], ckpt["preprocess"], wanted, f"images of {folder}")
    root = (ckpt.get("data") or {}).get("root")
    if root and os.path.isdir(root):
        found = find_images(root, classes, splits=("test", "valid"), data=ckpt.get("data"))
        if found[0]:
            return preprocess_images(*found[:2], ckpt["preprocess"], wanted,
                                     f"{found[2]} images of {root}")
    if count is not None:
        raise UserError(f"--check_count {count}: the photos the checkpoint was trained on are "
                        f"not here, so the check runs on {GENERATED_CHECK_IMAGES} generated "
                        f"images; give --check_images DIR, or drop --check_count")
    return generated_images(ckpt["preprocess"], n=GENERATED_CHECK_IMAGES)


def load_calibration_images(ckpt, check, count=64):
    """Training photos for int8 calibration: kept apart from the photos the result is judged
    on. Where the training data is not here, the check photos stand in (and we say so)."""
    root = (ckpt.get("data") or {}).get("root")
    if root and os.path.isdir(root):
        found = find_images(root, list(ckpt["classes"]), splits=("train",), data=ckpt.get("data"))
        if found[0]:
            return preprocess_images(*found[:2], ckpt["preprocess"], count, f"train images of {root}")
    return ImageSet(check.arrays, None, "check images (the training data is not here)")


def find_images(root, classes, splits, data=None):
    """(paths, labels or None, split name) of the image files for the first split present:
    class folders named like the checkpoint's classes give labels; loose photos give none."""
    split_dirs = scanning.find_split_dirs(root)
    split_files = (data or {}).get("split_files") or {}
    for split in splits:
        if split in split_files:  # a split carved by train.py out of one folder
            rel = split_files[split]
            labels = [classes.index(r.split(os.sep)[0]) if r.split(os.sep)[0] in classes
                      else -1 for r in rel]
            return [os.path.join(root, r) for r in rel], labels, split
        folder = split_dirs.get(split) if split else root
        if folder is None:
            continue
        paths, labels = labelled_files(folder, classes)
        if paths:
            return paths, labels, split
    return [], None, None


def labelled_files(folder, classes):
    by_class = scanning.list_class_files(folder, Counter())
    if by_class and set(by_class) <= set(classes):
        paths = [p for c in sorted(by_class) for p in by_class[c]]
        labels = [classes.index(c) for c in sorted(by_class) for _ in by_class[c]]
        return paths, labels
    # Not this model's classes: every image file under the folder, without labels.
    paths = [os.path.join(d, n) for d, _, names in sorted(os.walk(folder)) for n in sorted(names)
             if n.lower().endswith(scanning.IMAGE_EXTENSIONS) and not n.startswith(".")]
    return paths, None


def preprocess_images(paths, labels, preprocess, count, source):
    """Decode and preprocess up to count of the files (0: all), spread evenly over the list."""
    picks = range(len(paths))
    if count and len(paths) > count:
        picks = np.linspace(0, len(paths) - 1, count).round().astype(int).tolist()
    arrays, kept_labels, skipped = [], [], 0
    for i in picks:
        try:
            arrays.append(decode.load_eval_array(paths[i], preprocess))
        except decode.IMAGE_ERRORS:
            skipped += 1
            continue
        kept_labels.append(labels[i] if labels is not None else None)
    labelled = labels is not None and all(label is not None and label >= 0
                                          for label in kept_labels)
    if not arrays:
        raise UserError(f"none of the {len(picks)} image files of {source} could be read")
    return ImageSet(arrays, kept_labels if labelled else None, source, skipped)


def generated_images(preprocess, n):
    """Stand-in photos where no real ones are at hand: smooth colour fields with shapes."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    arrays = []
    for _ in range(n):
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((256, 256), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        x0, y0 = rng.integers(0, 128, size=2)
        draw.ellipse([x0, y0, x0 + 100, y0 + 100], fill=tuple(rng.integers(0, 256, 3).tolist()))
        arrays.append(decode.eval_array(img, preprocess))
    return ImageSet(arrays, None, "generated images (no real photos found)")


if __name__ == "__main__":
    sys.exit(main())
