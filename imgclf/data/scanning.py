"""The checked scan of an image folder: every file decoded once, up front, cached, and
split into train/valid/test."""
import hashlib
import json
import logging
import os
import random
import stat
import struct
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import UserError  # noqa: F401 (data_utils.UserError, as before)
from ..utils import atomic

log = logging.getLogger(__name__)

SPLIT_ALIASES = {
    "train": ("train",),
    "valid": ("valid", "val", "validation", "validate"),
    "test": ("test",),
}
LITTER_NAMES = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif",
                    ".ppm", ".pgm", ".pbm", ".jfif", ".pjpeg", ".heic", ".heif", ".avif")
from ..utils.progress import Progress
from ..utils.text import plural
from .decode import (
    IMAGE_ERRORS,
    ORIENTATION_TAG,
    _draft_jpeg,
    describe_image_error,
    open_image,
    to_rgb,
)

SCAN_CACHE_VERSION = 4  # 3: HEIC and AVIF are images; 4: perceptual hashes
# The scan decodes a JPEG at no less than this shorter side, so that a perceptual hash sees
# the picture of a small photo (a 32 px digit at 1/8 scale would be 4 px).
HASH_SIDE = 32
# A 32x32 grey picture that spans fewer grey levels than this is flat: it gets no hash.
FLAT_RANGE = 8


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

    def leave_out(self, paths):
        """Drop these (absolute) paths from every split, in place, and record them in
        excluded; the fingerprint takes them in. (The photos kept find their stored features by
        content, engine/feature_store.py.)"""
        for split, samples in self.samples.items():
            self.samples[split] = [(p, y) for p, y in samples if os.path.abspath(p) not in paths]
        if self.split_files is not None:
            self.split_files = {s: [os.path.relpath(p, self.root) for p, _ in v]
                                for s, v in self.samples.items()}
        self.excluded = sorted(os.path.relpath(p, os.path.abspath(self.root)) for p in paths)
        left_out = hashlib.sha1("\n".join(self.excluded).encode()).hexdigest()[:16]
        self.fingerprint = f"{self.fingerprint}-exclude-{left_out}"


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
            classes[entry.name] = walk_files(entry.path, litter)
        else:
            litter["outside the class folders"] += 1
    return classes


def labelled_files(folder, classes):
    """The files in folder's class folders as (paths, labels), labels indexing classes, in the
    order of classes; and the class folders that classes does not name."""
    by_class = list_class_files(folder, Counter())
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for cls in sorted(set(by_class) & set(index), key=index.get):
        paths += by_class[cls]
        labels += [index[cls]] * len(by_class[cls])
    return paths, labels, sorted(set(by_class) - set(index))


def walk_files(folder, litter=None):
    """Every file under folder (recursive, sorted), hidden and system files left out and
    counted in litter."""
    litter = Counter() if litter is None else litter
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
        atomic.write_text(path, json.dumps(data))
    except OSError as err:
        log.warning("could not save the scan cache %s: %s", path, err)


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
            scan.warnings.append(f"{split} has no images of {plural(len(missing), 'class')}: "
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
