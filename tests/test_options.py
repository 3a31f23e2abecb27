"""train.py's options: the range checks of check_options, and the defaults that
TrainConfig.from_options decides once."""
import dataclasses
import sys

import pytest

import train
import training
from errors import UserError


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
    head = training.TrainConfig.from_options(options())
    assert (head.epochs, head.learning_rate, head.head_learning_rate) == \
        (None, training.HEAD_LR, training.HEAD_LR)
    tune = training.TrainConfig.from_options(options("--finetune"))
    assert (tune.epochs, tune.learning_rate) == (5, training.FINETUNE_LR)
    assert tune.probe() == dataclasses.replace(tune, head="adamw", aug_views=0, epochs=None,
                                               finetune=False, learning_rate=training.HEAD_LR)
    assert (head.head, head.aug_views) == ("logistic", None)  # None: linear_probe decides
    hidden = training.TrainConfig.from_options(options("--hidden_units", "8"))
    assert (hidden.head, hidden.aug_views) == ("adamw", 1)
    given = training.TrainConfig.from_options(options("--finetune", "--learning_rate", "0.01",
                                                      "--epochs", "2"))
    assert (given.epochs, given.learning_rate, given.probe().learning_rate) == (2, 0.01, 0.01)


def test_config_defaults_are_the_command_lines():
    """Tests and tools build a TrainConfig without the parser: the same defaults."""
    assert training.TrainConfig.from_options(options("--demo")) == \
        training.TrainConfig(data_dir="data", demo=True)


def test_the_checkpoint_records_the_options_as_before():
    """ckpt["args"] keeps its keys and values: the head's default rate and --finetune's
    default epochs filled in, --finetune's rate None when not given."""
    args = options("--finetune")
    record = train.recorded_options(args, training.TrainConfig.from_options(args))
    assert record == {**vars(args), "epochs": 5, "learning_rate": None, "head": "logistic"}
    args = options()
    record = train.recorded_options(args, training.TrainConfig.from_options(args))
    assert record == {**vars(args), "learning_rate": training.HEAD_LR, "head": "logistic"}
    args = options("--head", "adamw")
    record = train.recorded_options(args, training.TrainConfig.from_options(args))
    assert record == {**vars(args), "learning_rate": training.HEAD_LR, "aug_views": 1}


@pytest.mark.parametrize("argv0, start", [
    ("/home/me/.venv/bin/imgclf-train", "imgclf-train data "),
    ("train.py", "python train.py data "),
])
def test_the_resume_command_is_the_one_the_run_was_started_with(monkeypatch, argv0, start):
    monkeypatch.setattr(sys, "argv", [argv0])
    command = train.resume_command(vars(options("--epochs", "7")), "out/ckpt.pth")
    assert command == start + "--epochs 7 --resume out/ckpt.pth"
