"""data_issues.py: confident learning (against cleanlab where installed), the chunked
near-duplicate search, report/data_issues.csv, and --exclude end to end."""
import csv
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAST, make_image_folder
from imgclf.analysis import data_issues
from imgclf.cli import train
from imgclf.engine import train_config


def noisy_probabilities(seed, classes=6, photos=400, flip_share=0.1):
    """(given labels, held-out probabilities, flipped indices): a classifier right about most
    photos' true class, and labels of which a share was flipped to another class."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, classes, photos)
    logits = rng.normal(0, 1.0, (photos, classes))
    logits[np.arange(photos), true] += 4.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    flipped = rng.choice(photos, int(flip_share * photos), replace=False)
    labels = true.copy()
    labels[flipped] = (true[flipped] + rng.integers(1, classes, len(flipped))) % classes
    return labels, probs, flipped


def test_confident_learning_finds_the_flipped_labels():
    labels, probs, flipped = noisy_probabilities(0)
    found = data_issues.find_label_issues(labels, probs)
    hits = len(set(found) & set(flipped))
    assert hits >= 0.8 * len(flipped)
    assert hits >= 0.8 * len(found)  # and few of the rest
    issues = data_issues.label_issues(probs, labels, [f"p{i}" for i in range(len(labels))],
                                      list("abcdef"))
    confidences = [c for *_, c in issues]
    assert confidences == sorted(confidences)  # most suspect first
    assert all(given != suggested for _, given, suggested, _ in issues)


@pytest.mark.parametrize("seed", range(12))
def test_confident_learning_flags_what_cleanlab_flags(seed):
    cleanlab = pytest.importorskip("cleanlab.filter", reason="cleanlab (the dev extra) is the "
                                                             "reference")
    rng = np.random.default_rng(seed)
    labels, probs, _ = noisy_probabilities(seed, classes=int(rng.integers(2, 12)),
                                           photos=int(rng.integers(30, 600)),
                                           flip_share=rng.uniform(0, 0.3))
    theirs = cleanlab.find_label_issues(labels, probs, n_jobs=1,
                                        return_indices_ranked_by="self_confidence")
    ours = data_issues.label_issues(probs, labels, list(range(len(labels))),
                                    list(range(probs.shape[1])))
    assert [i for i, *_ in ours] == list(theirs)


def test_nearest_neighbours_in_blocks_find_planted_copies_and_not_distinct_rows():
    rng = np.random.default_rng(0)
    reference = torch.from_numpy(rng.normal(size=(53, 64)).astype(np.float32))
    distinct = torch.from_numpy(rng.normal(size=(20, 64)).astype(np.float32))
    copies = reference[[3, 50, 17]] * 2.0 + 0.05 * torch.randn(3, 64)  # scaled, a little noise
    queries = torch.cat([distinct, copies])
    best, cosine = data_issues.nearest_neighbours(queries, reference, block=8)  # uncentred
    unit = torch.nn.functional.normalize
    brute = unit(queries, dim=1) @ unit(reference, dim=1).T
    assert np.array_equal(best, brute.argmax(1).numpy())
    assert np.allclose(cosine, brute.max(1).values.numpy(), atol=1e-5)
    paths = {"train": [f"train/{i}" for i in range(53)],
             "test": [f"test/{i}" for i in range(23)]}
    pairs = data_issues.near_duplicates({"train": reference, "test": queries}, paths)
    assert {(a, b) for a, b, _ in pairs} == {("train/3", "test/20"), ("train/50", "test/21"),
                                             ("train/17", "test/22")}


def test_report_writes_the_csv_and_the_picture(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "data", per_split={"train": 2})
    a, b = (os.path.join(folder, "train", "cat", f"00{i}.jpg") for i in (0, 1))
    findings = data_issues.Findings(near_duplicates=[(a, b, 0.97)],
                                    labels=[(b, "cat", "dog", 0.04)], seconds=0.5)
    path = data_issues.write_report(str(tmp_path), findings, {"cat": "Cat", "dog": "Dog"})
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [dict(path=a, issue="near_duplicate", other=b, score="0.9700"),
                    dict(path=b, issue="label", other="dog", score="0.0400")]
    assert os.path.getsize(tmp_path / "report" / data_issues.PNG_NAME) > 1000
    assert "data issues: 1 near-duplicate across splits, 1 photo that looks mislabelled" in \
        capsys.readouterr().out
    data_issues.write_report(str(tmp_path), None, {})  # a run that did not look
    assert not os.listdir(tmp_path / "report")


def test_a_run_writes_data_issues_and_exclude_leaves_photos_out(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    # A test photo copied into train at a smaller size (the same picture, other bytes), and a
    # fox in the cat folder: what a user would leave out after reading the report.
    with Image.open(os.path.join(data, "test", "dog", "001.jpg")) as img:
        img.resize((40, 40)).save(os.path.join(data, "train", "dog", "copy.jpg"), quality=80)
    shutil.copy(os.path.join(data, "train", "fox", "002.jpg"),
                os.path.join(data, "train", "cat", "moved.jpg"))
    listed = tmp_path / "bad.csv"
    listed.write_text("path,issue\ntrain/dog/copy.jpg,near_duplicate\n"
                      f"{os.path.join(data, 'train', 'cat', 'moved.jpg')},label\n"
                      "train/cat/gone.jpg,label\n")
    assert train.main([data, "--save_dir", str(tmp_path), *FAST, "--exclude", str(listed)]) == 0
    out = capsys.readouterr().out
    assert "left out 2 photos" in out and "1 of its paths are not in" in out
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["data"]["excluded"] == ["train/cat/moved.jpg", "train/dog/copy.jpg"]
    assert ckpt["data"]["counts"]["train"] == 30
    assert ckpt["args"]["exclude"] == str(listed)

    assert "data issues: " in out and "report/data_issues.csv" in out
    with open(tmp_path / "report" / data_issues.CSV_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    # (these drawn pictures, at 64 px, are all alike: the counts mean nothing here)
    paths = {os.path.join(data, s, c, f) for s in ("train", "valid", "test")
             for c in ("cat", "dog", "fox") for f in os.listdir(os.path.join(data, s, c))}
    for row in rows:
        assert row["issue"] in ("near_duplicate", "label") and row["path"] in paths
        assert row["other"] in (paths if row["issue"] == "near_duplicate" else ckpt["classes"])
        assert 0 <= float(row["score"]) <= 1.0001
        assert not row["path"].endswith(("copy.jpg", "moved.jpg"))


def test_exclude_refuses_a_list_of_nothing_in_the_data(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    listed = tmp_path / "list.txt"
    listed.write_text("# photos to leave out\nelsewhere/cat/000.jpg\n")
    assert train.main([data, "--check", "--exclude", str(listed)]) == 2
    assert "none of its 1 paths is a photo of" in capsys.readouterr().err
    listed.write_text("train/cat/000.jpg\ntrain/cat/001.jpg\n")
    scan = train.scan_data(train_config.TrainConfig(data_dir=data, exclude=str(listed)),
                           str(tmp_path / "cache"))
    assert len(scan.samples["train"]) == 28 and scan.excluded == ["train/cat/000.jpg",
                                                                  "train/cat/001.jpg"]
    full = train.scan_data(train_config.TrainConfig(data_dir=data), str(tmp_path / "cache"))
    assert scan.fingerprint != full.fingerprint  # cached features of the full set not reused


def test_hash_pairs_join_the_feature_pairs_once_each():
    feature_pairs = [("train/a.jpg", "test/a.jpg", 0.95), ("train/b.jpg", "valid/b.jpg", 0.93)]
    hash_pairs = [("train/a.jpg", "test/a.jpg", 0), ("train/c.jpg", "test/c.jpg", 4)]
    assert data_issues.with_hash_pairs(feature_pairs, hash_pairs) == [
        ("train/a.jpg", "test/a.jpg", 0.95), ("train/c.jpg", "test/c.jpg", 1 - 4 / 64),
        ("train/b.jpg", "valid/b.jpg", 0.93)]


def test_the_search_reuses_the_heads_held_out_logits(monkeypatch):
    """Where the head kept its cross-validation's held-out logits, the search for label
    errors fits nothing; where it did not, it fits its own out-of-fold heads."""
    import argparse

    from imgclf.heads import linear_probe as lp
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = torch.tensor(rng.normal(size=(60, 1, 8)) + 3 * np.eye(3, 8)[y][:, None],
                     dtype=torch.float32)
    scan = argparse.Namespace(classes=list("abc"), samples={
        "train": [(f"t{i}.jpg", int(y[i])) for i in range(50)],
        "valid": [(f"v{i}.jpg", int(y[i])) for i in range(50, 60)]})
    monkeypatch.setattr(data_issues.data_report, "find_near_duplicates", lambda scan: [])
    stored = {"train": (x[:50], y[:50]), "valid": (x[50:], y[50:])}
    head, _ = lp.choose_and_fit(x, y, 3, [lp.PLAIN])
    kept = np.full((60, 3), -4.0, np.float32)
    kept[np.arange(60), y] = 4.0
    kept[7] = np.roll(kept[7], 1)  # one looks mislabelled
    head.held_out_logits = kept
    refits = []
    monkeypatch.setattr(lp, "out_of_fold_fits",
                        lambda *a, **k: refits.append(1) or (torch.from_numpy(kept), 1.0))
    findings = data_issues.find_issues(stored, scan, head)
    assert not refits and [path for path, *_ in findings.labels] == ["t7.jpg"]
    head.held_out_logits = None
    data_issues.find_issues(stored, scan, head)
    assert refits == [1]
