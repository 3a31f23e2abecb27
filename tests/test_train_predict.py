import os

import torch

from conftest import EPOCHS, FAST
from imgclf.cli import predict, train


def test_train_then_predict(trained, capsys):
    image = os.path.join(trained["data"], "test", "dog", "000.jpg")
    capsys.readouterr()
    assert predict.main([image, trained["checkpoint"], "--top_k", "2"]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(" 1. ") and lines[1].startswith(" 2. ")
    assert lines[2].startswith("verdict: ")
    assert lines[0].endswith("%")


def test_train_prints_the_head_it_chose_and_test_accuracy(tmp_path, image_folder, capsys):
    assert train.main([image_folder, "--save_dir", str(tmp_path), *FAST]) == 0
    out = capsys.readouterr().out
    assert "head: logistic regression on " in out and " over 5 folds of train+valid" in out
    assert "epoch 1/" not in out
    assert "test acc " in out
    assert os.path.isfile(tmp_path / "checkpoint.pth")
    assert not os.path.exists(tmp_path / "history.csv")  # no epochs, no history


def test_adamw_head_prints_epochs(tmp_path, image_folder, capsys):
    assert train.main([image_folder, "--save_dir", str(tmp_path), *FAST, *EPOCHS, "--head", "adamw"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/4  train loss " in out and "valid acc " in out
    assert "test acc " in out
    assert os.path.isfile(tmp_path / "history.csv")


def test_hidden_layers_train_by_epochs(tmp_path, image_folder, capsys):
    assert train.main([image_folder, "--save_dir", str(tmp_path), *FAST, *EPOCHS,
                       "--hidden_units", "8"]) == 0
    assert "epoch 1/4  train loss " in capsys.readouterr().out
    assert train.main([image_folder, *FAST, "--hidden_units", "8", "--head", "logistic"]) == 2
    assert "use --head adamw" in capsys.readouterr().err


def test_balance_weighs_the_logistic_head(tmp_path, image_folder, capsys):
    cats = sorted(os.listdir(os.path.join(image_folder, "train", "cat")))
    for name in cats[: len(cats) // 2]:  # half as many cats: the classes differ in weight
        os.remove(os.path.join(image_folder, "train", "cat", name))
    assert train.main([image_folder, "--save_dir", str(tmp_path / "a"), *FAST]) == 0
    assert train.main([image_folder, "--save_dir", str(tmp_path / "b"), *FAST, "--balance",
                       "--cache_dir", str(tmp_path / "a" / "cache")]) == 0
    plain = torch.load(tmp_path / "a" / "checkpoint.pth", weights_only=True)
    balanced = torch.load(tmp_path / "b" / "checkpoint.pth", weights_only=True)
    assert balanced["args"]["balance"] is True
    assert not torch.equal(plain["state_dict"]["head.1.bias"],
                           balanced["state_dict"]["head.1.bias"])
