"""What every export format shares: the job (options, checkpoint, network, check photos and
PyTorch's answers on them), the parity checks, and writing the result atomically.

An export is checked before anything is written: the exported model predicts the check photos
(the test images of the data the checkpoint was trained on, or --check_images DIR; generated
images where neither is there) and is refused (CheckFailed, exit status 1) where it differs
from the checkpoint's float32 network by more than the format's tolerance.
"""
import io
import os
import shutil
from functools import cached_property

import numpy as np

from ..data import decode, scanning
from ..errors import UserError
from ..utils import atomic

CHECK_COUNT = 32            # photos checked where --check_count is not given
GENERATED_CHECK_IMAGES = 8  # where no photos are at hand
PARITY_ATOL = 1e-4          # the largest |probability difference| a float export may show
# int8: accuracy on the labelled check photos at most this many points below PyTorch's ...
INT8_MAX_DROP = 0.5
# ... or, without labels, the same top class as PyTorch on at least this share of the photos
INT8_MIN_AGREEMENT = 0.9


class CheckFailed(Exception):
    """The exported model does not compute what the checkpoint computes: a bug, not a user
    mistake, but reported in one line all the same (exit status 1), and the file is not
    written."""
    exit_status = 1

    def __init__(self, why):
        super().__init__(f"the export failed its check, nothing written: {why}")


class Job:
    """What a format's writer works on, each part loaded on first use (so that a writer says
    which package is missing before a checkpoint is read): the options, the checkpoint, its
    network in eval mode, the check photos and PyTorch's float32 probabilities on them."""

    def __init__(self, args):
        self.args = args

    @cached_property
    def ckpt(self):
        from .. import checkpoints
        return checkpoints.load_checkpoint(self.args.checkpoint)

    @cached_property
    def model(self):
        from .. import checkpoints
        return checkpoints.model_from_checkpoint(self.ckpt, self.args.checkpoint).eval()

    @cached_property
    def check(self):
        check = load_check_images(self.args.check_images, self.ckpt, self.args.check_count)
        print(f"checking on {check.describe()}")
        return check

    @cached_property
    def reference(self):
        """The checkpoint's network in float32 (no autocast), softmax applied."""
        import torch
        model = self.model
        with torch.inference_mode():
            return batched(lambda x: model(torch.from_numpy(x)).softmax(1).numpy(),
                           self.check.arrays)

    @cached_property
    def scorer(self):
        """The checkpoint's novelty scorer (heads/novelty.py), or None (saying why) where it has
        none or --no_verdict leaves it out."""
        from ..heads import novelty
        if getattr(self.args, "no_verdict", False):
            print("no novelty output: --no_verdict leaves the unknown verdict out")
            return None
        scorer = novelty.scorer_from_checkpoint(self.ckpt, self.args.checkpoint)
        if scorer is None:
            print("no novelty output: the checkpoint has no unknown-verdict data")
        return scorer

    @cached_property
    def calibration(self):
        return load_calibration_images(self.ckpt, self.check)

    def out_path(self, default_name):
        """--out, or default_name beside the checkpoint."""
        return self.args.out or os.path.join(
            os.path.dirname(os.path.abspath(self.args.checkpoint)), default_name)

    def image_size(self):
        return self.ckpt["preprocess"]["size"]


def write_file_atomic(src, dest):
    """Copy src over dest through a temporary file in dest's folder, then rename."""
    try:
        out = atomic.AtomicFile(dest)
    except OSError as err:
        raise UserError(f"--out {dest}: cannot write there ({err.strerror})") from None
    with out as f, open(src, "rb") as s:
        shutil.copyfileobj(s, f)


