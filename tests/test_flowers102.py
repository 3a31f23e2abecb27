"""Offline tests for flowers102.py with a tiny archive in the real Flowers-102 format."""

import hashlib
import io
import os
import shutil
import tarfile
import time

import numpy as np
import pytest
import scipy.io
from PIL import Image

from imgclf.data.flowers102 import (  # noqa: E402
    UserError,
    download_flowers102,
    layout_flowers102,
    prepare_flowers102,
)

N = 12
LABELS = [(i - 1) % 3 + 1 for i in range(1, N + 1)]  # image i -> label 1, 2, 3, 1, ...
SPLITS = {"trnid": [1, 2, 3], "valid": [4, 5, 6], "tstid": [7, 8, 9, 10, 11, 12]}


def _jpeg_bytes(i):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _add_bytes(tar, name, data, type_=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.size = type_, len(data)
    tar.addfile(info, io.BytesIO(data))


def make_raw(raw, extra=None, labels_dtype=np.float64):
    """Write 102flowers.tgz, imagelabels.mat and setid.mat like the real ones into raw."""
    raw.mkdir(parents=True, exist_ok=True)
    with tarfile.open(raw / "102flowers.tgz", "w:gz") as tar:
        dir_info = tarfile.TarInfo("jpg")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for i in range(1, N + 1):
            _add_bytes(tar, f"jpg/image_{i:05d}.jpg", _jpeg_bytes(i))
        if extra:
            extra(tar)
    scipy.io.savemat(raw / "imagelabels.mat", {"labels": np.array([LABELS], dtype=labels_dtype)})
    scipy.io.savemat(raw / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in SPLITS.items()})
    return raw


def expected_files():
    out = set()
    for split, key in (("train", "trnid"), ("valid", "valid"), ("test", "tstid")):
        out |= {f"{split}/{LABELS[i - 1]}/image_{i:05d}.jpg" for i in SPLITS[key]}
    return out


def laid_out_files(dest):
    return {p.relative_to(dest).as_posix() for s in ("train", "valid", "test")
            for p in (dest / s).rglob("*") if p.is_file()}


def test_raw_files_have_real_shapes(tmp_path):
    raw = make_raw(tmp_path / "raw")
    assert scipy.io.loadmat(raw / "imagelabels.mat")["labels"].shape == (1, N)
    assert scipy.io.loadmat(raw / "setid.mat")["tstid"].shape == (1, 6)


@pytest.mark.parametrize("labels_dtype", [np.float64, np.uint8])
def test_layout_exact_folders_and_counts(tmp_path, labels_dtype):
    raw, dest = make_raw(tmp_path / "raw", labels_dtype=labels_dtype), tmp_path / "flowers"
    counts = layout_flowers102(raw, dest)
    assert counts == {"train": 3, "valid": 3, "test": 6}
    assert laid_out_files(dest) == expected_files()
    assert sorted(p.name for p in (dest / "test").iterdir()) == ["1", "2", "3"]
    with tarfile.open(raw / "102flowers.tgz") as tar:
        original = tar.extractfile("jpg/image_00007.jpg").read()
    assert (dest / "test/1/image_00007.jpg").read_bytes() == original
    assert not (dest / ".flowers102-partial").exists()


def test_layout_is_idempotent_and_needs_no_raw_files_once_done(tmp_path):
    raw, dest = make_raw(tmp_path / "raw"), tmp_path / "flowers"
    first = layout_flowers102(raw, dest)
    stamp = (dest / "train/1/image_00001.jpg").stat().st_mtime_ns
    for f in raw.iterdir():
        f.unlink()
    assert layout_flowers102(raw, dest) == first
    assert (dest / "train/1/image_00001.jpg").stat().st_mtime_ns == stamp
    assert laid_out_files(dest) == expected_files()


def test_layout_recovers_from_an_interrupted_run(tmp_path):
    raw, dest = make_raw(tmp_path / "raw"), tmp_path / "flowers"
    (dest / ".flowers102-partial/train/1").mkdir(parents=True)  # half-written leftover
    layout_flowers102(raw, dest)
    # Simulate a crash after only "train" was renamed into place: no marker, no valid/test.
    for name in ("valid", "test", ".flowers102-layout.json"):
        target = dest / name
        target.unlink() if target.is_file() else shutil.rmtree(target)
    assert layout_flowers102(raw, dest) == {"train": 3, "valid": 3, "test": 6}
    assert laid_out_files(dest) == expected_files()


def test_layout_refuses_a_foreign_incomplete_split(tmp_path):
    raw, dest = make_raw(tmp_path / "raw"), tmp_path / "flowers"
    (dest / "train/1").mkdir(parents=True)
    with pytest.raises(UserError, match="not a complete Flowers-102 split"):
        layout_flowers102(raw, dest)


