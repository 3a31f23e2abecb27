"""Data: reading any image as RGB, preprocessing, and the checked scan of an image folder.

One function, load_rgb, turns a file into an RGB picture for training and for prediction alike,
decoded at the smallest scale the network's preprocessing needs (a 12-megapixel JPEG at 1/4 or
1/8 of its size). The scan decodes every image once before training, so a bad file is reported up
front instead of crashing an epoch. torchvision is imported only where training needs it.
"""
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import stat
import struct
import sys
import time
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

import atomic
from errors import UserError  # noqa: F401 (data_utils.UserError, as before)

log = logging.getLogger(__name__)

SPLIT_ALIASES = {
    "train": ("train",),
    "valid": ("valid", "val", "validation", "validate"),
    "test": ("test",),
}
LITTER_NAMES = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                    ".ppm", ".pgm", ".pbm", ".jfif", ".pjpeg", ".heic", ".heif", ".avif")
# iPhones save HEIC by default; Pillow reads AVIF by itself, HEIC/HEIF through this plugin.
pillow_heif.register_heif_opener()
# Pixels above which an image is refused before decoding: a decompression bomb guard.
# 64 megapixels is beyond any camera photo a classifier needs, and far below what exhausts memory.
MAX_PIXELS = 64_000_000
SCAN_CACHE_VERSION = 4  # 3: HEIC and AVIF are images; 4: perceptual hashes
# The scan decodes a JPEG at no less than this shorter side, so that a perceptual hash sees
# the picture of a small photo (a 32 px digit at 1/8 scale would be 4 px).
HASH_SIDE = 32
# A 32x32 grey picture that spans fewer grey levels than this is flat: it gets no hash.
FLAT_RANGE = 8
# Two photos whose perceptual hashes differ in at most this many of 64 bits are near-duplicates.
# Chosen on flowers5 with 40 planted copies (85% size, JPEG quality 80): the smallest that
# names 95% of them; checked on handwritten digits (docs/data_issues.md).
NEAR_DUPLICATE_BITS = 4


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
class TooManyPixels(ValueError):
    """An image whose header claims more pixels than MAX_PIXELS: refused before decoding."""


def open_image(source):
    """Open an image (path, bytes or file object) and check its size before any pixel is read."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow's own guard fired while reading the header; say it in our words.
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise TooManyPixels(f"{int(found[1]):,} pixels" if found else "too many pixels") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise TooManyPixels(f"{w}x{h} pixels")
    return img


def to_rgb(img):
    """The one conversion to RGB used everywhere: EXIF orientation applied, first frame of an
    animation, transparency composited on white, 16-bit scaled down rather than clipped."""
    img.seek(0)
    img.load()
    img = _apply_orientation(img)
    if img.mode.startswith("I") or img.mode == "F":
        img = _wide_gray_to_l(img)
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        img = img.convert("RGBA")  # a transparent colour or palette entry, as in GIF and PNG
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


ORIENTATION_TAG = 0x0112


def _apply_orientation(img):
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return img  # a damaged EXIF block should not cost the picture, only its rotation


def _wide_gray_to_l(img):
    """16-bit (and 32-bit) grey to 8-bit by the format's full range, so nothing is clipped."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "F" and arr.size and arr.max() <= 1.0:
        top = 1.0
    else:  # "I" or "F" carry no bit depth: take the smallest common range that holds the data
        peak = float(arr.max()) if arr.size else 0.0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    out = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # 2-D uint8: mode "L"


def load_rgb(source, min_side=None):
    """Decode an image file into an RGB PIL image (raises OSError/ValueError if broken).

    With min_side, the shorter side the caller needs, a larger image comes back smaller but
    never below it: a JPEG is decoded at 1/2, 1/4 or 1/8 scale inside the decoder (DCT scaling:
    a 12-megapixel photo in a fraction of the time of a full decode, the whole file still read
    and checked), other formats are decoded in full and then reduced by a whole factor."""
    img = open_image(source)
    try:
        if min_side:
            _draft_jpeg(img, min_side)
        rgb = to_rgb(img)
    finally:
        img.close()
    return _reduce(rgb, min_side) if min_side else rgb


def _draft_jpeg(img, min_side):
    # Orientation is applied after decoding, but the requirement is on the shorter side, which
    # a rotation does not change.
    if img.format in ("JPEG", "MPO"):
        w, h = img.size
        scale = min(w, h) / min_side
        img.draft(img.mode, (max(1, math.ceil(w / scale)), max(1, math.ceil(h / scale))))


def _reduce(img, min_side):
    factor = min(img.size) // min_side
    return img.reduce(factor) if factor >= 2 else img