def write_folder_atomic(src, dest):
    """Copy the folder src to dest (a model package such as .mlpackage): copied beside dest
    under a temporary name, then renamed into place; an older dest is replaced only then."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise UserError(f"--out {dest}: is a file; give a folder name (the model is a folder)")
    temp = os.path.join(parent, f".{os.path.basename(dest)}.tmp-{os.getpid()}")
    try:
        shutil.copytree(src, temp)
    except OSError as err:
        shutil.rmtree(temp, ignore_errors=True)
        raise UserError(f"--out {dest}: cannot write there ({err.strerror})") from None
    old = None
    if os.path.exists(dest):  # rename the old one aside first: a folder cannot be renamed over
        old = f"{temp}.old"
        os.rename(dest, old)
    os.rename(temp, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def batched(fn, arrays, batch_size=16):
    return np.concatenate([fn(np.stack(arrays[i:i + batch_size]))
                           for i in range(0, len(arrays), batch_size)])


def check_parity(probs, reference, runtime="ONNX Runtime", atol=PARITY_ATOL, than="PyTorch"):
    """Refuse (CheckFailed) an export whose probabilities differ from PyTorch's float32 ones
    (or than's) by more than atol on any check photo, or that names another top class on any."""
    diff = float(np.abs(probs - reference).max())
    if diff > atol:
        raise CheckFailed(f"{runtime}'s probabilities differ from {than}'s by up to "
                          f"{diff:.2e} (allowed {atol:.0e})")
    differ = int((probs.argmax(1) != reference.argmax(1)).sum())
    if differ:
        raise CheckFailed(f"{runtime} names another top class than {than} on {differ} "
                          f"image(s)")


def check_novelty_values(values, reference, threshold, label, who, atol):
    """An export's novelty values against PyTorch's float32 reference (the unknown verdict's
    score): prints label with the largest difference and how many verdicts agree at
    threshold; CheckFailed beyond atol, naming who. Returns the largest difference."""
    values, reference = np.asarray(values).reshape(-1), np.asarray(reference).reshape(-1)
    diff = float(np.abs(values - reference).max())
    same = int(((values > threshold) == (reference > threshold)).sum())
    print(f"{label}: max |difference| {diff:.2e}, same verdict on {same}/{len(values)}")
    if diff > atol:
        raise CheckFailed(f"{who} novelty differs from PyTorch's by up to {diff:.2e} "
                          f"(allowed {atol:.0e})")
    return diff


def check_int8(probs, reference, check, runtime):
    """An int8 model moves probabilities by design: it must keep the accuracy of PyTorch's
    float32 network on the labelled check photos within INT8_MAX_DROP points, or, where the
    photos have no labels, name PyTorch's top class on at least INT8_MIN_AGREEMENT of them."""
    if check.labels is not None:
        drop = accuracy(reference, check.labels) - accuracy(probs, check.labels)
        if drop > INT8_MAX_DROP:
            raise CheckFailed(f"{runtime} (int8) is {drop:.2f} points less accurate than "
                              f"PyTorch on {check.describe()} (allowed {INT8_MAX_DROP})")
        return
    agree = float((probs.argmax(1) == reference.argmax(1)).mean())
    if agree < INT8_MIN_AGREEMENT:
        raise CheckFailed(f"{runtime} (int8) names PyTorch's top class on only {agree:.0%} of "
                          f"{check.describe()} (required {INT8_MIN_AGREEMENT:.0%})")


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
    """The size of a file, or of every file in a folder (a model package), in MB."""
    size = (sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path)
                for n in names) if os.path.isdir(path) else os.path.getsize(path))
    return f"{size / 1e6:.1f} MB"


class ImageSet:
    """Preprocessed images, their labels (or None), and where they came from: their paths, or
    for generated images their PNG files as [(name, bytes)] (the web page's check reads them)."""

    def __init__(self, arrays, labels, source, skipped=0, paths=None, files=None):
        self.arrays, self.labels, self.source, self.skipped = arrays, labels, source, skipped
        self.paths, self.files = paths, files

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
            return preprocess_images(*found[:2], ckpt["preprocess"], count,
                                     f"train images of {root}")
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
    paths, labels, unknown = scanning.labelled_files(folder, classes)
    if paths and not unknown:
        return paths, labels
    # Not this model's classes: every image file under the folder, without labels.
    return [p for p in scanning.walk_files(folder)
            if p.lower().endswith(scanning.IMAGE_EXTENSIONS)], None


def preprocess_images(paths, labels, preprocess, count, source):
    """Decode and preprocess up to count of the files (0: all), spread evenly over the list."""
    picks = range(len(paths))
    if count and len(paths) > count:
        picks = np.linspace(0, len(paths) - 1, count).round().astype(int).tolist()
    arrays, kept_labels, kept_paths, skipped = [], [], [], 0
    for i in picks:
        try:
            arrays.append(decode.load_eval_array(paths[i], preprocess))
        except decode.IMAGE_ERRORS:
            skipped += 1
            continue
        kept_labels.append(labels[i] if labels is not None else None)
        kept_paths.append(paths[i])
    labelled = labels is not None and all(label is not None and label >= 0
                                          for label in kept_labels)
    if not arrays:
        raise UserError(f"none of the {len(picks)} image files of {source} could be read")
    return ImageSet(arrays, kept_labels if labelled else None, source, skipped, kept_paths)


def generated_images(preprocess, n):
    """Stand-in photos where no real ones are at hand: smooth colour fields with shapes."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(0)
    arrays, files = [], []
    for i in range(n):
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((256, 256), Image.BICUBIC)
        draw = ImageDraw.Draw(img)
        x0, y0 = rng.integers(0, 128, size=2)
        draw.ellipse([x0, y0, x0 + 100, y0 + 100], fill=tuple(rng.integers(0, 256, 3).tolist()))
        arrays.append(decode.eval_array(img, preprocess))
        png = io.BytesIO()
        img.save(png, format="PNG")
        files.append((f"generated-{i}.png", png.getvalue()))
    return ImageSet(arrays, None, "generated images (no real photos found)", files=files)
