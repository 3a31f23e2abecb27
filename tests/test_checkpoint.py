"""The checkpoint: self-describing, loaded safely, written atomically."""
import os
import pickle
import signal

import pytest
import torch

from conftest import FAST, timeless
from imgclf import checkpoints
from imgclf.cli import predict, train
from imgclf.engine import epoch_loop
from imgclf.models import backbones


def test_checkpoint_describes_itself(trained):
    ckpt = torch.load(trained["checkpoint"], weights_only=True)
    assert ckpt["format"] == checkpoints.CHECKPOINT_FORMAT
    assert ckpt["model_args"]["arch"] == backbones.DEFAULT_ARCH
    assert ckpt["classes"] == ["cat", "dog", "fox"]
    assert ckpt["class_to_idx"] == {"cat": 0, "dog": 1, "fox": 2}
    assert ckpt["preprocess"]["size"] == 64
    assert set(ckpt["metrics"]) >= {"valid_acc", "test_acc"}  # --head adamw's
    assert ckpt["versions"]["torch"]


def test_round_trip_gives_the_same_probabilities(trained):
    ckpt = checkpoints.load_checkpoint(trained["checkpoint"])
    model = checkpoints.model_from_checkpoint(ckpt)
    x = torch.randn(2, 3, 64, 64)
    again = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(trained["checkpoint"]))
    with torch.no_grad():
        assert torch.allclose(model(x), again(x))


def test_best_epoch_is_kept_not_the_last(trained):
    ckpt = torch.load(trained["checkpoint"], weights_only=True)
    losses = [h["valid_loss"] for h in ckpt["history"]]
    assert ckpt["epoch"] == 1 + losses.index(min(losses))


def test_save_is_atomic_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint({"a": torch.ones(3)}, str(path))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk gone")
    with pytest.raises(Exception):
        checkpoints.save_checkpoint({"a": Boom()}, str(path))
    assert torch.load(path, weights_only=True)["a"].sum() == 3
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("MARKER", "/tmp/never"),))


@pytest.mark.parametrize("content", ["random", "state_dict", "pickle"])
def test_predict_refuses_files_that_are_not_our_checkpoints(tmp_path, trained, content, capsys,
                                                           monkeypatch):
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    path = tmp_path / "bad.pth"
    if content == "random":
        path.write_bytes(os.urandom(4096))
    elif content == "state_dict":
        torch.save({"weight": torch.ones(2)}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"x": RunsCode()}, f)
    image = os.path.join(trained["data"], "test", "cat", "000.jpg")
    assert predict.main([image, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and err.count("\n") == 1
    assert not marker.exists()


def interrupt_after_epoch(monkeypatch, stop_epoch):
    """Send this process a real SIGINT while train.py prints the line of stop_epoch."""
    original = epoch_loop.epoch_line

    def line_then_interrupt(epoch, *rest):
        if epoch == stop_epoch:
            signal.raise_signal(signal.SIGINT)
        return original(epoch, *rest)
    monkeypatch.setattr(epoch_loop, "epoch_line", line_then_interrupt)


def test_resume_ends_like_an_uninterrupted_run(tmp_path, image_folder, monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    opts = [image_folder, *FAST, "--head", "adamw", "--patience", "0", "--epochs", "6"]
    assert train.main([*opts, "--save_dir", str(full)]) == 0
    with monkeypatch.context() as m:
        interrupt_after_epoch(m, 3)
        assert train.main([*opts, "--save_dir", str(part), "--cache_dir",
                           str(full / "cache")]) == 130
    assert "resume with: python train.py" in capsys.readouterr().err
    assert train.main([*opts, "--save_dir", str(part), "--cache_dir", str(full / "cache"),
                       "--resume", str(part / "checkpoint.pth")]) == 0
    a = torch.load(full / "checkpoint.pth", weights_only=True)
    b = torch.load(part / "checkpoint.pth", weights_only=True)
    assert a["metrics"] == b["metrics"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_same_seed_same_metrics(tmp_path, image_folder):
    runs = []
    for name in ("a", "b"):
        assert train.main([image_folder, *FAST, "--save_dir", str(tmp_path / name)]) == 0
        runs.append(torch.load(tmp_path / name / "checkpoint.pth", weights_only=True))
    assert runs[0]["metrics"] == runs[1]["metrics"]
    assert timeless(runs[0]["history"]) == timeless(runs[1]["history"])
