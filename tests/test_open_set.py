"""The unknown verdict (heads/novelty.py) and calibration (analysis/calibration.py): what the
checkpoint carries, what predict, the export and the report say, and the numbers by hand."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from conftest import FAST, make_image_folder
from PIL import Image

from imgclf.analysis import calibration
from imgclf.heads import novelty


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small run of the default (logistic) head, and two photos unlike its classes."""
    from imgclf.cli import train
    base = tmp_path_factory.mktemp("open_set")
    data = make_image_folder(base / "data")
    save = base / "run"
    assert train.main([data, "--save_dir", str(save), *FAST]) == 0
    noise = str(base / "noise.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), np.uint8)).save(noise)
    flat = str(base / "flat.png")
    Image.new("RGB", (48, 48), (128, 128, 128)).save(flat)
    return dict(data=data, save=save, checkpoint=str(save / "checkpoint.pth"), noise=noise,
                flat=flat, known=os.path.join(data, "test", "dog", "000.jpg"), base=base)


def predict_json(capsys, *argv):
    from imgclf.cli import predict
    capsys.readouterr()
    assert predict.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_checkpoint_carries_the_novelty_data_and_threshold(run):
    ckpt = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    entry = ckpt["novelty"]
    assert novelty.entry_problem(entry) == ""
    photos = sum(ckpt["data"]["counts"][s] for s in ("train", "valid"))
    assert entry["photos"] == photos == len(entry["bank"])
    assert entry["bank"].dtype == torch.float16
    assert np.isfinite(entry["threshold"]) and entry["keep"] == novelty.KEEP
    assert ckpt["metrics"]["unknown_threshold"] == entry["threshold"]
    assert ckpt["metrics"]["temperature"] > 0


def test_unlike_photos_are_unknown_and_training_like_ones_known(run, capsys):
    answers = predict_json(capsys, run["noise"], run["flat"], run["known"], run["checkpoint"])
    assert [a["unknown"] for a in answers] == [True, True, False]
    assert all(isinstance(a["novelty"], float) for a in answers)
    assert answers[0]["novelty"] > answers[2]["novelty"]
    assert answers[0]["predictions"]  # the top K is still given


def test_predict_prints_the_verdict_under_the_top_k(run, capsys):
    from imgclf.cli import predict
    capsys.readouterr()
    assert predict.main([run["noise"], run["checkpoint"], "--top_k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(" 1. ") and lines[1].startswith(" 2. ")
    assert lines[2].startswith("verdict: unknown - unlike the training photos of every class")


def test_csv_has_the_unknown_and_novelty_columns(run, capsys, tmp_path):
    from imgclf.cli import predict
    out = tmp_path / "out.csv"
    assert predict.main([run["noise"], run["known"], run["checkpoint"], "--top_k", "1",
                         "--csv", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["unknown"] for r in rows] == ["1", "0"]
    assert float(rows[0]["novelty"]) > float(rows[1]["novelty"])


def test_unknown_threshold_overrides_and_refuses_a_bad_value(run, capsys):
    from imgclf.cli import predict
    answers = predict_json(capsys, run["noise"], run["known"], run["checkpoint"],
                           "--unknown_threshold", "1e6")
    assert [a["unknown"] for a in answers] == [False, False]
    answers = predict_json(capsys, run["noise"], run["known"], run["checkpoint"],
                           "--unknown_threshold=-1e6")  # "=": a negative value
    assert [a["unknown"] for a in answers] == [True, True]
    assert predict.main([run["known"], run["checkpoint"], "--unknown_threshold", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --unknown_threshold abc: not a finite number") and \
        err.count("\n") == 1


def test_a_checkpoint_without_novelty_data_still_predicts(run, capsys, tmp_path):
    from imgclf.cli import predict
    ckpt = torch.load(run["checkpoint"], map_location="cpu", weights_only=True)
    del ckpt["novelty"]
    old = str(tmp_path / "old.pth")
    torch.save(ckpt, old)
    capsys.readouterr()
    assert predict.main([run["noise"], run["known"], old, "--json"]) == 0
    out, err = capsys.readouterr()
    answers = json.loads(out)
    assert all("unknown" not in a and "novelty" not in a for a in answers)
    assert err.count("has no novelty data") == 1
    assert predict.main([run["known"], old, "--unknown_threshold", "2"]) == 2
    assert "--unknown_threshold: " in capsys.readouterr().err


def test_the_onnx_export_gives_the_same_novelty(run, capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    from imgclf.app import inference
    from imgclf.cli import export
    path = str(tmp_path / "model.onnx")
    assert export.main([run["checkpoint"], "--out", path]) == 0
    assert "novelty (the unknown verdict's score): max |difference|" in capsys.readouterr().out
    onnx_answers = predict_json(capsys, run["noise"], run["known"], path)
    torch_answers = predict_json(capsys, run["noise"], run["known"], run["checkpoint"],
                                 "--precision", "fp32")
    for a, b in zip(onnx_answers, torch_answers):
        assert a["unknown"] == b["unknown"]
        assert abs(a["novelty"] - b["novelty"]) < 1e-3
    assert inference.load_predictor(path).unknown_threshold == pytest.approx(
        torch.load(run["checkpoint"], weights_only=True)["novelty"]["threshold"])


def test_the_report_has_the_calibration_error_and_diagram(run, capsys, tmp_path):
    report = run["save"] / "report"
    png = report / "calibration.png"
    assert png.is_file() and Image.open(png).size[0] > 300
    metrics = json.load(open(report / "metrics.json"))
    assert 0 <= metrics["ece"] <= 1
    assert metrics["unknown"]["count"] == round(metrics["unknown"]["share"] * metrics["images"])
    from imgclf.cli import predict
    out = tmp_path / "eval"
    assert predict.main([os.path.join(run["data"], "test"), run["checkpoint"], "--evaluate",
                         "--report_dir", str(out)]) == 0
    assert "called unknown (novelty above" in capsys.readouterr().out
    assert (out / "calibration.png").is_file()


def test_ece_by_hand():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 0, 0, 1])  # right at 0.9, wrong at 0.8, right at 0.6 and 0.7
    # 15 bins: each photo alone in its bin: (0.1 + 0.8 + 0.4 + 0.3) / 4
    assert calibration.expected_calibration_error(probs, labels) == pytest.approx(0.4)
    # 2 bins: all four in (0.5, 1]: accuracy 3/4 against mean confidence 0.75
    assert calibration.expected_calibration_error(probs, labels, bins=2) == pytest.approx(0.0)


def test_ece_if_calibrated_is_what_a_calibrated_model_measures():
    rng = np.random.default_rng(2)
    probs = calibration.softmax(rng.normal(size=(300, 5)) * 2)
    # labels drawn from the probabilities themselves: a perfectly calibrated model
    measured = [calibration.expected_calibration_error(
        probs, np.array([rng.choice(5, p=p) for p in probs])) for _ in range(100)]
    expected = calibration.ece_if_calibrated(probs)
    assert expected == pytest.approx(np.mean(measured), rel=0.15)
    assert expected > 0.02  # 300 photos: far from 0 even when perfectly calibrated
    many = calibration.softmax(rng.normal(size=(30000, 5)) * 2)
    assert calibration.ece_if_calibrated(many) < expected / 5


def test_temperature_scaling_undoes_overconfidence():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 5)) * 2
    labels = np.array([rng.choice(5, p=p) for p in calibration.softmax(true_logits)])
    temperature, before, after = calibration.fit_temperature(3 * true_logits, labels)
    assert temperature == pytest.approx(3, rel=0.15)
    assert after < before / 2


def test_temperature_of_calibrated_logits_is_near_1_times_the_heads_scale():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4000, 5)) * 2
    labels = np.array([rng.choice(5, p=p) for p in calibration.softmax(logits)])
    alone = calibration.fit_temperature(logits, labels)[0]
    assert alone == pytest.approx(1, abs=0.05)
    # for a head whose logits are 1.2x these (fitted on more photos), 1.2x that temperature
    assert calibration.fit_temperature(logits, labels, 1.2)[0] == pytest.approx(1.2 * alone)


def test_kth_similarity_leaves_each_photo_itself_out():
    rows = novelty.unit_rows(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    # photo 0's nearest other photo is its copy (cosine 1), photo 2's is at cosine 0
    kth = novelty.kth_similarity(rows, rows, 1, self_index=np.arange(3))
    assert kth.tolist() == pytest.approx([1.0, 1.0, 0.0])


def test_the_bank_is_capped_with_each_class_share_kept():
    labels = np.repeat([0, 1], [300, 100])
    index = novelty.bank_photos(labels, 100)
    assert len(index) == 100 and (labels[index] == 0).sum() == 75
    assert len(novelty.bank_photos(labels, 1000)) == 400


def test_the_verdict_reuses_the_cross_validations_held_out_logits(tmp_path, monkeypatch):
    """The calibration and the novelty's references come from the logits the head's cross-
    validation kept: no out-of-fold fits after the head (there were 5)."""
    from imgclf.cli import train
    from imgclf.heads import linear_probe
    fitted = []
    refit = linear_probe.out_of_fold_fits
    monkeypatch.setattr(linear_probe, "out_of_fold_fits",
                        lambda *a, **k: fitted.append(1) or refit(*a, **k))
    data = make_image_folder(tmp_path / "data")
    assert train.main([data, "--save_dir", str(tmp_path / "run"), *FAST]) == 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pth", weights_only=True)
    assert novelty.entry_problem(ckpt[novelty.CHECKPOINT_KEY]) == "" and not fitted
