"""The evaluation report: its numbers against scikit-learn, and its pictures."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import draw_sample
from imgclf.analysis import data_issues, plots, report


def decodes(path):
    with Image.open(path) as img:
        img.load()
        return img.size


def one_hot_probs(pred, num_classes, confidence):
    probs = np.full((len(pred), num_classes), (1 - confidence) / (num_classes - 1))
    probs[np.arange(len(pred)), pred] = confidence
    return probs


def test_metrics_match_scikit_learn():
    metrics_lib = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 300)
    labels[labels == 6] = 5  # class 6 never appears: its scores stay out of the macro mean
    probs = rng.random((300, 7)) + 2.0 * np.eye(7)[labels] * (rng.random(300) > 0.4)[:, None]
    probs /= probs.sum(1, keepdims=True)
    m = report.compute_metrics(probs, labels, 7)
    pred = probs.argmax(1)
    p, r, f, s = metrics_lib.precision_recall_fscore_support(labels, pred, labels=range(7),
                                                             zero_division=0)
    assert m["precision"] == pytest.approx(p) and m["recall"] == pytest.approx(r)
    assert m["f1"] == pytest.approx(f) and list(m["support"]) == list(s)
    assert m["accuracy"] == pytest.approx(metrics_lib.accuracy_score(labels, pred))
    assert m["top5_accuracy"] == pytest.approx(
        metrics_lib.top_k_accuracy_score(labels, probs, k=5, labels=range(7)))
    assert (m["confusion"] == metrics_lib.confusion_matrix(labels, pred, labels=range(7))).all()
    assert m["macro"]["f1"] == pytest.approx(f[:6].mean())


def test_most_confident_mistakes_come_first():
    labels = np.array([0, 1, 2, 0, 1])
    probs = one_hot_probs(np.array([1, 1, 0, 2, 1]), 3, 0.6)
    probs[0] = [0.05, 0.9, 0.05]   # wrong, 90% sure
    probs[3] = [0.2, 0.1, 0.7]     # wrong, 70% sure
    assert report.confident_mistakes(probs, labels) == [0, 3, 2]


@pytest.fixture
def photos(tmp_path):
    paths = []
    for i in range(30):
        path = tmp_path / "photos" / f"c{i % 5}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_sample(i % 5, i, size=96).save(path)
        paths.append(str(path))
    return paths


def write_example(out_dir, photos, num_classes, history=None):
    rng = np.random.default_rng(1)
    n = len(photos)
    labels = np.arange(n) % num_classes
    pred = np.where(rng.random(n) < 0.7, labels, rng.integers(0, num_classes, n))
    probs = one_hot_probs(pred, num_classes, 0.5) + rng.random((n, num_classes)) * 0.01
    classes = [str(i + 1) for i in range(num_classes)]
    names = [f"flower number {i + 1} with a long name" for i in range(num_classes)]
    return report.write_report(str(out_dir), probs, labels, classes, names, photos, history)


def test_write_report_files(tmp_path, photos):
    history = [dict(epoch=e, train_loss=1 / e, valid_loss=1.2 / e, valid_acc=0.5 + e / 20)
               for e in range(1, 8)]
    summary = write_example(tmp_path / "rep", photos, 5, history)
    names = sorted(os.listdir(tmp_path / "rep"))
    assert names == sorted(report.REPORT_FILES.values())
    for key in ("confusion", "mistakes", "curves"):
        decodes(summary["files"][key])
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert set(doc) == {"images", "accuracy", "top5_accuracy", "macro", "per_class",
                        "confusion_matrix", "ece", "ece_if_calibrated"}
    assert doc["images"] == 30 and len(doc["per_class"]) == 5
    assert set(doc["per_class"][0]) == {"class", "name", "precision", "recall", "f1", "support"}
    assert np.array(doc["confusion_matrix"]["counts"]).sum() == 30
    text = (tmp_path / "rep" / "report.txt").read_text().splitlines()
    assert text[0].startswith("images 30   accuracy ")
    assert text[2].split() == ["class", "precision", "recall", "f1", "support"]
    assert len(text) == 3 + 5 + 1 + 2  # + a blank line and the calibration error
    assert text[-1].startswith("expected calibration error ")
    assert 0 <= doc["ece"] <= 1 and 0 < doc["ece_if_calibrated"] < 1
    decodes(summary["files"]["calibration"])
    lines = report.summary_lines(summary)
    assert lines[0].startswith("evaluated 30 images: accuracy ")


def test_confusion_matrix_grows_with_102_classes(tmp_path, photos):
    small = write_example(tmp_path / "five", photos, 5)
    large = write_example(tmp_path / "many", photos * 4, 102)
    w5, h5 = decodes(small["files"]["confusion"])
    w102, h102 = decodes(large["files"]["confusion"])
    # Room for 102 rows of 7-point names: at least 14 pixels per class each way.
    assert w102 > 102 * 14 and h102 > 102 * 14 and w102 > 2 * w5
    assert "curves" not in large["files"]


def test_no_mistakes_still_draws_a_picture(tmp_path, photos):
    labels = np.arange(len(photos)) % 5
    summary = report.write_report(str(tmp_path), one_hot_probs(labels, 5, 0.9), labels,
                                  list("abcde"), list("abcde"), photos)
    assert summary["metrics"]["accuracy"] == 1.0
    decodes(summary["files"]["mistakes"])


def test_plot_curves_and_predictions(tmp_path, photos):
    history = [dict(epoch=1, train_loss=1.0, valid_loss=0.9, valid_acc=0.6)]
    plots.plot_curves(history, str(tmp_path / "curves.png"))
    decodes(tmp_path / "curves.png")
    shown = [(p, ["a rose", "a very long flower name that wraps", "daisy"], [0.8, 0.15, 0.05])
             for p in photos[:5]]
    plots.plot_predictions(str(tmp_path / "grid.png"), shown)
    decodes(tmp_path / "grid.png")


def test_training_writes_its_report_beside_the_checkpoint(trained):
    folder = os.path.join(trained["save_dir"], "report")
    written = set(os.listdir(folder))
    assert data_issues.CSV_NAME in written  # and its picture where it found something
    assert written - {data_issues.CSV_NAME, data_issues.PNG_NAME} == \
        set(report.REPORT_FILES.values())
    for name in ("confusion_matrix.png", "mistakes.png", "curves.png"):
        decodes(os.path.join(folder, name))
    doc = json.loads(open(os.path.join(folder, "metrics.json")).read())
    assert doc["images"] == 12  # the test split of the generated folder