def eval_side(preprocess):
    """The shorter side eval_array resizes a photo to."""
    return int(round(preprocess["size"] / preprocess["crop_pct"]))


# RandomResizedCrop takes from a quarter of the photo's area, at aspect ratios 3:4 to 4:3.
AUG_MIN_AREA = 0.25
AUG_RATIOS = (3 / 4, 4 / 3)


def augment_side(preprocess):
    """The shorter side a photo needs so that train_augment's smallest crop (a quarter of the
    area at aspect 3:4: sqrt(0.25 * 3/4) = 0.43 of the shorter side) still holds `size` pixels
    across, as it does from a full-size decode."""
    smallest = math.sqrt(AUG_MIN_AREA * AUG_RATIOS[0])
    return max(eval_side(preprocess), math.ceil(preprocess["size"] / smallest))


def load_eval_array(source, preprocess):
    """A photo as the network sees it at evaluation and prediction: decoded at the scale the
    resize needs, then eval_array."""
    return eval_array(load_rgb(source, eval_side(preprocess)), preprocess)


def describe_image_error(err):
    """A short reason for a file that failed to decode, for reports."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image (unknown format)"
    if isinstance(err, TooManyPixels):
        return (f"refused, not decoded: {err} is over the {MAX_PIXELS // 1_000_000}-megapixel "
                f"limit (possible decompression bomb)")
    if isinstance(err, PermissionError):
        return "unreadable (permission denied)"
    if isinstance(err, FileNotFoundError):
        return "unreadable (missing file or broken link)"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "truncated" in text.lower() or isinstance(err, EOFError):
        return "truncated (the file ends before the image does)"
    return "corrupt (" + text[:160] + ")"


# Errors that mean "this file is not a usable image" (never a bug of ours).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                Image.DecompressionBombWarning, UnidentifiedImageError)


RESIZE_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def resize_and_crop(img, size, crop_pct, upscale):
    """Resize the shorter side to size / crop_pct, then crop the centre size x size. Shrinking
    is bicubic; enlarging uses the `upscale` filter."""
    short = int(round(size / crop_pct))
    w, h = img.size
    scale = short / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), RESIZE_FILTERS[upscale if scale > 1 else "bicubic"])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_normalized_array(img, mean, std):
    """RGB PIL image -> float32 CHW array, normalised."""
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def upscale_filter(preprocess):
    # Checkpoints from before "upscale" was stored were trained with bicubic throughout.
    return preprocess.get("upscale", "bicubic")


def eval_array(img, preprocess):
    """The evaluation preprocessing shared by training (valid/test) and prediction."""
    img = resize_and_crop(img, preprocess["size"], preprocess["crop_pct"],
                          upscale_filter(preprocess))
    return to_normalized_array(img, preprocess["mean"], preprocess["std"])


def train_augment(preprocess):
    """Random crop, flip and a little colour change, as a function PIL image -> CHW array."""
    import torchvision.transforms.v2 as T
    size = preprocess["size"]
    ops = T.Compose([
        T.RandomResizedCrop(size, scale=(AUG_MIN_AREA, 1.0), ratio=AUG_RATIOS,
                            interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2),
    ])

    def augment(img):
        return to_normalized_array(ops(img), preprocess["mean"], preprocess["std"])
    return augment


# ---------------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------------
CLEAR_LINE_END = "\033[K"  # a shorter redraw leaves no characters of the longer one


class Progress:
    """A one-line progress bar on stderr; on a non-terminal only the final line is written."""

    def __init__(self, total, desc, stream=None):
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.start = self.last = time.monotonic()

    def update(self, n=1):
        self.done += n
        now = time.monotonic()
        if self.live and (now - self.last > 0.1 or self.done >= self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now, suffix="", end=""):
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(frac * 24)
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-9)
        left = f" {clock(max(0, self.total - self.done) / rate)} left" if 0 < frac < 1 else ""
        self.stream.write(f"\r{self.desc} [{bar:<24}] {self.done}/{self.total} "
                          f"{clock(elapsed)} {rate:6.1f}/s{left}{suffix}{CLEAR_LINE_END * self.live}{end}")
        self.stream.flush()

    def close(self, suffix=""):
        self._draw(time.monotonic(), suffix, end="\n")


def clock(seconds):
    """5.2s, 3:07 or 1:02:09: short for a progress bar, exact enough to plan a coffee."""
    if seconds < 60:
        return f"{seconds:4.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# ---------------------------------------------------------------------------------------------
# The scan
# ---------------------------------------------------------------------------------------------
@dataclass
class FileCheck:
    size: int
    mtime_ns: int
    ok: bool
    litter: bool = False
    reason: str = ""
    width: int = 0
    height: int = 0
    digest: str = ""
    phash: str = ""                  # perceptual_hash: "" for a flat picture
    retry: bool = False              # could not be read (permissions, a broken link): not cached


@dataclass
class Scan:
    """What the scan found: the usable samples per split and everything left out."""
    root: str
    layout: str                      # "splits", "single" or "train-only"
    classes: list
    samples: dict                    # split -> [(path, class index)]
    skipped: list = field(default_factory=list)     # [(path, reason)]
    litter: Counter = field(default_factory=Counter)  # kind -> count
    not_images: list = field(default_factory=list)  # [(path, reason)] of class-folder litter
    notes: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    sizes: list = field(default_factory=list)       # [(w, h)] of usable images
    digests: dict = field(default_factory=dict)     # path -> content digest
    phashes: dict = field(default_factory=dict)     # path -> perceptual hash ("" if flat)
    split_files: dict = None         # split -> [relative path], recorded for auto splits
    fingerprint: str = ""
    folders: dict = field(default_factory=dict)     # split -> the folder it came from
    excluded: list = field(default_factory=list)    # relative paths --exclude left out

    @property
    def class_to_idx(self):
        return {c: i for i, c in enumerate(self.classes)}

    def counts(self, split):
        return Counter(label for _, label in self.samples.get(split, []))


def is_litter_name(name):
    lower = name.lower()
    return name.startswith(".") or lower in LITTER_NAMES or name.startswith("~$")


def decode_for_check(data):
    """Decode an image as training will, and return its size as displayed (EXIF orientation
    applied) and its perceptual_hash. A JPEG is decoded at 1/8 scale (never below HASH_SIDE
    px, so that the hash of a small photo sees its picture): the decoder still reads every
    byte of the compressed stream, so a truncated or corrupt file fails as in a full decode,
    6x faster."""
    img = open_image(data)
    try:
        w, h = img.size  # before draft() shrinks it
        _draft_jpeg(img, HASH_SIDE)
        phash = perceptual_hash(to_rgb(img))
        return ((h, w) if quarter_turned(img) else (w, h)), phash
    finally:
        img.close()


def perceptual_hash(img):
    """A 64-bit perceptual hash (pHash) as 16 hex digits: the picture in grey, averaged down to
    32x32, its 8x8 lowest spatial frequencies (a discrete cosine transform), one bit per
    frequency (is it above their median). A resized or recompressed copy keeps nearly every
    bit; "" for a nearly flat picture, whose bits are noise (all flat photos would otherwise
    pair up)."""
    grey = np.asarray(img.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32)
    if grey.max() - grey.min() < FLAT_RANGE:
        return ""
    low = _DCT_8x32 @ grey @ _DCT_8x32.T
    bits = (low > np.median(low)).ravel()
    return f"{int(np.packbits(bits).view('>u8')[0]):016x}"


# The first 8 rows of the 32-point DCT-II matrix (unscaled: only signs against the median
# matter).
_DCT_8x32 = np.cos(np.pi * np.arange(8)[:, None] * (2 * np.arange(32) + 1) / 64,
                   dtype=np.float32)


def quarter_turned(img):
    """Whether a decoded image's EXIF orientation turns it by a quarter turn (width and height
    swap places when it is displayed)."""
    try:
        return img.getexif().get(ORIENTATION_TAG) in (5, 6, 7, 8)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return False  # as _apply_orientation: a damaged EXIF block leaves the image as stored


def check_file(path):
    """Decode one file; the result says whether it is a usable image, litter, or broken."""
    try:
        st = os.stat(path)
    except OSError as err:
        return FileCheck(0, 0, False, reason=describe_image_error(err), retry=True)
    check = FileCheck(st.st_size, st.st_mtime_ns, False)
    if not stat.S_ISREG(st.st_mode):
        check.reason, check.retry = "not a regular file (a pipe, socket or device)", True
        return check
    if st.st_size == 0:
        check.reason = "empty file (0 bytes)"
        return check
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        check.reason, check.retry = describe_image_error(err), True
        return check
    try:
        size = decode_for_check(data)
    except UnidentifiedImageError:
        # A file that is not an image by its content: litter, unless its name says "image".
        check.litter = not path.lower().endswith(IMAGE_EXTENSIONS)
        check.reason = "not an image (content is not a known image format)"
        return check
    except IMAGE_ERRORS as err:
        check.reason = describe_image_error(err)
        return check
    check.ok, ((check.width, check.height), check.phash) = True, size
    check.digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    return check


def find_split_dirs(root):
    """Map split name -> folder for the split folders present under root."""
    entries = {e.name.lower(): e.path for e in os.scandir(root) if e.is_dir()}
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in entries:
                found[split] = entries[alias]
                break
    return found


def list_class_files(split_dir, litter):
    """class name -> sorted file paths under its folder (recursive), litter names left out."""
    classes = {}
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if is_litter_name(entry.name):
            litter["hidden or system"] += 1
            continue
        if entry.is_dir():
            classes[entry.name] = _walk_files(entry.path, litter)
        else:
            litter["outside the class folders"] += 1
    return classes


def _walk_files(folder, litter):
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        hidden = [d for d in dirnames if is_litter_name(d)]
        if hidden:
            litter["hidden or system"] += len(hidden)
        dirnames[:] = sorted(d for d in dirnames if not is_litter_name(d))
        for name in sorted(filenames):
            if is_litter_name(name):
                litter["hidden or system"] += 1
            else:
                files.append(os.path.join(dirpath, name))
    return files


def check_files(paths, cache, workers):
    """Check every file, reusing cached results for files whose size and mtime are unchanged."""
    results, todo = {}, []
    for path in paths:
        hit = cache.get(path)
        try:
            st = os.stat(path)
        except OSError:
            todo.append(path)
            continue
        if hit is not None and hit.size == st.st_size and hit.mtime_ns == st.st_mtime_ns:
            results[path] = hit
        else:
            todo.append(path)
    if todo:
        progress = Progress(len(todo), "checking images")
        results.update(zip(todo, _map_checks(todo, workers, progress)))
        kinds = Counter("usable" if c.ok else "not images" if c.litter else "unusable"
                        for c in (results[p] for p in todo))
        progress.close("  " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    return results


def _map_checks(paths, workers, progress):
    """[check_file(path) for path in paths], in worker processes when there are many."""
    checks = []
    if workers <= 1 or len(paths) < 64:
        for path in paths:
            checks.append(check_file(path))
            progress.update()
        return checks
    import multiprocessing as mp
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(workers)
    try:
        for check in pool.imap(check_file, paths, chunksize=16):
            checks.append(check)
            progress.update()
    except BaseException:  # an error or a stop signal: end the workers now
        pool.terminate()
        raise
    # Not terminate() (what `with Pool()` calls): it can hang forever when the workers are idle
    # (CPython issue 78178). After close() the workers exit of themselves.
    pool.close()
    pool.join()
    return checks


def _scan_cache_path(cache_dir, root):
    key = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"scan-{key}.json")


def load_scan_cache(cache_dir, root):
    """path -> FileCheck from the last scan of root (paths stored relative to root)."""
    if not cache_dir:
        return {}
    try:
        with open(_scan_cache_path(cache_dir, root)) as f:
            data = json.load(f)
        if data.get("version") != SCAN_CACHE_VERSION:
            return {}
        return {os.path.join(root, rel): FileCheck(**fields)
                for rel, fields in data["files"].items()}
    except (OSError, ValueError, TypeError, KeyError):
        return {}  # a missing or damaged cache only costs a fresh scan


def save_scan_cache(cache_dir, root, checks):
    if not cache_dir:
        return
    path = _scan_cache_path(cache_dir, root)
    # Files that could not be read are left out, so a fixed permission is seen next time.
    data = {"version": SCAN_CACHE_VERSION,
            "files": {os.path.relpath(p, root): c.__dict__ for p, c in checks.items()
                      if not c.retry}}
    try:
        write_text_atomic(path, json.dumps(data))
    except OSError as err:
        log.warning("could not save the scan cache %s: %s", path, err)


def write_text_atomic(path, text):
    with atomic.AtomicFile(path, "w") as f:
        f.write(text)


def scan_dataset(root, split=(0.7, 0.1, 0.2), seed=0, cache_dir=None, workers=None):
    """Find the layout, check every image once, and return the usable samples per split."""
    if not os.path.isdir(root):
        raise UserError(f"data folder {root}: no such folder; give a folder with train/ and "
                        f"valid/ class folders, or one folder of class folders")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    litter = Counter()
    split_dirs = find_split_dirs(root)
    if "train" in split_dirs:
        files = {s: list_class_files(d, litter) for s, d in split_dirs.items()}
        layout = "splits" if "valid" in split_dirs else "train-only"
    elif split_dirs:
        names = ", ".join(os.path.basename(d) for d in split_dirs.values())
        raise UserError(f"data folder {root}: has {names} but no train/ folder; add train/ "
                        f"(one folder per class) or put the class folders directly in {root}")
    else:
        files = {"all": list_class_files(root, litter)}
        layout = "single"
    folders = split_dirs if "train" in split_dirs else {"all": root}
    _check_classes_exist(files, folders)
    all_paths = [p for by_class in files.values() for paths in by_class.values() for p in paths]
    cache = load_scan_cache(cache_dir, root)
    checks = check_files(all_paths, cache, workers)
    save_scan_cache(cache_dir, root, checks)
    scan = _assemble(root, layout, files, checks, litter, split, seed, folders)
    scan.fingerprint = _fingerprint(scan, checks)
    return scan


def _check_classes_exist(files, folders):
    for split, by_class in files.items():
        where = folders[split]
        if not by_class:
            raise UserError(f"{where}: no class folders found; put each class's images in a "
                            f"folder of its own, e.g. {os.path.join(where, 'daisy', '001.jpg')}")


def _usable(paths, checks, scan):
    good = []
    for p in paths:
        c = checks[p]
        if c.ok:
            good.append(p)
            scan.sizes.append((c.width, c.height))
            scan.digests[p] = c.digest
            scan.phashes[p] = c.phash
        elif c.litter:
            scan.litter["not an image by content"] += 1
            scan.not_images.append((p, c.reason))
        else:
            scan.skipped.append((p, c.reason))
    return good


def _assemble(root, layout, files, checks, litter, split, seed, folders):
    source = files.get("train", files.get("all"))
    classes = sorted(source)
    scan = Scan(root=root, layout=layout, classes=classes, samples={}, litter=litter,
                folders=dict(folders))
    usable = {s: {c: _usable(paths, checks, scan) for c, paths in by_class.items()}
              for s, by_class in files.items()}
    _check_no_empty_classes(usable, scan)
    if layout == "single":
        parts = stratified_split(usable["all"], classes, split, seed)
        scan.notes.append(f"no train/ and valid/ folders: split each class {_ratio(split)} into "
                          f"train/valid/test (--split, --seed {seed}); the file lists go into "
                          f"the checkpoint")
    elif layout == "train-only":
        carve = (split[0], split[1], split[2] if "test" not in usable else 0.0)
        parts = stratified_split(usable["train"], classes, carve, seed)
        if "test" in usable:
            parts["test"] = usable["test"]
            scan.notes.append(f"no valid/ folder: carved valid out of train/, "
                              f"{_ratio(carve[:2])} per class (--split, --seed {seed})")
        else:
            scan.notes.append(f"no valid/ folder: carved valid and test out of train/, "
                              f"{_ratio(carve)} per class (--split, --seed {seed})")
    else:
        parts = usable
    _check_split_classes(parts, classes, scan)
    idx = {c: i for i, c in enumerate(classes)}
    for s in ("train", "valid", "test"):
        if s in parts:
            scan.samples[s] = [(p, idx[c]) for c in classes for p in parts[s].get(c, [])]
    if layout != "splits":
        scan.split_files = {s: [os.path.relpath(p, root) for p, _ in v]
                            for s, v in scan.samples.items()}
    if not scan.samples.get("test"):
        scan.samples.pop("test", None)
    return scan


def _ratio(split):
    """Fractions as whole percentages that add up to 100, e.g. 70/10/20 or 88/12."""
    exact = [x * 100 / sum(split) for x in split]
    whole = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: whole[i] - exact[i])
    for i in by_remainder[:100 - sum(whole)]:  # largest remainders round up
        whole[i] += 1
    return "/".join(map(str, whole))


def _check_no_empty_classes(usable, scan):
    root = scan.root
    train = usable.get("train", usable.get("all"))
    empty = [c for c in sorted(train) if not train[c]]
    if empty:
        where = scan.folders.get("train", root)
        raise UserError(f"{where}: class folder(s) with no usable image: {', '.join(empty[:10])}"
                        f"{' ...' if len(empty) > 10 else ''}; add images or remove the folder")
    if len(train) < 2:
        raise UserError(f"{root}: found only one class ({next(iter(train))}); a classifier "
                        f"needs at least two class folders")


def _check_split_classes(parts, classes, scan):
    known = set(classes)
    for split in ("valid", "test"):
        if split not in parts:
            continue
        where = scan.folders.get(split, split)
        unknown = sorted(set(parts[split]) - known)
        if unknown:
            train = os.path.basename(scan.folders["train"])
            raise UserError(f"{where}: class folder(s) not in {train}/: "
                            f"{', '.join(unknown[:10])}; rename them to match the training "
                            f"classes or remove them")
        if not any(parts[split].values()):
            raise UserError(f"{where}: no usable images; add images or remove the folder")
        missing = sorted(c for c in classes if not parts[split].get(c))
        if missing:
            scan.warnings.append(f"{split} has no images of {_plural(len(missing), 'class')}: "
                                 f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
                                 f"; {split} accuracy will cover the other classes only")


def stratified_split(by_class, classes, split, seed):
    """Split each class's files by the given fractions, reproducibly for a seed."""
    fracs = [max(0.0, float(x)) for x in split]
    total = sum(fracs)
    fracs = [x / total for x in fracs]
    parts = {"train": {}, "valid": {}, "test": {}}
    for c in classes:
        paths = sorted(by_class.get(c, []))
        random.Random(f"{seed}-{c}").shuffle(paths)
        n = len(paths)
        n_valid = round(n * fracs[1]) if fracs[1] else 0
        n_test = round(n * fracs[2]) if fracs[2] else 0
        if n >= 3:  # every class gets at least one image in each requested split
            n_valid = max(n_valid, 1) if fracs[1] else 0
            n_test = max(n_test, 1) if fracs[2] else 0
        n_train = max(1, n - n_valid - n_test)
        n_valid = min(n_valid, n - n_train)
        parts["train"][c] = paths[:n_train]
        parts["valid"][c] = paths[n_train:n_train + n_valid]
        parts["test"][c] = paths[n_train + n_valid:]
    if not fracs[2]:
        parts.pop("test")
    return parts