def _evil_file(tar):
    _add_bytes(tar, "../evil", b"pwned")


def _evil_nested(tar):
    _add_bytes(tar, "jpg/../../evil", b"pwned")


def _evil_absolute(tar):
    _add_bytes(tar, "/tmp/evil-flowers102-test", b"pwned")


def _evil_symlink(tar):
    info = tarfile.TarInfo("jpg/image_00099.jpg")
    info.type, info.linkname = tarfile.SYMTYPE, "../../evil"
    tar.addfile(info)


def _evil_outside_jpg(tar):
    _add_bytes(tar, "other/image_00001.jpg", b"x")


@pytest.mark.parametrize("extra", [_evil_file, _evil_nested, _evil_absolute, _evil_symlink, _evil_outside_jpg])
def test_layout_rejects_unsafe_members(tmp_path, extra):
    raw, dest = make_raw(tmp_path / "raw", extra=extra), tmp_path / "flowers"
    with pytest.raises(UserError) as err:
        layout_flowers102(raw, dest)
    assert "102flowers.tgz" in str(err.value)
    assert not (tmp_path / "evil").exists() and not os.path.exists("/tmp/evil-flowers102-test")
    assert not any((dest / s).exists() for s in ("train", "valid", "test"))
    assert not (dest / ".flowers102-partial").exists()


def test_layout_reports_missing_images(tmp_path):
    raw, dest = make_raw(tmp_path / "raw"), tmp_path / "flowers"
    labels = np.array([LABELS + [1]], dtype=np.float64)  # image 13 is labelled but not in the tgz
    scipy.io.savemat(raw / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(raw / "setid.mat", {"trnid": np.array([[1, 2, 13]], dtype=np.uint16),
                                         "valid": np.array([[4]], dtype=np.uint16),
                                         "tstid": np.array([[7]], dtype=np.uint16)})
    with pytest.raises(UserError, match="image_00013"):
        layout_flowers102(raw, dest)


def test_layout_missing_raw_files(tmp_path):
    with pytest.raises(UserError, match="by hand"):
        layout_flowers102(tmp_path / "raw", tmp_path / "flowers")


def test_download_without_network_fails_fast(tmp_path):
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        download_flowers102(tmp_path, urls={"setid.mat": "http://127.0.0.1:9/x"}, progress=False, timeout=2)
    message = str(err.value)
    assert "cannot download" in message and "no network" in message
    assert str(tmp_path / "raw") in message and "\n" not in message
    assert time.monotonic() - start < 10
    assert list((tmp_path / "raw").iterdir()) == []  # no temp file left behind


def test_download_copies_and_then_skips_verified_files(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"flowers")
    md5 = hashlib.md5(b"flowers").hexdigest()
    dest = tmp_path / "data"
    download_flowers102(dest, urls={"x.bin": src.as_uri()}, progress=False, md5s={"x.bin": md5})
    assert (dest / "raw/x.bin").read_bytes() == b"flowers"
    # Already present with the right md5: the unreachable URL is never tried.
    download_flowers102(dest, urls={"x.bin": "http://127.0.0.1:9/x"}, progress=False, md5s={"x.bin": md5})


def test_download_rejects_a_wrong_checksum(tmp_path):
    src = tmp_path / "setid.mat"
    src.write_bytes(b"not the real file")
    with pytest.raises(UserError, match="corrupt"):
        download_flowers102(tmp_path / "data", urls={"setid.mat": src.as_uri()}, progress=False)
    assert list((tmp_path / "data/raw").iterdir()) == []


def test_prepare_uses_existing_raw_files_and_prints_summary(tmp_path, capsys, monkeypatch):
    make_raw(tmp_path / "raw")
    from imgclf.data import flowers102
    # Real checksums cannot match the tiny archive, so only the network step is replaced.
    monkeypatch.setattr(flowers102, "download_flowers102", lambda dest: tmp_path / "raw")
    prepare_flowers102(tmp_path)
    assert capsys.readouterr().out.strip() == (
        f"Flowers-102 ready in {tmp_path}: train 3, valid 3, test 6 images in 3 classes")
    prepare_flowers102(tmp_path)  # second run: nothing to do, same line
    assert "train 3, valid 3, test 6" in capsys.readouterr().out


def test_layout_reports_a_truncated_archive(tmp_path):
    raw, dest = make_raw(tmp_path / "raw"), tmp_path / "flowers"
    data = (raw / "102flowers.tgz").read_bytes()
    (raw / "102flowers.tgz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="102flowers.tgz"):
        layout_flowers102(raw, dest)
    assert not (dest / "train").exists() and not (dest / ".flowers102-partial").exists()
