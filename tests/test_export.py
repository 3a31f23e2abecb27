"""export.py and torch-free prediction of .onnx models (inference.OnnxPredictor)."""
import contextlib
import glob
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import FLOWERS5, ROOT, needs_flowers5
from imgclf.app import inference
from imgclf.cli import export, predict
from imgclf.errors import UserError

HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAVE_ONNX, reason="onnx and onnxruntime are not installed "
                                "(optional: pip install -e '.[export]')")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The shared small checkpoint, exported once (float32)."""
    if not HAVE_ONNX:
        pytest.skip("onnx and onnxruntime are not installed")
    out = str(tmp_path_factory.mktemp("export") / "model.onnx")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export.main([trained["checkpoint"], "--out", out, "--check_count", "6"]) == 0
    return dict(trained, onnx=out, printed=printed.getvalue())


def torch_probabilities(checkpoint, batch):
    """The reference: the checkpoint's network in float32, softmax on its outputs."""
    import torch

    from imgclf import checkpoints
    model = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(checkpoint))
    with torch.inference_mode():
        return model(torch.from_numpy(batch)).softmax(1).numpy()


def sample_batch(trained, preprocess, limit=12):
    """Real photos where the shared flower photos are here, the generated test split else."""
    from imgclf.data import decode
    paths = sorted(glob.glob(os.path.join(trained["data"], "test", "*", "*.jpg")))
    if os.path.isdir(FLOWERS5):
        paths = sorted(glob.glob(os.path.join(FLOWERS5, "test", "*", "*.jpg")))
        paths = paths[::max(1, len(paths) // limit)][:limit]
    return np.stack([decode.eval_array(decode.load_rgb(p), preprocess) for p in paths])


@needs_onnx
def test_export_prints_its_check_and_writes_the_model(exported):
    text, out = exported["printed"], exported["onnx"]
    diff = float(re.search(r"max \|probability difference\| (\S+),", text).group(1))
    assert diff <= export.PARITY_ATOL
    assert "top-1 same on 6/6" in text and "test images of" in text
    assert os.path.getsize(out) > 1_000_000


@needs_onnx
def test_onnx_probabilities_match_pytorch(exported):
    onnx_model = inference.OnnxPredictor(exported["onnx"])
    batch = sample_batch(exported, onnx_model.preprocess)
    ours = onnx_model.probabilities(batch)
    reference = torch_probabilities(exported["checkpoint"], batch)
    print(f"max |probability difference| on {len(batch)} images: "
          f"{np.abs(ours - reference).max():.2e}")
    assert ours.shape == reference.shape == (len(batch), 3)
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    assert (ours.argmax(1) == reference.argmax(1)).all()
    np.testing.assert_allclose(ours.sum(1), 1.0, atol=1e-5)  # the softmax is inside


@needs_onnx
@needs_flowers5
def test_export_checks_on_given_photos(trained, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert export.main([trained["checkpoint"], "--out", out, "--check_images",
                        os.path.join(FLOWERS5, "test"), "--check_count", "8"]) == 0
    text = capsys.readouterr().out
    assert "checking on 8 images of" in text and "top-1 same on 8/8" in text


@needs_onnx
def test_batch_axis_is_free(exported):
    onnx_model = inference.OnnxPredictor(exported["onnx"])
    batch = sample_batch(exported, onnx_model.preprocess, limit=5)[:5]
    together = onnx_model.probabilities(batch)
    one_by_one = np.concatenate([onnx_model.probabilities(batch[i:i + 1]) for i in range(5)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


@needs_onnx
def test_metadata_carries_classes_and_preprocessing(exported):
    import onnx

    from imgclf import checkpoints
    ckpt = checkpoints.load_checkpoint(exported["checkpoint"])
    model = onnx.load(exported["onnx"])
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["format"] == export.ONNX_FORMAT
    assert json.loads(meta["classes"]) == ckpt["classes"] == ["cat", "dog", "fox"]
    assert json.loads(meta["class_names"]) == ckpt["class_names"]
    assert json.loads(meta["preprocess"]) == ckpt["preprocess"]
    assert meta["output"].startswith("probabilities")
    image = model.graph.input[0]
    dims = image.type.tensor_type.shape.dim
    assert image.name == "image" and dims[0].dim_param == "batch"
    assert [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert model.graph.output[0].name == "probabilities"
    predictor = inference.OnnxPredictor(exported["onnx"])
    assert predictor.classes == ckpt["classes"] and predictor.preprocess == ckpt["preprocess"]


@needs_onnx
def test_no_verdict_leaves_the_novelty_and_its_bank_out(exported, tmp_path, capsys):
    import onnx
    out = str(tmp_path / "plain.onnx")
    assert export.main([exported["checkpoint"], "--out", out, "--check_count", "2",
                        "--no_verdict"]) == 0
    assert "no novelty output: --no_verdict leaves the unknown verdict out" in \
        capsys.readouterr().out
    with_verdict, plain = onnx.load(exported["onnx"]), onnx.load(out)
    assert [o.name for o in with_verdict.graph.output][:2] == ["probabilities", "novelty"]
    assert "novelty" not in [o.name for o in plain.graph.output]
    assert "unknown_threshold" not in {p.key for p in plain.metadata_props}
    from imgclf import checkpoints
    bank = checkpoints.load_checkpoint(exported["checkpoint"])["novelty"]["bank"]
    assert os.path.getsize(exported["onnx"]) - os.path.getsize(out) >= bank.numel() * 4
    image = os.path.join(exported["data"], "test", "fox", "001.jpg")
    assert predict.main([image, out, "--top_k", "2"]) == 0
    assert not any(line.startswith("verdict: ") for line in capsys.readouterr().out.splitlines())


@needs_onnx
def test_quantized_model_is_smaller_and_agrees(exported, tmp_path, capsys):
    out = str(tmp_path / "model.int8.onnx")
    assert export.main([exported["checkpoint"], "--out", out, "--quantize"]) == 0
    text = capsys.readouterr().out
    assert "int8 vs PyTorch" in text and "x smaller" in text
    ratio = os.path.getsize(exported["onnx"]) / os.path.getsize(out)
    assert ratio > 3, f"int8 model only {ratio:.1f}x smaller"
    q = inference.OnnxPredictor(out)
    batch = sample_batch(exported, q.preprocess)
    q_probs, f_probs = q.probabilities(batch), inference.OnnxPredictor(exported["onnx"]).probabilities(batch)
    np.testing.assert_allclose(q_probs.sum(1), 1.0, atol=1e-4)
    agree = (q_probs.argmax(1) == f_probs.argmax(1)).mean()
    assert agree >= 0.75, f"int8 names the float model's top class on only {agree:.0%}"
    # --precision fp32 is what a float export computes already; an int8 one cannot
    assert inference.OnnxPredictor(exported["onnx"], precision="fp32").averages_mirror is False
    with pytest.raises(UserError, match=r"^--precision fp32: .*model.int8.onnx is an int8 "
                                        r"model \(export.py --quantize\); export it without "
                                        r"--quantize for float32, or drop --precision$"):
        inference.OnnxPredictor(out, precision="fp32")


@needs_onnx
def test_export_without_the_training_data_checks_generated_images(exported, tmp_path, capsys):
    from imgclf import checkpoints
    ckpt = checkpoints.load_checkpoint(exported["checkpoint"])
    ckpt["data"]["root"] = str(tmp_path / "moved-away")
    moved = str(tmp_path / "checkpoint.pth")
    checkpoints.save_checkpoint(ckpt, moved)
    assert export.main([moved]) == 0
    text = capsys.readouterr().out
    assert "8 generated images" in text and "top-1 same on 8/8" in text
    assert os.path.isfile(tmp_path / "model.onnx")
    assert export.main([moved, "--check_count", "4"]) == 2  # it could not take effect
    assert capsys.readouterr().err == (
        "error: --check_count 4: the photos the checkpoint was trained on are not here, so the "
        "check runs on 8 generated images; give --check_images DIR, or drop --check_count\n")


def test_a_failed_check_is_one_line_and_status_1(monkeypatch, capsys):
    def fail(args):
        raise export.CheckFailed("ONNX Runtime's probabilities differ")
    monkeypatch.setattr(export, "run", fail)
    assert export.main(["checkpoint.pth"]) == 1
    assert capsys.readouterr().err == ("error: the export failed its check, nothing written: "
                                       "ONNX Runtime's probabilities differ\n")


@needs_onnx
def test_predict_with_onnx_does_not_import_torch(exported):
    image = os.path.join(exported["data"], "test", "dog", "000.jpg")
    run = subprocess.run([sys.executable, "-X", "importtime", "predict.py", image,
                          exported["onnx"], "--top_k", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
                if line.startswith("import time:")]
    assert "onnxruntime" in imported
    assert not [m for m in imported if m.split(".")[0] in ("torch", "torchvision", "model_utils")]
    lines = run.stdout.splitlines()
    # the top 2, then the unknown verdict (the novelty output of the export)
    assert len(lines) == 3 and lines[0].startswith(" 1. ") and lines[0].endswith("%")
    assert lines[2].startswith("verdict: ")


@needs_onnx
def test_predict_names_the_same_class_with_onnx_and_checkpoint(exported, capsys):
    image = os.path.join(exported["data"], "test", "fox", "001.jpg")
    outputs = []
    for model in (exported["checkpoint"], exported["onnx"]):
        assert predict.main([image, model, "--top_k", "1"]) == 0
        outputs.append(capsys.readouterr().out.split()[1])
    assert outputs[0] == outputs[1]


@needs_onnx
def test_predict_explain_with_onnx_gives_the_checkpoint_heatmap(exported, capsys):
    from imgclf.app import heat_page
    image = os.path.join(exported["data"], "test", "fox", "001.jpg")
    grids = []
    for model in (exported["checkpoint"], exported["onnx"]):
        assert predict.main([image, model, "--explain", "--json", "--precision", "fp32"]) == 0
        grids.append(np.asarray(json.loads(capsys.readouterr().out)[0]["heatmap"]))
    assert grids[0].shape == grids[1].shape and grids[0].max() == 1
    np.testing.assert_allclose(grids[1], grids[0], atol=1e-3, rtol=0)
    assert heat_page.explain_error(inference.load_predictor(exported["onnx"])) is None
    # the model's map is of the photo alone: --tta with it is refused in one line
    assert predict.main([image, exported["onnx"], "--explain", "--tta"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "drop --tta" in err


@needs_onnx
def test_broken_onnx_files_are_one_line_errors(exported, tmp_path, capsys):
    import onnx
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    image = os.path.join(exported["data"], "test", "dog", "000.jpg")
    assert predict.main([image, str(junk)]) == 2
    assert "not a loadable ONNX model" in capsys.readouterr().err
    bare = onnx.load(exported["onnx"])
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    assert predict.main([image, str(tmp_path / "bare.onnx")]) == 2
    assert "export it with export.py" in capsys.readouterr().err
    assert predict.main([image, str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_export_user_errors(tmp_path, capsys):
    if not HAVE_ONNX:
        pytest.skip("onnx and onnxruntime are not installed")
    assert export.main([str(tmp_path / "none.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and "no such file" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_without_the_optional_packages_export_says_what_to_install(monkeypatch, capsys,
                                                                   missing, tmp_path):
    monkeypatch.setitem(sys.modules, missing, None)  # makes "import <missing>" fail
    assert export.main([str(tmp_path / "checkpoint.pth")]) == 2
    err = capsys.readouterr().err
    # It names the first of the two that is missing (both are, where neither is installed).
    assert re.fullmatch(r"error: export needs the optional package onnx(runtime)?: "
                        r"pip install -e '\.\[export\]'\n", err)
    if HAVE_ONNX:
        assert f"package {missing}:" in err


def test_without_onnxruntime_predict_says_what_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    Image.new("RGB", (32, 32), "white").save(tmp_path / "photo.jpg")
    assert predict.main([str(tmp_path / "photo.jpg"), str(tmp_path / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "needs onnxruntime: pip install -e '.[export]'" in err
