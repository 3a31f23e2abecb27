"""Reruns into the same --save_dir (issue 27): only new photos go through the backbone, the first
lines name what changed, the head equals a fresh run's."""
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import FAST, draw_sample, make_image_folder
from imgclf import checkpoints
from imgclf.cli import train
from imgclf.engine import feature_store, features
from imgclf.models import hardware

PER_SPLIT = {"train": 8, "valid": 3, "test": 3}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One first run, copied by each test that reruns after it."""
    base = tmp_path_factory.mktemp("first")
    data = make_image_folder(base / "data", per_split=PER_SPLIT)
    assert train.main([data, "--save_dir", str(base / "run"), "--cache_dir",
                       str(base / "cache"), *FAST]) == 0
    return base


@pytest.fixture
def rerun(first_run, tmp_path, monkeypatch, capsys):
    """A copy of the first run's data, save_dir and cache; rerun(*options) trains again into
    them and returns (photos through the backbone, output lines)."""
    for name in ("data", "run", "cache"):
        shutil.copytree(first_run / name, tmp_path / name)
    photos = []
    real = hardware.fast_forward

    def counting(model, device, float32=False):
        forward = real(model, device, float32)
        return lambda x: photos.append(len(x)) or forward(x)
    monkeypatch.setattr(hardware, "fast_forward", counting)

    def run(*options):
        photos.clear()
        capsys.readouterr()
        args = [str(tmp_path / "data"), "--save_dir", str(tmp_path / "run"), "--cache_dir",
                str(tmp_path / "cache"), *FAST, *options]
        assert train.main(args) == 0
        return sum(photos), capsys.readouterr().out.splitlines()
    run.data = tmp_path / "data"
    return run


def fresh_run(data, tmp_path, *options):
    """A run on data with an empty cache and save_dir: the checkpoint."""
    save = tmp_path / "fresh"
    assert train.main([str(data), "--save_dir", str(save), "--cache_dir",
                       str(tmp_path / "fresh-cache"), *FAST, *options]) == 0
    return checkpoints.load_checkpoint(str(save / "checkpoint.pth"))


def assert_same_head(run_dir, fresh):
    ckpt = checkpoints.load_checkpoint(str(run_dir / "checkpoint.pth"))
    assert ckpt["metrics"]["test_acc"] == fresh["metrics"]["test_acc"]
    for name, weight in fresh["state_dict"].items():
        assert torch.equal(ckpt["state_dict"][name], weight), name


def test_a_rerun_with_one_photo_more_computes_only_that_photo(rerun, tmp_path):
    draw_sample(0, 999).save(rerun.data / "train" / "cat" / "new.jpg")
    rows, lines = rerun()
    assert rows == 3  # the new photo's plain, mirrored and augmented views, nothing else
    assert lines[0].startswith("changes since the last run")
    assert "  photos added: 1 (train/cat/new.jpg)" in lines
    assert any(line.startswith("since the last run: test acc ") for line in lines)
    assert_same_head(tmp_path / "run", fresh_run(rerun.data, tmp_path))


def test_moving_and_renaming_photos_costs_no_backbone_pass(rerun, tmp_path):
    train_dir = rerun.data / "train"
    os.rename(train_dir / "cat" / "000.jpg", train_dir / "dog" / "was-cat.jpg")
    os.rename(train_dir / "fox" / "001.jpg", train_dir / "fox" / "renamed.jpg")
    rows, lines = rerun()
    assert rows == 0
    assert "  photos moved between classes: 1 (train/dog/was-cat.jpg (cat -> dog))" in lines
    assert "  photos renamed: 1 (train/fox/001.jpg -> train/fox/renamed.jpg)" in lines
    assert_same_head(tmp_path / "run", fresh_run(rerun.data, tmp_path))


def test_excluding_and_putting_back_costs_no_backbone_pass(rerun, tmp_path):
    listed = tmp_path / "exclude.txt"
    listed.write_text("train/dog/002.jpg\n")
    rows, lines = rerun("--exclude", str(listed))
    assert rows == 0 and "  photos excluded: 1 (train/dog/002.jpg)" in lines
    rows, lines = rerun()  # put back
    assert rows == 0 and "  photos added: 1 (train/dog/002.jpg)" in lines


def test_a_class_added_goes_through_the_backbone_alone(rerun):
    for s, (split, count) in enumerate(PER_SPLIT.items()):
        folder = rerun.data / split / "emu"
        folder.mkdir()
        for n in range(count):
            draw_sample(3, 5000 + 100 * s + n).save(folder / f"{n:03d}.jpg")
    rows, lines = rerun()
    # train and valid: plain, mirrored, augmented; test: plain and, as the head decides, mirrored
    assert 8 * 3 + 3 * 3 + 3 <= rows <= 8 * 3 + 3 * 3 + 3 * 2
    assert "  classes added: 1 (emu)" in lines


def test_the_same_photos_rerun_say_nothing_changed(rerun, tmp_path, monkeypatch):
    # A whole-split file of an earlier version goes; the store is kept under its bound, the
    # blocks read longest ago first, never this run's.
    old = tmp_path / "cache" / "features-train-0123456789abcdef.npy"
    old.write_bytes(b"x" * 2**20)
    unused = tmp_path / "cache" / "features" / "other-backbone"
    feature_store.write_block(str(unused), feature_store.row_keys(["0" * 32], ["plain"]),
                              np.zeros((1, 1280), np.float16))
    for name in os.listdir(unused):
        os.utime(unused / name, (0, 0))
    monkeypatch.setattr(features, "CACHE_LIMIT_BYTES", 1)
    rows, lines = rerun()
    assert rows == 0
    assert lines[0].endswith("none, the same classes and photos")
    assert not old.exists() and any("removed 1 whole-split feature files" in x for x in lines)
    assert not os.listdir(unused)
    assert any(line.startswith("features: the store was over") for line in lines)
    rows, _ = rerun()
    assert rows == 0  # this run's blocks stayed


def test_the_epoch_head_reuses_the_store_too(rerun):
    rows, _ = rerun("--head", "adamw", "--epochs", "2")
    assert rows == 0  # the plain, mirrored and first augmented views are all stored


def test_finetune_says_it_cannot_reuse_features(rerun):
    _, lines = rerun("--finetune", "--epochs", "1")
    assert any("--finetune trains the backbone" in line for line in lines)
