"""Download Oxford Flowers-102 and lay it out as train/valid/test class folders."""

import gzip
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from ..errors import UserError
from ..utils import atomic

# The address and checksums torchvision.datasets.Flowers102 uses.
FLOWERS102_BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
FLOWERS102_MD5 = {
    "102flowers.tgz": "52808999861908f626f3c1f4e79d11fa",
    "imagelabels.mat": "e0620be6f572b9609742df49c70aed4d",
    "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c",
}
FLOWERS102_URLS = {name: FLOWERS102_BASE_URL + name for name in FLOWERS102_MD5}
# Our split folder -> key in setid.mat.
FLOWERS102_SPLITS = {"train": "trnid", "valid": "valid", "test": "tstid"}

_ARCHIVE = "102flowers.tgz"
_MEMBER_RE = re.compile(r"^jpg/image_(\d{5})\.jpg$")
_MARKER = ".flowers102-layout.json"
_PARTIAL = ".flowers102-partial"
_CHUNK = 1 << 20


def _md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _by_hand_hint(raw_dir):
    return (f"Download 102flowers.tgz, imagelabels.mat and setid.mat by hand into {raw_dir} "
            "and run the same command again.")


def _fetch(url, out, timeout, progress):
    """Stream url into the open file out; return its md5."""
    digest, done = hashlib.md5(), 0
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        total = int(resp.headers.get("Content-Length") or 0)
        if progress:
            size = f" ({total / 1e6:.0f} MB)" if total else ""
            print(f"Downloading {url}{size}", file=sys.stderr, flush=True)
        for chunk in iter(lambda: resp.read(_CHUNK), b""):
            out.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            # Redrawing one line only makes sense on a terminal; logs get start/end lines.
            if progress and total and sys.stderr.isatty():
                print(f"\r  {done / 1e6:.0f}/{total / 1e6:.0f} MB", end="", file=sys.stderr, flush=True)
    if progress and total and sys.stderr.isatty():
        print(file=sys.stderr)
    return digest.hexdigest()


def download_flowers102(dest, urls=FLOWERS102_URLS, progress=True, timeout=30, md5s=FLOWERS102_MD5):
    """Download the Flowers-102 files into dest/raw, skipping files already verified."""
    raw_dir = Path(dest) / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, url in urls.items():
        target, expected = raw_dir / name, md5s.get(name)
        if target.is_file() and (expected is None or _md5(target) == expected):
            continue
        try:
            # A download is renamed into place only once its checksum is right.
            with atomic.AtomicFile(target, prefix=f".{target.name}.", suffix=".part") as out:
                got = _fetch(url, out, timeout, progress)
                if expected is not None and got != expected:
                    raise UserError(f"download of {url} is corrupt (md5 {got}, expected "
                                    f"{expected}); run the same command again.")
        except urllib.error.HTTPError as e:
            # HTTPError is a URLError, but here the network works and the server refused.
            raise UserError(f"cannot download Oxford Flowers-102 from {url}: HTTP {e.code} {e.reason}. "
                            + _by_hand_hint(raw_dir)) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise UserError(f"cannot download Oxford Flowers-102 from {url}: no network ({reason}). "
                            + _by_hand_hint(raw_dir)) from None
    return raw_dir


def _load_mat(path, keys):
    """Return {key: list of ints} for the given keys of a .mat file."""
    try:
        import scipy.io
    except ImportError:
        raise UserError("reading the Flowers-102 labels needs scipy: pip install scipy") from None
    if not path.is_file():
        raise UserError(f"{path} is missing. " + _by_hand_hint(path.parent))
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # loadmat raises many types on a bad file
        raise UserError(f"cannot read {path} ({e}); delete it and run the same command again.") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise UserError(f"{path} has no '{missing[0]}' entry; is it the Flowers-102 file?")
    return {k: [int(v) for v in mat[k].ravel().tolist()] for k in keys}


def _read_plan(raw_dir):
    """Return {split: {image_id: label}} from imagelabels.mat and setid.mat."""
    raw_dir = Path(raw_dir)
    labels = _load_mat(raw_dir / "imagelabels.mat", ["labels"])["labels"]
    setid = _load_mat(raw_dir / "setid.mat", list(FLOWERS102_SPLITS.values()))
    plan = {}
    for split, key in FLOWERS102_SPLITS.items():
        ids = setid[key]
        bad = [i for i in ids if not 1 <= i <= len(labels)]
        if bad:
            raise UserError(f"{raw_dir / 'setid.mat'} lists image {bad[0]}, "
                            f"but imagelabels.mat has only {len(labels)} labels.")
        plan[split] = {i: labels[i - 1] for i in ids}
    return plan