def _fingerprint(scan, checks):
    h = hashlib.sha1()
    for split in sorted(scan.samples):
        for path, label in scan.samples[split]:
            c = checks[path]
            # Relative paths: the same folder typed another way reuses the same features.
            rel = os.path.relpath(path, scan.root)
            h.update(f"{split}|{rel}|{label}|{c.size}|{c.mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The data report
# ---------------------------------------------------------------------------------------------
def find_leaks(scan):
    """Groups of identical files that sit in more than one split."""
    by_digest = defaultdict(list)
    for split, samples in scan.samples.items():
        for path, _ in samples:
            by_digest[scan.digests[path]].append((split, path))
    return [group for group in by_digest.values() if len({s for s, _ in group}) > 1]


def find_near_duplicates(scan, max_bits=NEAR_DUPLICATE_BITS):
    """[(earlier path, later path, differing bits)], fewest bits first: each valid and test
    photo with its nearest photo of an earlier split (train; for test also valid) by
    perceptual hash, where at most max_bits bits differ. Byte-identical files are left out
    (find_leaks names them), and flat pictures, which have no hash."""
    pairs, earlier = [], []
    for split in ("train", "valid", "test"):
        hashed = [p for p, _ in scan.samples.get(split, []) if scan.phashes.get(p)]
        if earlier:
            references = [int(scan.phashes[p], 16) for p in earlier]
            queries = [int(scan.phashes[p], 16) for p in hashed]
            for path, h, close in zip(hashed, queries, close_hashes(queries, references,
                                                                    max_bits)):
                close = [j for j in close if scan.digests[earlier[j]] != scan.digests[path]]
                if close:
                    j = min(close, key=lambda j: ((h ^ references[j]).bit_count(), j))
                    pairs.append((earlier[j], path, (h ^ references[j]).bit_count()))
        earlier += hashed
    return sorted(pairs, key=lambda pair: pair[2])


def close_hashes(queries, references, max_bits):
    """For each query (a 64-bit int), the indices of the references at most max_bits bits
    away, ascending. Multi-index hashing, so that no query meets every reference: split the
    bits into max_bits + 1 bands; two hashes that close agree on at least one whole band, so
    only references sharing a band's value with the query are compared."""
    edges = [64 * k // (max_bits + 1) for k in range(max_bits + 2)]
    spans = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
    buckets = defaultdict(list)
    for j, h in enumerate(references):
        for band, (lo, mask) in enumerate(spans):
            buckets[band, (h >> lo) & mask].append(j)
    found = []
    for h in queries:
        candidates = {j for band, (lo, mask) in enumerate(spans)
                      for j in buckets.get((band, (h >> lo) & mask), ())}
        found.append(sorted(j for j in candidates
                            if (h ^ references[j]).bit_count() <= max_bits))
    return found


def imbalance(scan):
    counts = scan.counts("train")
    sizes = [counts.get(i, 0) for i in range(len(scan.classes))]
    return max(sizes) / max(min(sizes), 1)


def summary_lines(scan, max_listed=10):
    """The short report that starts every training run."""
    splits = ", ".join(f"{s} {len(v)}" for s, v in scan.samples.items())
    lines = [f"data: {scan.root}: {len(scan.classes)} classes; {splits} images"]
    lines += [f"note: {n}" for n in scan.notes]
    left_out = []
    if scan.skipped:
        left_out.append(_plural(len(scan.skipped), "unusable image"))
    if scan.litter:
        left_out.append(_plural(sum(scan.litter.values()), "file") + " that are not images")
    if left_out:
        lines.append("left out: " + " and ".join(left_out) + " (--check lists them)")
        for path, reason in scan.skipped[:max_listed]:
            lines.append(f"  skipped {_rel(scan, path)}: {reason}")
        if len(scan.skipped) > max_listed:
            lines.append(f"  ... and {len(scan.skipped) - max_listed} more")
    ratio = imbalance(scan)
    if ratio > 3:
        lines.append(f"warning: classes are imbalanced: the largest has {ratio:.1f}x the images "
                     f"of the smallest; consider --balance")
    leaks = find_leaks(scan)
    if leaks:
        lines.append(f"warning: {_plural(len(leaks), 'file')} found in more than one split "
                     f"(identical content); --check lists them")
    near = find_near_duplicates(scan)
    if near:
        lines.append(f"warning: near-duplicates across splits (perceptual hash): {len(near)}; "
                     f"--check lists them")
    lines += [f"warning: {w}" for w in scan.warnings]
    return lines


def report_lines(scan, class_names=None):
    """The full data report of --check."""
    lines = [f"data: {scan.root}", f"layout: {_layout(scan)}"]
    lines += [f"note: {n}" for n in scan.notes]
    lines += [""] + _count_table(scan, class_names) + [""]
    lines += _balance_lines(scan, class_names)
    lines += _size_lines(scan)
    lines += _left_out_lines(scan)
    lines += _leak_lines(scan, class_names)
    lines += _near_duplicate_lines(scan)
    lines += [f"warning: {w}" for w in scan.warnings]
    return lines


def _layout(scan):
    if scan.layout == "single":
        return "one folder of class folders (no train/ valid/ folders)"
    named = [f"{os.path.basename(scan.folders[s])}/" +
             ("" if os.path.basename(scan.folders[s]) == s else f" (as {s})")
             for s in ("train", "valid", "test") if s in scan.folders]
    return "split folders " + ", ".join(named)


def _count_table(scan, class_names):
    splits = list(scan.samples)
    labels = [_display(c, class_names) for c in scan.classes]
    width = max([len(x) for x in labels] + [len("total")])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in splits)]
    counts = {s: scan.counts(s) for s in splits}
    for i, label in enumerate(labels):
        lines.append(f"{label:<{width}}  " + "  ".join(f"{counts[s].get(i, 0):>6}" for s in splits))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{len(scan.samples[s]):>6}" for s in splits))
    return lines


