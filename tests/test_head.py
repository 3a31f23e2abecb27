"""The head over stored features: its schedule, the choice of augmented views, and the resize
filter of small photos."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EPOCHS, FAST
from imgclf.cli import train
from imgclf.data import decode
from imgclf.engine import distributed, feature_trainer, train_config
from imgclf.models import classifier

HEAD = [*FAST, *EPOCHS, "--head", "adamw"]  # the view choice and resume of the epoch head
from test_checkpoint import interrupt_after_epoch


def test_view_rows_takes_the_plain_row_and_the_first_views_of_each_image():
    # 3 images, 2 stored views each: rows are image by image, plain first
    assert feature_trainer.view_rows(9, 2, 0).tolist() == [0, 3, 6]
    assert feature_trainer.view_rows(9, 2, 1).tolist() == [0, 1, 3, 4, 6, 7]
    assert feature_trainer.view_rows(9, 2, 2).tolist() == list(range(9))


def test_small_data_sets_get_enough_steps_large_ones_the_usual_epochs():
    assert feature_trainer.head_epochs(20) * 20 >= train_config.HEAD_MIN_STEPS  # 1258 photos: 20 steps an epoch
    assert feature_trainer.head_epochs(1000) == train_config.HEAD_EPOCHS


def new_trainer(aug_views, always_augment=False):
    config = train_config.TrainConfig(aug_views=aug_views, always_augment=always_augment)
    scan = argparse.Namespace(classes=["a", "b", "c"])
    model = argparse.Namespace(head=classifier.build_head(16, [0], 3, 0.2))
    trainer = feature_trainer.FeatureTrainer(config, scan, model, None,
                                      distributed.Single(torch.device("cpu")))
    trainer.verbose = False
    return trainer


def synthetic_features(views_like_valid):
    """Three classes around fixed centres. The augmented rows either look like the valid
    photos (the plain rows are off-centre, as if all framed alike) or are pure noise."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 16)).astype(np.float32)
    offset = rng.normal(0, 1.5, 16).astype(np.float32)
    labels = np.arange(300) % 3
    rows = []
    for y in labels:
        plain = centres[y] + rng.normal(0, 0.8, 16) + (offset if views_like_valid else 0)
        view = centres[y] + rng.normal(0, 0.8, 16) if views_like_valid else rng.normal(0, 3, 16)
        rows += [plain, view]
    train_x = np.asarray(rows, dtype=np.float32)
    train_y = np.repeat(labels, 2)
    valid_y = np.arange(90) % 3
    valid_x = (centres[valid_y] + rng.normal(0, 0.8, (90, 16))).astype(np.float32)
    return (train_x, train_y), (valid_x, valid_y)


@pytest.mark.parametrize("views_like_valid, expected", [(False, 0), (True, 1)])
def test_the_head_trains_on_augmented_views_only_where_they_lower_the_valid_loss(
        views_like_valid, expected):
    trainer = new_trainer(aug_views=1)
    train_rows, valid = synthetic_features(views_like_valid)
    assert trainer.choose_views(train_rows, valid) == expected


def test_always_augment_keeps_the_augmented_views():
    trainer = new_trainer(aug_views=1, always_augment=True)
    train_rows, valid = synthetic_features(views_like_valid=False)
    assert trainer.choose_views(train_rows, valid) == 1


def interrupted_run(image_folder, save_dir, monkeypatch, *options):
    """Train with FAST options, stopped by a SIGINT after epoch 2: only an interrupted run's
    checkpoint keeps the state to resume from."""
    with monkeypatch.context() as m:
        interrupt_after_epoch(m, 2)
        assert train.main([image_folder, *HEAD, *options, "--save_dir", str(save_dir)]) == 130
    return save_dir / "checkpoint.pth"


def test_train_py_says_which_views_the_head_used_and_resume_keeps_them(tmp_path, image_folder,
                                                                        capsys, monkeypatch):
    path = interrupted_run(image_folder, tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert "head inputs: " in out and "best valid loss" in out
    ckpt = torch.load(path, weights_only=True)
    chosen = ckpt["train_state"]["views_used"]
    assert chosen in (0, 1) and ("plain views (best" in out) == (chosen == 0)
    # A resumed run goes on with the stored choice, without choosing again
    assert train.main([image_folder, *HEAD, "--epochs", "5", "--save_dir", str(tmp_path),
                       "--resume", str(path)]) == 0
    again = torch.load(path, weights_only=True)
    assert "head inputs: " not in capsys.readouterr().out
    assert again["epochs_run"] == 5 and "train_state" not in again  # complete: none kept


def test_resume_refuses_a_view_count_this_run_does_not_store(tmp_path, image_folder, capsys,
                                                             monkeypatch):
    path = interrupted_run(image_folder, tmp_path, monkeypatch, "--always_augment")
    capsys.readouterr()
    assert train.main([image_folder, *HEAD, "--aug_views", "0", "--epochs", "5",
                       "--save_dir", str(tmp_path), "--resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert "augmented views" in err and "--aug_views 1" in err and err.count("\n") == 1


def test_resume_of_a_checkpoint_from_before_the_choice_refuses_fewer_views(tmp_path,
                                                                         image_folder, capsys,
                                                                         monkeypatch):
    # Such checkpoints have no views_used: their head trained on all the views they stored
    path = interrupted_run(image_folder, tmp_path, monkeypatch, "--always_augment")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["train_state"]["views_used"]
    torch.save(ckpt, path)
    capsys.readouterr()
    assert train.main([image_folder, *HEAD, "--aug_views", "0", "--epochs", "5",
                       "--save_dir", str(tmp_path), "--resume", str(path)]) == 2
    err = capsys.readouterr().err
    assert "augmented views" in err and "--aug_views 1" in err and err.count("\n") == 1


def sharp_edge_image(size=16, dark=50, light=200):
    arr = np.full((size, size, 3), dark, dtype=np.uint8)
    arr[:, size // 2:] = light
    return Image.fromarray(arr)


def test_enlarging_is_bilinear_without_the_overshoot_of_bicubic():
    img = sharp_edge_image()
    pre = dict(size=64, crop_pct=1.0, mean=[0.0] * 3, std=[1.0] * 3)
    bicubic = decode.eval_array(img, {**pre, "upscale": "bicubic"}) * 255
    bilinear = decode.eval_array(img, {**pre, "upscale": "bilinear"}) * 255
    # Bicubic rings at the edge: darker than the dark side, lighter than the light side
    assert bicubic.min() < 49 and bicubic.max() > 201
    assert bilinear.min() > 49.9 and bilinear.max() < 200.1
    assert np.array_equal(bilinear, decode.to_normalized_array(
        img.resize((64, 64), Image.BILINEAR), pre["mean"], pre["std"]) * 255)


def test_shrinking_is_bicubic_and_old_checkpoints_keep_bicubic_throughout():
    big, small = sharp_edge_image(128), sharp_edge_image(16)
    pre = dict(size=64, crop_pct=1.0, mean=[0.0] * 3, std=[1.0] * 3)

    def bicubic(img):
        return decode.to_normalized_array(img.resize((64, 64), Image.BICUBIC), [0.0] * 3,
                                              [1.0] * 3)
    assert np.array_equal(decode.eval_array(big, {**pre, "upscale": "bilinear"}), bicubic(big))
    assert np.array_equal(decode.eval_array(small, pre), bicubic(small))  # no "upscale" key


def test_new_checkpoints_store_the_upscale_filter(trained):
    ckpt = torch.load(trained["checkpoint"], weights_only=True)
    assert ckpt["preprocess"]["upscale"] == "bilinear"