def _rel_path(image_id, label):
    return f"{label}/image_{image_id:05d}.jpg"


def _split_complete(split_dir, wanted):
    return all((split_dir / _rel_path(i, lab)).is_file() for i, lab in wanted.items())


def _layout_done(dest):
    """True if a finished layout's marker is present and its file counts still hold."""
    try:
        counts = json.loads((dest / _MARKER).read_text())
        return all(sum(1 for _ in (dest / s).glob("*/*.jpg")) == counts[s] for s in FLOWERS102_SPLITS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _member_image_id(member, archive):
    """Image id for a wanted regular file under jpg/, None to skip; UserError if unsafe."""
    path = PurePosixPath(member.name)
    safe = (not path.is_absolute() and ".." not in path.parts and "\\" not in member.name
            and path.parts[:1] == ("jpg",))
    if not safe or not (member.isfile() or member.isdir()):
        raise UserError(f"{archive} contains an unexpected entry {member.name!r} "
                        "(only regular files under jpg/ are allowed); delete it and run the same command again.")
    match = _MEMBER_RE.match(str(path)) if member.isfile() else None
    return int(match.group(1)) if match else None


def _extract(archive, work, todo):
    """Copy the images of the splits in todo from archive into work/<split>/<label>/."""
    where = {i: (split, lab) for split, wanted in todo.items() for i, lab in wanted.items()}
    for split, wanted in todo.items():
        for lab in set(wanted.values()):
            (work / split / str(lab)).mkdir(parents=True, exist_ok=True)
    if not archive.is_file():
        raise UserError(f"{archive} is missing. " + _by_hand_hint(archive.parent))
    found = set()
    try:
        # Stream mode reads the 330 MB archive once; "*" also accepts an uncompressed tar.
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                image_id = _member_image_id(member, archive)
                if image_id not in where:
                    continue
                split, lab = where[image_id]
                # The target path is built from the id, never from the member name.
                with tar.extractfile(member) as src, open(work / split / _rel_path(image_id, lab), "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                found.add(image_id)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"cannot read {archive} ({e}); delete it and run the same command again.") from None
    missing = sorted(set(where) - found)
    if missing:
        raise UserError(f"{archive} lacks {len(missing)} images listed in setid.mat "
                        f"(e.g. jpg/image_{missing[0]:05d}.jpg); delete it and run the same command again.")


def layout_flowers102(raw_dir, dest):
    """Lay out dest/{train,valid,test}/<label>/image_xxxxx.jpg; return image counts per split."""
    raw_dir, dest = Path(raw_dir), Path(dest)
    if _layout_done(dest):
        return json.loads((dest / _MARKER).read_text())
    plan = _read_plan(raw_dir)
    todo = {}
    for split, wanted in plan.items():
        if not (dest / split).exists():
            todo[split] = wanted
        elif not _split_complete(dest / split, wanted):
            # Our own splits appear only whole (see rename below), so this is someone else's folder.
            raise UserError(f"{dest / split} exists but is not a complete Flowers-102 split; "
                            "move it away and run the same command again.")
    if todo:
        work = dest / _PARTIAL
        shutil.rmtree(work, ignore_errors=True)  # left over from an interrupted run
        work.mkdir(parents=True)
        try:
            _extract(raw_dir / _ARCHIVE, work, todo)
            # Each split appears in one rename, so a crash never leaves a half split in place.
            for split in todo:
                os.rename(work / split, dest / split)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    counts = {split: len(wanted) for split, wanted in plan.items()}
    with atomic.AtomicFile(dest / _MARKER, "w", name=_MARKER + ".tmp") as f:
        f.write(json.dumps(counts))
    return counts


def prepare_flowers102(dest):
    """Download (if needed) and lay out Flowers-102 in dest; return counts per split."""
    dest = Path(dest)
    if _layout_done(dest):
        counts = json.loads((dest / _MARKER).read_text())
    else:
        counts = layout_flowers102(download_flowers102(dest), dest)
    classes = {p.name for s in FLOWERS102_SPLITS for p in (dest / s).iterdir() if p.is_dir()}
    print(f"Flowers-102 ready in {dest}: " + ", ".join(f"{s} {n}" for s, n in counts.items())
          + f" images in {len(classes)} classes")
    return counts
