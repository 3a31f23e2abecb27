"""train.py's options: the range checks of check_options, and the defaults that
TrainConfig.from_options decides once."""
import dataclasses
import sys

import pytest
import torch

from conftest import FAST
from imgclf.cli import train
from imgclf.engine import train_config
from imgclf.errors import UserError
from imgclf.heads import linear_probe


def options(*argv):
    return train.build_parser().parse_args(["data", *argv])


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], r"^--epochs 0: must be greater than 0$"),
    (["--batch_size", "-1"], r"^--batch_size -1: must be greater than 0$"),
    (["--learning_rate", "0"], r"^--learning_rate 0.0: must be greater than 0$"),
    (["--image_size", "0"], r"^--image_size 0: must be greater than 0$"),
    (["--dropout", "1"], r"^--dropout 1.0: must be in \[0, 1\)$"),
    (["--dropout", "-0.1"], r"^--dropout -0.1: must be in \[0, 1\)$"),
    (["--aug_views", "-1"], r"^--aug_views and --patience must be 0 or more$"),
    (["--patience", "-1"], r"^--aug_views and --patience must be 0 or more$"),
    (["--split", "0", "0.5", "0.5"], r"^--split 0.0 0.5 0.5: train and valid fractions must "
                                     r"be above 0"),
    (["--split", "0.8", "0", "0.2"], r"^--split 0.8 0.0 0.2: train and valid fractions"),
    (["--split", "0.8", "0.3", "-0.1"], r"^--split 0.8 0.3 -0.1: train and valid fractions"),
])
def test_check_options_refuses_values_out_of_range(argv, message):
    with pytest.raises(UserError, match=message):
        train.check_options(options(*argv))


def test_check_options_needs_a_data_dir_or_the_demo():
    with pytest.raises(UserError, match=r"^no DATA_DIR given; .* python train.py --demo$"):
        train.check_options(train.build_parser().parse_args([]))
    train.check_options(train.build_parser().parse_args(["--demo"]))


def test_check_options_accepts_the_edges_of_the_ranges():
    train.check_options(options("--dropout", "0", "--aug_views", "0", "--patience", "0",
                                "--split", "0.9", "0.1", "0"))


def test_main_turns_a_range_error_into_one_line_and_status_2(capsys):
    assert train.main(["data", "--epochs", "0"]) == 2
    assert capsys.readouterr().err == "error: --epochs 0: must be greater than 0\n"


def test_config_decides_the_defaults_of_each_mode():
    head = train_config.TrainConfig.from_options(options())
    assert (head.epochs, head.learning_rate, head.head_learning_rate) == \
        (None, train_config.HEAD_LR, train_config.HEAD_LR)
    tune = train_config.TrainConfig.from_options(options("--finetune"))
    assert (tune.epochs, tune.learning_rate) == (5, train_config.FINETUNE_LR)
    assert tune.probe() == dataclasses.replace(tune, head="adamw", aug_views=0, epochs=None,
                                               finetune=False, learning_rate=train_config.HEAD_LR)
    assert (head.head, head.aug_views) == ("logistic", None)  # None: linear_probe decides
    hidden = train_config.TrainConfig.from_options(options("--hidden_units", "8"))
    assert (hidden.head, hidden.aug_views) == ("adamw", 1)
    given = train_config.TrainConfig.from_options(options("--finetune", "--learning_rate", "0.01",
                                                      "--epochs", "2"))
    assert (given.epochs, given.learning_rate, given.probe().learning_rate) == (2, 0.01, 0.01)


def test_config_defaults_are_the_command_lines():
    """Tests and tools build a TrainConfig without the parser: the same defaults."""
    assert train_config.TrainConfig.from_options(options("--demo")) == \
        train_config.TrainConfig(data_dir="data", demo=True)


# What ckpt["args"] held for options left out, when the parser's defaults were these values.
RECORDED_DEFAULTS = dict(split=[0.7, 0.1, 0.2], dropout=0.2, weight_decay=1e-4,
                         label_smoothing=0.1, batch_size=64, patience=10)


def test_the_checkpoint_records_the_options_as_before():
    """ckpt["args"] keeps its keys and values: the defaults, the head's default rate and
    --finetune's default epochs filled in, --finetune's rate None when not given."""
    args = options("--finetune")
    record = train.recorded_options(args, train_config.TrainConfig.from_options(args))
    assert record == {**vars(args), **RECORDED_DEFAULTS, "epochs": 5, "learning_rate": None,
                      "head": "logistic"}
    args = options()
    record = train.recorded_options(args, train_config.TrainConfig.from_options(args))
    assert record == {**vars(args), **RECORDED_DEFAULTS, "learning_rate": train_config.HEAD_LR,
                      "head": "logistic"}
    args = options("--head", "adamw")
    record = train.recorded_options(args, train_config.TrainConfig.from_options(args))
    assert record == {**vars(args), **RECORDED_DEFAULTS, "learning_rate": train_config.HEAD_LR,
                      "aug_views": 1}


@pytest.mark.parametrize("argv0, start", [
    ("/home/me/.venv/bin/imgclf-train", "imgclf-train data "),
    ("train.py", "python train.py data "),
])
def test_the_resume_command_is_the_one_the_run_was_started_with(monkeypatch, argv0, start):
    monkeypatch.setattr(sys, "argv", [argv0])
    command = train.resume_command(vars(options("--epochs", "7")), "out/ckpt.pth")
    assert command == start + "--epochs 7 --resume out/ckpt.pth"