def _balance_lines(scan, class_names):
    counts = scan.counts("train")
    small = min(range(len(scan.classes)), key=lambda i: counts.get(i, 0))
    large = max(range(len(scan.classes)), key=lambda i: counts.get(i, 0))
    line = (f"class balance (train): largest {_display(scan.classes[large], class_names)} "
            f"{counts.get(large, 0)}, smallest {_display(scan.classes[small], class_names)} "
            f"{counts.get(small, 0)} ({imbalance(scan):.1f}x)")
    if imbalance(scan) > 3:
        line += "; consider --balance"
    return [line]


def _size_lines(scan):
    if not scan.sizes:
        return []
    ws = [w for w, _ in scan.sizes]
    hs = [h for _, h in scan.sizes]
    if min(ws) == max(ws) and min(hs) == max(hs):
        return [f"image sizes: all {ws[0]}x{hs[0]} px"]
    return [f"image sizes: width {min(ws)}-{max(ws)} px, height {min(hs)}-{max(hs)} px, "
            f"median {int(np.median(ws))}x{int(np.median(hs))}"]


def _left_out_lines(scan):
    lines = []
    if scan.litter:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(scan.litter.items()))
        lines.append(f"ignored, not images: {_plural(sum(scan.litter.values()), 'file')} "
                     f"({kinds})")
        lines += [f"  {_rel(scan, path)}: {reason}" for path, reason in scan.not_images]
    lines.append(f"skipped, unusable images: {len(scan.skipped)}")
    lines += [f"  {_rel(scan, path)}: {reason}" for path, reason in scan.skipped]
    return lines


