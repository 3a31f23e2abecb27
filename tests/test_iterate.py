"""Reruns into the same --save_dir (issue 27): only new photos go through the backbone, the first
lines name what changed, the head equals a fresh run's."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import FAST, ROOT, draw_sample, make_image_folder
from imgclf import checkpoints
from imgclf.analysis import changes
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

    def run(*options, data=tmp_path / "data", save=tmp_path / "run", cache=tmp_path / "cache"):
        photos.clear()
        capsys.readouterr()
        args = [str(data), "--save_dir", str(save), "--cache_dir", str(cache), *FAST, *options]
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


def test_two_runs_sharing_a_cache_at_once_leave_it_whole(tmp_path, rerun):
    """Two train.py processes on overlapping data write into one store at once; both finish,
    and a third run finds every photo there."""
    other = tmp_path / "other"
    shutil.copytree(rerun.data, other)
    draw_sample(1, 777).save(other / "train" / "dog" / "extra.jpg")
    draw_sample(2, 778).save(rerun.data / "train" / "fox" / "extra.jpg")
    cache = tmp_path / "shared-cache"
    procs = [subprocess.Popen([sys.executable, "train.py", str(data), "--save_dir",
                               str(tmp_path / f"run{i}"), "--cache_dir", str(cache), *FAST],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i, data in enumerate((rerun.data, other))]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    (store,) = (cache / "features").iterdir()
    names = os.listdir(store)
    assert not [n for n in names if n.startswith(".tmp")]
    assert sorted(n.replace(".keys.", ".rows.") for n in names if ".keys." in n) == \
        sorted(n for n in names if ".rows." in n)
    for data in (rerun.data, other):
        rows, _ = rerun(data=data, save=tmp_path / "third", cache=cache)
        assert rows == 0


def test_compare_matches_photos_by_content():
    before = {"d1": ("train/cat/1.jpg", "train", "cat"), "d2": ("train/cat/2.jpg", "train", "cat"),
              "d3": ("valid/dog/3.jpg", "valid", "dog"), "d4": ("train/dog/4.jpg", "train", "dog"),
              "d5": ("test/dog/5.jpg", "test", "dog"), "d6": ("train/cat/6.jpg", "train", "cat")}
    after = {"d1": ("train/cat/1.jpg", "train", "cat"), "d2": ("train/dog/2.jpg", "train", "dog"),
             "d3": ("train/dog/3.jpg", "train", "dog"), "d7": ("train/cat/7.jpg", "train", "cat"),
             "d4": ("train/dog/four.jpg", "train", "dog")}
    found, unchanged = changes.compare(before, after, excluded={"d6"})
    assert found == {"added": ["train/cat/7.jpg"], "removed": ["test/dog/5.jpg"],
                     "excluded": ["train/cat/6.jpg"],
                     "moved between classes": ["train/dog/2.jpg (cat -> dog)"],
                     "moved between splits": ["train/dog/3.jpg (valid -> train)"],
                     "renamed": ["train/dog/4.jpg -> train/dog/four.jpg"]}
    assert unchanged == 1


def test_a_checkpoint_without_a_photo_list_compares_classes_only(image_folder):
    from imgclf.data import scanning
    scan = scanning.scan_dataset(image_folder)
    old = {"classes": ["cat", "dog", "owl"], "data": {}}
    lines = changes.change_lines(old, scan, "run")
    assert lines == ["changes since the last run (run/checkpoint.pth):",
                     "  classes added: 1 (fox)", "  classes removed: 1 (owl)",
                     "  photos: not compared (the checkpoint predates its photo list)"]


def test_score_lines_name_the_classes_whose_f1_moved_most():
    before = {"metrics": {"test_acc": 0.8, "test_f1": {"a": 0.5, "b": 0.9, "c": 0.7}}}
    lines = changes.score_lines(before, {"test_acc": 0.85}, {"a": 0.75, "b": 0.9, "c": 0.6},
                                ["a", "b", "c"])
    assert lines == ["since the last run: test acc 80.0% -> 85.0% (+5.0 points; each on its "
                     "own test split)", "  F1 moved most: a 0.50 -> 0.75, c 0.70 -> 0.60"]