def test_the_resume_command_leaves_out_the_defaults_the_checkpoint_records(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    args = options("--dropout", "0.3")
    record = train.recorded_options(args, train_config.TrainConfig.from_options(args))
    assert train.resume_command(record, "c.pth") == \
        "python train.py data --head adamw --aug_views 1 --dropout 0.3 --resume c.pth"


# ---------------------------------------------------------------------------------------------
# Options of epoch training typed with the default head
# ---------------------------------------------------------------------------------------------
EPOCH_OPTIONS = [["--epochs", "3"], ["--learning_rate", "0.01"], ["--batch_size", "32"],
                 ["--dropout", "0.3"], ["--weight_decay", "0.001"],
                 ["--label_smoothing", "0.05"], ["--patience", "3"]]


@pytest.mark.parametrize("argv", EPOCH_OPTIONS, ids=lambda a: a[0])
def test_an_option_of_epoch_training_selects_the_epoch_head_and_takes_effect(argv, capsys):
    args = options(*argv)
    config = train_config.TrainConfig.from_options(args)
    name, value = argv[0][2:], type(getattr(config, argv[0][2:]))(argv[1])
    assert (config.head, config.aug_views, getattr(config, name)) == ("adamw", 1, value)
    assert train.epoch_head_note(args) == (
        f"options of epoch training ({argv[0]}) given: training the head by epochs (--head "
        f"adamw); drop them for the default cross-validated logistic head")


@pytest.mark.parametrize("argv", EPOCH_OPTIONS, ids=lambda a: a[0])
def test_an_option_of_epoch_training_with_the_logistic_head_is_refused(argv):
    with pytest.raises(UserError, match=rf"^{argv[0]}: the logistic head is fitted without "
                                        rf"epochs and does not read it; use --head adamw, or "
                                        rf"drop {argv[0]}$"):
        train.check_options(options(*argv, "--head", "logistic"))


@pytest.mark.parametrize("argv", EPOCH_OPTIONS, ids=lambda a: a[0])
def test_options_of_epoch_training_with_finetune_keep_the_default_head(argv):
    """--finetune trains by epochs itself; its fallback is the default head."""
    args = options(*argv, "--finetune")
    train.check_options(options(*argv, "--finetune", "--head", "logistic"))
    assert train_config.TrainConfig.from_options(args).head == "logistic"


def test_no_note_where_hidden_layers_choose_the_epoch_head():
    args = options("--hidden_units", "8", "--epochs", "3")
    assert train_config.epoch_options_choosing_the_head(args) == []
    assert train_config.TrainConfig.from_options(args).head == "adamw"


def test_demo_with_a_data_dir_is_refused():
    with pytest.raises(UserError, match=r"^--demo trains on the bundled handwritten digits, "
                                        r"not on data; drop DATA_DIR or --demo$"):
        train.check_options(options("--demo"))


def test_check_refuses_the_options_of_training():
    train.check_options(options("--check", "--split", "0.8", "0.1", "0.1", "--workers", "2",
                                "--category_names", "names.json", "--seed", "3"))
    with pytest.raises(UserError, match=r"^--arch: --check reports on the data and trains "
                                        r"nothing; drop --arch, --finetune, --epochs, or drop "
                                        r"--check$"):
        train.check_options(options("--check", "--arch", "vgg16", "--epochs", "3",
                                    "--finetune"))


def test_the_default_head_without_epoch_options_is_the_logistic_one():
    config = train_config.TrainConfig.from_options(options("--aug_views", "2", "--balance"))
    assert (config.head, config.aug_views, config.balance) == ("logistic", 2, True)


def test_typed_epoch_options_train_by_epochs_and_say_so(tmp_path, image_folder, capsys):
    assert train.main([image_folder, "--save_dir", str(tmp_path), *FAST, "--epochs", "2",
                       "--learning_rate", "0.01"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        "options of epoch training (--epochs, --learning_rate) given: training the head by "
        "epochs (--head adamw); drop them for the default cross-validated logistic head")
    assert "epoch 1/2  train loss " in out and "epoch 2/2  train loss " in out
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (ckpt["args"]["head"], ckpt["args"]["learning_rate"]) == ("adamw", 0.01)


def test_main_refuses_epoch_options_with_the_logistic_head_in_one_line(capsys):
    assert train.main(["data", "--head", "logistic", "--patience", "3"]) == 2
    assert capsys.readouterr().err == (
        "error: --patience: the logistic head is fitted without epochs and does not read it; "
        "use --head adamw, or drop --patience\n")


# ---------------------------------------------------------------------------------------------
# The other options that a mode would not read
# ---------------------------------------------------------------------------------------------
def test_always_augment_stores_augmented_views_for_any_data_set():
    """The logistic head stores no augmented views unless asked; --always_augment asks for
    them, so they are stored."""
    config = train_config.TrainConfig.from_options(options("--always_augment"))
    assert config.aug_views == linear_probe.AUG_VIEWS


def test_always_augment_with_no_augmented_views_is_refused():
    with pytest.raises(UserError, match=r"^--always_augment: --aug_views 0 stores no "
                                        r"augmented views to train on; give --aug_views 1 or "
                                        r"more, or drop --always_augment$"):
        train.check_options(options("--always_augment", "--aug_views", "0"))


def test_split_with_split_folders_is_refused(image_folder, tmp_path, capsys):
    assert train.main([image_folder, "--save_dir", str(tmp_path), "--split", "0.8", "0.1",
                       "0.1", "--workers", "0"]) == 2
    line = capsys.readouterr().err.splitlines()[-1]  # after the scan's progress bar
    assert line.startswith("error: --split 0.8 0.1 0.1: ") and \
        line.endswith("has train/ and valid/ folders of its own, which are used as they are; "
                      "drop --split")