def _leak_lines(scan, class_names):
    leaks = find_leaks(scan)
    lines = [f"identical files in more than one split (leakage): {len(leaks)}" +
             ("; keep one copy of each, or valid and test scores are too optimistic"
              if leaks else "")]
    labels = {path: label for samples in scan.samples.values() for path, label in samples}
    for group in leaks[:20]:
        names = {_display(scan.classes[labels[p]], class_names) for _, p in group}
        lines.append("  " + " = ".join(_rel(scan, p, s) for s, p in group) +
                     (f"  (labelled {' and '.join(sorted(names))})" if len(names) > 1 else ""))
    if len(leaks) > 20:
        lines.append(f"  ... and {len(leaks) - 20} more")
    return lines


def _near_duplicate_lines(scan, max_listed=20):
    near = find_near_duplicates(scan)
    lines = [f"near-duplicates across splits (perceptual hash): {len(near)}" +
             ("; the same picture resized or recompressed: keep it in one split" if near else "")]
    split_of = {path: split for split, samples in scan.samples.items() for path, _ in samples}
    lines += [f"  {_rel(scan, a, split_of[a])} ~ {_rel(scan, b, split_of[b])}  "
              f"(differ in {bits} of 64 bits)" for a, b, bits in near[:max_listed]]
    if len(near) > max_listed:
        lines.append(f"  ... and {len(near) - max_listed} more")
    return lines


