"""predict.py on many images: folders, globs, JSON, CSV, plots, --evaluate, and its errors."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, draw_sample
from imgclf.app import inference
from imgclf.cli import predict

CLASSES = ["cat", "dog", "fox"]


def run_predict(capsys, *argv):
    capsys.readouterr()
    status = predict.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def decodes(path):
    with Image.open(path) as img:
        img.load()
        return img.size


@pytest.fixture
def test_dir(trained):
    return os.path.join(trained["data"], "test")


@pytest.fixture
def bad_files(tmp_path, test_dir):
    """A missing path, a text file named .jpg and a JPEG cut short."""
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("these are not pixels")
    truncated = tmp_path / "cut.jpg"
    with open(os.path.join(test_dir, "dog", "001.jpg"), "rb") as f:
        truncated.write_bytes(f.read()[:400])
    return dict(missing=tmp_path / "nowhere.jpg", not_image=not_image, truncated=truncated)


# ---------------------------------------------------------------------------------------------
# Output formats
# ---------------------------------------------------------------------------------------------
def test_folder_json_schema(trained, test_dir, capsys):
    status, out, _ = run_predict(capsys, test_dir, trained["checkpoint"], "--json", "--top_k", 2)
    assert status == 0
    doc = json.loads(out)
    assert isinstance(doc, list) and len(doc) == 12  # 3 classes x 4 test images, recursively
    assert [d["image"] for d in doc] == sorted(d["image"] for d in doc)
    for entry in doc:
        assert set(entry) == {"image", "predictions", "unknown", "novelty"}
        assert os.path.isfile(entry["image"])
        assert isinstance(entry["unknown"], bool) and isinstance(entry["novelty"], float)
        preds = entry["predictions"]
        assert len(preds) == 2
        for p in preds:
            assert set(p) == {"class", "name", "probability"}
            assert p["class"] in CLASSES and p["name"] == p["class"]
            assert isinstance(p["probability"], float) and 0 <= p["probability"] <= 1
        assert preds[0]["probability"] >= preds[1]["probability"]
        assert preds[0]["class"] != preds[1]["class"]


def test_human_output_for_many_images(trained, test_dir, capsys):
    status, out, _ = run_predict(capsys, os.path.join(test_dir, "cat"), trained["checkpoint"],
                                 "--top_k", 2)
    assert status == 0
    lines = out.rstrip("\n").split("\n")
    assert len(lines) == 4 * 4  # the path, the top 2, the unknown verdict
    for i in range(0, len(lines), 4):
        assert lines[i].endswith(".jpg") and os.path.isfile(lines[i])
        assert lines[i + 1].startswith("   1. ") and lines[i + 2].startswith("   2. ")
        assert lines[i + 1].endswith("%") and lines[i + 3].startswith("  verdict: ")


def test_top_k_larger_than_classes_is_clipped_with_a_note(trained, test_dir, capsys):
    image = os.path.join(test_dir, "dog", "000.jpg")
    status, out, err = run_predict(capsys, image, trained["checkpoint"], "--top_k", 10)
    assert status == 0
    assert len(out.splitlines()) == 3 + 1  # and the verdict
    assert "note: --top_k 10 is more than the 3 classes; showing 3" in err


def test_glob_and_repeats(trained, test_dir, capsys):
    pattern = os.path.join(test_dir, "*", "00[01].jpg")
    again = os.path.join(test_dir, "fox", "000.jpg")
    status, out, _ = run_predict(capsys, pattern, again, trained["checkpoint"], "--json")
    assert status == 0
    images = [d["image"] for d in json.loads(out)]
    assert len(images) == 6 and len(set(images)) == 6


def test_folder_skips_litter_as_training_does(trained, tmp_path, test_dir, capsys):
    folder = tmp_path / "photos"
    shutil.copytree(os.path.join(test_dir, "cat"), folder / "cat")
    (folder / ".DS_Store").write_bytes(b"\0\1binary")
    (folder / "Thumbs.db").write_bytes(b"\0\1binary")
    (folder / "README.txt").write_text("my photos")
    (folder / ".hidden").mkdir()
    draw_sample(0, 1).save(folder / ".hidden" / "x.jpg")
    status, out, err = run_predict(capsys, folder, trained["checkpoint"], "--json")
    assert status == 0, err
    assert sorted(os.path.basename(d["image"]) for d in json.loads(out)) == \
        ["000.jpg", "001.jpg", "002.jpg", "003.jpg"]


def test_csv_rows(trained, test_dir, tmp_path, capsys):
    out_csv = tmp_path / "out" / "predictions.csv"
    status, out, _ = run_predict(capsys, test_dir, trained["checkpoint"], "--csv", out_csv,
                                 "--top_k", 3, "--json")
    assert status == 0
    doc = json.loads(out)
    with open(out_csv, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "name_1", "probability_1", "name_2", "probability_2", "name_3",
                       "probability_3", "unknown", "novelty", "error"]
    assert len(rows) == 1 + 12
    for row, entry in zip(rows[1:], doc):
        assert row[0] == entry["image"]
        assert row[1::2][:3] == [p["name"] for p in entry["predictions"]]
        assert [float(x) for x in row[2:7:2]] == pytest.approx(
            [p["probability"] for p in entry["predictions"]], abs=1e-4)
        assert row[7] == str(int(entry["unknown"]))  # 1 or 0
        assert float(row[8]) == pytest.approx(entry["novelty"], abs=1e-4)
        assert row[-1] == ""


def test_plot_one_image_and_a_grid(trained, test_dir, tmp_path, capsys):
    one, grid = tmp_path / "one.png", tmp_path / "grid.png"
    image = os.path.join(test_dir, "dog", "000.jpg")
    assert run_predict(capsys, image, trained["checkpoint"], "--plot", one)[0] == 0
    assert run_predict(capsys, test_dir, trained["checkpoint"], "--plot", grid)[0] == 0
    w1, h1 = decodes(one)
    w2, h2 = decodes(grid)
    assert w2 > w1 and h2 > h1  # 12 photos make a bigger picture than one


def test_tta_averages_the_mirror_image(trained, test_dir, capsys):
    args = [os.path.join(test_dir, "fox"), trained["checkpoint"], "--json", "--top_k", 3]
    plain = json.loads(run_predict(capsys, *args)[1])
    tta = json.loads(run_predict(capsys, *args, "--tta")[1])
    for a, b in zip(plain, tta):
        assert sum(p["probability"] for p in b["predictions"]) == pytest.approx(1, abs=1e-3)
    assert plain != tta


def test_tta_equals_the_mean_of_an_image_and_its_mirror(trained, test_dir):
    predictor = inference.load_predictor(trained["checkpoint"])
    item = inference.Item(os.path.join(test_dir, "cat", "000.jpg"))
    array, _ = inference.read_image(item, predictor.preprocess)
    mirror = array[:, :, ::-1]
    expected = (predictor.probabilities(array[None]) + predictor.probabilities(
        np.ascontiguousarray(mirror[None]))) / 2
    got = inference.batch_probabilities(predictor, array[None], tta=True)
    assert got == pytest.approx(expected, abs=1e-6)


def test_batched_reading_matches_one_by_one(trained, test_dir):
    predictor = inference.load_predictor(trained["checkpoint"])
    items = predict.find_images([test_dir])
    batched = inference.predict_paths(predictor, items, threads=2)
    assert [r.path for r in batched] == [i.path for i in items]
    for item, result in zip(items, batched):
        alone = predictor.probabilities(inference.load_image(item.path, predictor.preprocess)[None])
        assert result.probs == pytest.approx(alone[0], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# --evaluate
# ---------------------------------------------------------------------------------------------
def test_evaluate_writes_the_report(trained, test_dir, tmp_path, capsys):
    out_dir = tmp_path / "rep"
    status, out, err = run_predict(capsys, test_dir, trained["checkpoint"], "--evaluate",
                                   "--report_dir", out_dir)
    assert status == 0, err
    assert out.startswith("evaluated 12 images: accuracy ")
    for name in ("confusion_matrix.png", "mistakes.png"):
        decodes(out_dir / name)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert [c["class"] for c in metrics["per_class"]] == CLASSES
    assert sum(c["support"] for c in metrics["per_class"]) == 12
    assert f"{100 * metrics['accuracy']:.1f}%" in out


def test_evaluate_reports_bad_images_and_scores_the_rest(trained, test_dir, tmp_path, capsys):
    folder = tmp_path / "labelled"
    shutil.copytree(test_dir, folder)
    (folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    status, out, err = run_predict(capsys, folder, trained["checkpoint"], "--evaluate",
                                   "--report_dir", tmp_path / "rep")
    assert status == 1
    assert out.startswith("evaluated 12 images: ")
    assert f"error: image {folder / 'cat' / 'broken.jpg'}: cannot be read: " in err
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["images"] == 12


def test_evaluate_names_unknown_classes(trained, test_dir, tmp_path, capsys):
    folder = tmp_path / "labelled"
    shutil.copytree(test_dir, folder)
    shutil.copytree(folder / "cat", folder / "wolf")
    shutil.copytree(folder / "cat", folder / "bear")
    status, out, err = run_predict(capsys, folder, trained["checkpoint"], "--evaluate",
                                   "--report_dir", tmp_path / "rep")
    assert status == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"error: --evaluate {folder}: class folder(s) the checkpoint does "
                          f"not know: bear, wolf;")


def test_evaluate_a_data_dir_suggests_its_test_split(trained, tmp_path, capsys):
    status, _, err = run_predict(capsys, trained["data"], trained["checkpoint"], "--evaluate",
                                 "--report_dir", tmp_path / "rep")
    assert status == 2
    assert "did you mean " + os.path.join(trained["data"], "test") in err


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file; give the path of a photo"),
    ("not_image", "cannot be read: not an image (unknown format); give a JPEG"),
    ("truncated", "cannot be read: truncated"),
])
def test_one_bad_image_is_one_line_and_status_2(trained, bad_files, capsys, kind, message):
    status, out, err = run_predict(capsys, bad_files[kind], trained["checkpoint"])
    assert status == 2 and out == ""
    assert err.startswith(f"error: image {bad_files[kind]}: {message}")
    assert err.count("\n") == 1


def test_folder_with_no_images(trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    status, _, err = run_predict(capsys, empty, trained["checkpoint"])
    assert status == 2
    assert err.startswith(f"error: image folder {empty}: no files in it or its subfolders;")
    (empty / "sub" / "notes.txt").write_text("no photos here")
    status, _, err = run_predict(capsys, empty, trained["checkpoint"])
    assert status == 2 and "no images found" in err and err.count("\n") == 1


def test_glob_that_matches_nothing(trained, tmp_path, capsys):
    status, _, err = run_predict(capsys, tmp_path / "*.jpg", trained["checkpoint"])
    assert status == 2 and "no file matches this pattern" in err


@pytest.mark.parametrize("kind", ["image", "state_dict", "text"])
def test_checkpoint_that_is_not_ours(trained, test_dir, tmp_path, capsys, kind):
    import torch
    image = os.path.join(test_dir, "cat", "000.jpg")
    if kind == "image":
        ckpt = image
    elif kind == "state_dict":
        ckpt = tmp_path / "weights.pth"
        torch.save({"fc.weight": torch.zeros(2, 2)}, ckpt)
    else:
        ckpt = tmp_path / "notes.pth"
        ckpt.write_text("hello")
    status, out, err = run_predict(capsys, image, ckpt)
    assert status == 2 and out == ""
    assert err.startswith(f"error: checkpoint {ckpt}: not a checkpoint of this tool")
    assert err.rstrip().endswith("give the checkpoint.pth written by train.py")
    assert err.count("\n") == 1


def test_category_names_missing_classes(trained, test_dir, tmp_path, capsys):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"cat": "house cat"}))
    status, _, err = run_predict(capsys, os.path.join(test_dir, "cat", "000.jpg"),
                                 trained["checkpoint"], "--category_names", names)
    assert status == 2
    assert err == (f"error: --category_names {names}: no name for 2 of the 3 classes (dog, fox); "
                   f"add them to the file\n")


def test_mixed_good_and_bad_images(trained, test_dir, bad_files, capsys):
    good = [os.path.join(test_dir, "cat", "000.jpg"), os.path.join(test_dir, "dog", "000.jpg")]
    bad = [bad_files["missing"], bad_files["not_image"], bad_files["truncated"]]
    argv = [good[0], *bad, good[1], trained["checkpoint"]]
    status, out, err = run_predict(capsys, *argv, "--json")
    assert status == 1
    doc = json.loads(out)
    assert [d["image"] for d in doc] == [str(a) for a in argv[:-1]]
    assert [("predictions" in d) for d in doc] == [True, False, False, False, True]
    for d in doc[1:4]:
        assert set(d) == {"image", "error"} and d["error"].startswith(f"image {d['image']}: ")
    assert err.count("error: image ") == 3
    status, out, err = run_predict(capsys, *argv)
    assert status == 1
    assert out.splitlines()[0] == good[0] and good[1] in out
    assert all(str(b) not in out for b in bad)


# ---------------------------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------------------------
def test_one_image_imports_no_plotting_torchvision_or_training(trained, test_dir):
    image = os.path.join(test_dir, "cat", "000.jpg")
    proc = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "predict.py"),
                           image, trained["checkpoint"]], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:")}
    imported = {m.split(".")[0] for m in modules}
    assert "torch" in imported and "imgclf.checkpoints" in modules  # it sees real imports
    for heavy in ("matplotlib", "torchvision", "sklearn", "timm"):
        assert heavy not in imported
    for heavy in ("imgclf.cli.train", "imgclf.analysis.report", "imgclf.engine.feature_trainer"):
        assert heavy not in modules


# ---------------------------------------------------------------------------------------------
# Options that would change nothing are refused; --precision
# ---------------------------------------------------------------------------------------------
def test_report_dir_without_evaluate_is_refused(trained, test_dir, capsys):
    status, _, err = run_predict(capsys, test_dir, trained["checkpoint"], "--report_dir", "r")
    assert (status, err) == (2, "error: --report_dir r: only --evaluate writes a report; add "
                                "--evaluate, or drop --report_dir\n")


def test_top_k_with_evaluate_is_refused():
    """The evaluation report has its own top-1 and top-5 accuracy."""
    args = predict.build_parser().parse_args(["test", "checkpoint.pth", "--evaluate",
                                              "--top_k", "3"])
    with pytest.raises(predict.UserError, match=r"^--evaluate writes its own report files; "
                                                r"drop --top_k$"):
        predict.check_options(args)


def test_tta_is_refused_for_a_model_that_averages_the_mirror_image_already(trained, test_dir,
                                                                           tmp_path, capsys):
    import torch
    ckpt = torch.load(trained["checkpoint"], weights_only=True)
    ckpt["model_args"]["flip_tta"] = True  # as the logistic head chooses it where it helps
    path = tmp_path / "mirrored.pth"
    torch.save(ckpt, path)
    image = os.path.join(test_dir, "cat", "000.jpg")
    status, _, err = run_predict(capsys, image, path, "--tta")
    assert (status, err) == (2, f"error: --tta: {path} averages each photo with its mirror "
                                f"image already (its head was chosen so in training); drop "
                                f"--tta\n")
    assert run_predict(capsys, image, path)[0] == 0


def test_precision_fp32_gives_the_float32_models_probabilities(trained, test_dir, monkeypatch,
                                                               capsys):
    """As on a CPU with native bfloat16 (where auto computes in it): --precision fp32 gives
    the probabilities of a plain float32 forward pass, auto does not."""
    import torch

    from imgclf import checkpoints
    from imgclf.models import hardware
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    model = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(trained["checkpoint"]))
    image = os.path.join(test_dir, "fox", "000.jpg")
    batch = inference.load_image(image, checkpoints.load_checkpoint(trained["checkpoint"])
                               ["preprocess"])[None]
    with torch.inference_mode():
        reference = model.eval()(torch.from_numpy(batch)).softmax(1).numpy()
    fp32 = inference.load_predictor(trained["checkpoint"], precision="fp32").probabilities(batch)
    auto = inference.load_predictor(trained["checkpoint"]).probabilities(batch)
    np.testing.assert_allclose(fp32, reference, atol=1e-6)
    assert np.abs(auto - reference).max() > 1e-4  # bfloat16's: what fp32 removes
    _, out, _ = run_predict(capsys, image, trained["checkpoint"], "--precision", "fp32",
                            "--json", "--top_k", "1")
    [prediction] = json.loads(out)[0]["predictions"]
    assert prediction["probability"] == round(float(reference.max()), 4)
