"""The Python API (imgclf.train, imgclf.load, Classifier.predict/evaluate/export), in process
and from a folder outside the repository."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import imgclf
from conftest import ROOT, draw_sample, make_image_folder


@pytest.fixture(scope="module")
def classifier(trained):
    return imgclf.load(trained["checkpoint"])


def test_import_imgclf_does_not_import_torch():
    code = "import sys, imgclf; print('torch' in sys.modules, imgclf.__version__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.stdout.split()[0] == "False", done.stderr


def test_train_returns_a_classifier_and_writes_the_files(tmp_path):
    data = make_image_folder(tmp_path / "data")
    clf = imgclf.train(data, save_dir=tmp_path / "run", image_size=64, aug_views=1, workers=0)
    assert isinstance(clf, imgclf.Classifier)
    assert clf.classes == ["cat", "dog", "fox"]
    assert os.path.isfile(tmp_path / "run" / "checkpoint.pth")
    assert os.path.isfile(tmp_path / "run" / "report" / "metrics.json")
    [result] = clf.predict(os.path.join(data, "test", "dog", "000.jpg"), top_k=2)
    assert [name for name, _ in result.top][0] == "dog"
    # The default head's unknown verdict, as predict.py gives it
    assert isinstance(clf.unknown_threshold, float) and isinstance(result.novelty, float)
    assert result.unknown is (result.novelty > clf.unknown_threshold)
    grey = np.full((48, 48, 3), 128, np.uint8)
    [flat] = clf.predict(grey)
    assert flat.novelty > result.novelty
    clf.unknown_threshold = float("-inf")
    assert all(r.unknown for r in clf.predict([grey, draw_sample(1, 3)]))
    metrics = clf.evaluate(os.path.join(data, "test"))
    assert metrics["unknown"]["share"] == 1.0 and 0 <= metrics["ece"] <= 1


def test_an_unknown_or_bad_option_is_a_user_error(tmp_path):
    with pytest.raises(imgclf.UserError, match="learnig_rate=: not an option"):
        imgclf.train(tmp_path, learnig_rate=0.1)
    with pytest.raises(imgclf.UserError, match="--epochs: invalid int value: 'many'"):
        imgclf.train(tmp_path, epochs="many")


def test_predict_takes_paths_folders_pil_images_and_arrays(classifier, trained):
    test = os.path.join(trained["data"], "test")
    photo = os.path.join(test, "cat", "000.jpg")
    pil = Image.open(photo)
    results = classifier.predict([photo, os.path.join(test, "dog"), pil, np.asarray(pil)],
                                 top_k=3)
    dogs = sorted(os.listdir(os.path.join(test, "dog")))
    assert len(results) == 3 + len(dogs)
    assert results[0].path == photo and len(results[0].top) == 3
    assert [r.path for r in results[1:-2]] == [os.path.join(test, "dog", f) for f in dogs]
    # The same photo as a path, a PIL image and an array: the same answer.
    by_path = results[0].probabilities
    for in_memory in results[-2:]:
        assert in_memory.path is None and in_memory.error is None
        np.testing.assert_allclose(in_memory.probabilities, by_path, atol=1e-5)
    probs = [p for _, p in results[0].top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001


def test_a_bad_file_gives_an_error_not_an_exception(classifier, trained, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    good = os.path.join(trained["data"], "test", "fox", "000.jpg")
    bad, missing, fine = classifier.predict([broken, tmp_path / "gone.jpg", good])
    assert bad.top == [] and "cannot be read" in bad.error and str(broken) in bad.error
    assert "no such file" in missing.error
    assert fine.error is None and fine.top


def test_a_float_array_is_refused_in_one_line(classifier):
    with pytest.raises(imgclf.UserError, match="dtype float64: give uint8 pixels"):
        classifier.predict(np.zeros((32, 32, 3)))


def test_a_prediction_shows_as_a_table_with_its_photo_in_a_notebook(classifier):
    [result] = classifier.predict(draw_sample(0, 1))
    page = result._repr_html_()
    assert page.startswith("<table>") and "data:image/png;base64," in page
    assert result.top[0][0] in page


def test_evaluate_returns_the_metrics_the_report_writes(classifier, trained, tmp_path):
    test = os.path.join(trained["data"], "test")
    metrics = classifier.evaluate(test, report_dir=tmp_path / "report")
    with open(tmp_path / "report" / "metrics.json") as f:
        assert json.load(f) == json.loads(json.dumps(metrics))
    assert metrics["images"] == 12 and 0 <= metrics["accuracy"] <= 1
    # the epoch head has the unknown verdict too: how many test photos it would call unknown
    assert 0 <= metrics["unknown"]["count"] <= 12
    with pytest.raises(imgclf.UserError, match="class folder\\(s\\) the checkpoint does not know"):
        classifier.evaluate(trained["data"])


def test_export_writes_an_onnx_that_loads_and_agrees(classifier, trained, tmp_path):
    pytest.importorskip("onnxruntime", reason="export needs the [export] extra")
    path = classifier.export(tmp_path / "model.onnx")
    onnx = imgclf.load(path)
    photo = os.path.join(trained["data"], "test", "dog", "001.jpg")
    [a], [b] = classifier.predict(photo), onnx.predict(photo)
    assert a.top[0][0] == b.top[0][0]
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=2e-2)
    with pytest.raises(imgclf.UserError, match="already an ONNX model"):
        onnx.export(tmp_path / "again.onnx")


def test_the_api_works_from_a_folder_outside_the_repository(trained, tmp_path):
    photo = os.path.join(trained["data"], "test", "cat", "001.jpg")
    code = ("import imgclf; clf = imgclf.load(%r); [r] = clf.predict(%r, top_k=1); "
            "print(r.top[0][0], imgclf.__file__)" % (trained["checkpoint"], photo))
    env = {**os.environ, "PYTHONPATH": ROOT}  # this checkout's package, as if installed
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    name, path = done.stdout.split()
    assert name in ("cat", "dog", "fox") and path.startswith(os.path.join(ROOT, "imgclf"))