def _rel(scan, path, split=None):
    """A path as shown in reports: relative to the data folder, with its split when the folder
    names no split (automatic splits)."""
    rel = os.path.relpath(path, scan.root)
    if split and scan.layout != "splits" and not rel.startswith(
            os.path.basename(scan.folders.get(split, "\0")) + os.sep):
        return f"{rel} ({split})"
    return rel


def _plural(n, word):
    if n == 1:
        return f"1 {word}"
    return f"{n} {word}es" if word.endswith(("s", "sh", "ch", "x")) else f"{n} {word}s"


def _display(cls, class_names):
    if class_names and cls in class_names and class_names[cls] != cls:
        return f"{cls} ({class_names[cls]})"
    return cls


# ---------------------------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------------------------
MAX_NAMES_BYTES = 10_000_000


def read_category_names(path):
    """A JSON object mapping class folder names to display names."""
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "no such file"
        raise UserError(f"--category_names {path}: {what}; give a JSON file like "
                        f'{{"1": "pink primrose"}}')
    try:
        # Read at most one byte past the limit: the size check then holds for a file that
        # grows or lies about its size.
        with open(path, "rb") as f:
            data = f.read(MAX_NAMES_BYTES + 1)
    except OSError as err:
        raise UserError(f"--category_names {path}: cannot read it ({err.strerror})") from None
    if len(data) > MAX_NAMES_BYTES:
        raise UserError(f"--category_names {path}: over {MAX_NAMES_BYTES} bytes is too large "
                        f"for a class-name file; give a JSON object of class names")
    try:
        names = json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
        why = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise UserError(f"--category_names {path}: not valid JSON ({why}); give a JSON object "
                        f'like {{"1": "pink primrose"}}') from None
    if not isinstance(names, dict) or not all(isinstance(v, (str, int, float))
                                              for v in names.values()):
        raise UserError(f"--category_names {path}: must be a JSON object mapping class folder "
                        f'names to names, like {{"1": "pink primrose"}}')
    return {str(k): str(v) for k, v in names.items()}


def check_category_names(names, classes, path):
    missing = [c for c in classes if c not in names]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise UserError(f"--category_names {path}: no name for {len(missing)} of the "
                        f"{len(classes)} classes ({shown}); add them to the file")
    return {c: names[c] for c in classes}


# ---------------------------------------------------------------------------------------------
# Built-in demo data
# ---------------------------------------------------------------------------------------------
def write_digits(dest):
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 scans) as an image folder:
    dest/{train,valid,test}/<digit>/<index>.png, ink dark on white. Needs no network."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the demo needs scikit-learn for its bundled digits: "
                        "pip install scikit-learn") from None
    digits = load_digits()
    marker = os.path.join(dest, ".complete")
    if os.path.exists(marker):
        return dest
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        split = "test" if i % 10 in (3, 8) else "valid" if i % 10 == 5 else "train"
        folder = os.path.join(dest, split, str(target))
        os.makedirs(folder, exist_ok=True)
        gray = (255 - pixels * (255 / 16)).astype(np.uint8)
        Image.fromarray(gray, "L").resize((32, 32), Image.NEAREST).save(
            os.path.join(folder, f"{i:04d}.png"))
    write_text_atomic(marker, "")
    return dest


def main(argv=None):
    """python data_utils.py flowers102 DEST | digits DEST"""
    import argparse
    p = argparse.ArgumentParser(description="Prepare image folders for train.py.")
    p.add_argument("dataset", choices=["flowers102", "digits"],
                   help="flowers102: download Oxford Flowers-102 and lay it out as "
                        "train/valid/test/1..102; digits: write scikit-learn's bundled digits")
    p.add_argument("dest", metavar="DEST", help="folder to create")
    args = p.parse_args(argv)
    try:
        if args.dataset == "flowers102":
            import flowers102
            flowers102.prepare_flowers102(args.dest)
        else:
            print(f"digits ready in {write_digits(args.dest)}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
