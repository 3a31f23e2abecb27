"""Plant label errors and near-duplicates in a copy of a data set; train; score what was found.

report/data_issues.csv is scored against what was planted.

    python bench/data_issues_bench.py SRC WORK [--seed S] [--scan_only]

SRC holds train/ valid/ [test/] class folders. WORK/faulty becomes a copy of SRC (hard links)
in which 3% of each class's train photos sit in another class's folder (label errors) and 40
test photos were copied into train at 85% of their size and JPEG quality 80 (the same picture,
other bytes). train.py runs on it twice, in this process, with the feature cache WORK/cache
shared: once as it is and once with the data-issues step switched off, so the benchmark can
check that the step changes neither the head nor the test accuracy. The first run computes the
features unless an earlier benchmark left them in WORK/cache (the cost line says which). It prints recall and precision for both
kinds of fault, beside cleanlab's find_label_issues on the same held-out probabilities (where
cleanlab is installed), and the step's seconds against the run's wall. --scan_only trains
nothing: it scans WORK/faulty and scores the near-duplicates the scan's perceptual hashes name
(what train.py --check lists; seconds, where a training run computing the features takes tens
of minutes on a shared CPU).
"""
import argparse
import contextlib
import csv
import io
import json
import os
import random
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from imgclf.analysis import data_issues  # noqa: E402
from imgclf.cli import train  # noqa: E402
from imgclf.data import (
    data_report,  # noqa: E402
    scanning,  # noqa: E402
)

MOVED_SHARE = 0.03
COPIES = 40
COPY_SCALE = 0.85
COPY_QUALITY = 80


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", metavar="SRC", help="folder with train/ valid/ [test/] class folders")
    p.add_argument("work", metavar="WORK",
                   help="folder for the faulty copy, the runs and the cache (reused if there)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="which photos are moved and copied (default: 0)")
    p.add_argument("--scan_only", action="store_true",
                   help="train nothing: score only the near-duplicates the scan's perceptual "
                        "hashes name (default: train and score everything)")
    return p


def make_faulty_copy(src, dst, seed=0):
    """Lay out dst as src with faults planted; returns the truth: {"label": {path: true class},
    "near_duplicate": [[train copy, test original]]}, paths relative to dst."""
    rng = random.Random(seed)
    for dirpath, _, names in os.walk(src):
        out = os.path.join(dst, os.path.relpath(dirpath, src))
        os.makedirs(out, exist_ok=True)
        for name in names:
            link_or_copy(os.path.join(dirpath, name), os.path.join(out, name))
    classes = sorted(os.listdir(os.path.join(dst, "train")))
    truth = {"label": {}, "near_duplicate": []}
    for cls in classes:
        folder = os.path.join(dst, "train", cls)
        names = sorted(os.listdir(folder))
        for name in rng.sample(names, max(1, round(MOVED_SHARE * len(names)))):
            other = rng.choice([c for c in classes if c != cls])
            moved = os.path.join("train", other, f"moved-{name}")
            os.replace(os.path.join(folder, name), os.path.join(dst, moved))
            truth["label"][moved] = cls
    tests = sorted(os.path.relpath(os.path.join(d, n), dst)
                   for d, _, names in os.walk(os.path.join(dst, "test")) for n in names)
    for original in rng.sample(tests, COPIES):
        cls, name = original.split(os.sep)[-2:]
        copy = os.path.join("train", cls, f"copy-{os.path.splitext(name)[0]}.jpg")
        with Image.open(os.path.join(dst, original)) as img:
            img = img.convert("RGB")
            size = (round(img.width * COPY_SCALE), round(img.height * COPY_SCALE))
            img.resize(size, Image.BICUBIC).save(os.path.join(dst, copy), quality=COPY_QUALITY)
        truth["near_duplicate"].append([copy, original])
    return truth


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def train_once(data, save_dir, cache_dir, find_issues=True):
    """One default train.py run in this process; (its output, seconds, checkpoint)."""
    original = data_issues.find_issues
    if not find_issues:
        data_issues.find_issues = lambda *args, **kwargs: None
    out = io.StringIO()
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(out):
            status = train.main([data, "--save_dir", save_dir, "--cache_dir", cache_dir])
    finally:
        data_issues.find_issues = original
    seconds = time.monotonic() - started
    if status != 0:
        sys.exit(f"train.py failed ({status}):\n{out.getvalue()}")
    checkpoint = torch.load(os.path.join(save_dir, "checkpoint.pth"), weights_only=True)
    return out.getvalue(), seconds, checkpoint


def read_found(save_dir, data):
    """{issue: [(path relative to data, other)]} of report/data_issues.csv, in its order."""
    found = {"label": [], "near_duplicate": []}
    with open(os.path.join(save_dir, "report", data_issues.CSV_NAME), newline="") as f:
        for row in csv.DictReader(f):
            other = row["other"]
            if row["issue"] == "near_duplicate":
                other = os.path.relpath(other, data)
            found[row["issue"]].append((os.path.relpath(row["path"], data), other))
    return found


def score_labels(flagged, truth):
    """(recall, precision, hits) of flagged paths against {path: true class}."""
    hits = sum(path in truth for path in flagged)
    return hits / max(len(truth), 1), hits / max(len(flagged), 1), hits


def score_duplicates(pairs, planted):
    """(share of planted pairs named, planted pairs named, pairs named with no planted photo):
    a pair counts in either order."""
    named = {frozenset(pair) for pair in pairs}
    hits = sum(frozenset(pair) in named for pair in planted)
    planted_paths = {p for pair in planted for p in pair}
    others = sum(1 for pair in named if not pair & planted_paths)
    return hits / len(planted), hits, others


def score_hash_pairs(data, cache, truth):
    """Scan data (its own scan cache) and print how many planted pairs the perceptual hash
    names."""
    started = time.monotonic()
    scan = scanning.scan_dataset(data, cache_dir=cache)
    scanned = time.monotonic() - started
    pairs = [(os.path.relpath(a, data), os.path.relpath(b, data))
             for a, b, _ in data_report.find_near_duplicates(scan)]
    share, named, others = score_duplicates(pairs, truth["near_duplicate"])
    print(f"near-duplicates by perceptual hash (<= {data_report.NEAR_DUPLICATE_BITS} bits): "
          f"{named} of {len(truth['near_duplicate'])} planted pairs named ({100 * share:.0f}%); "
          f"{len(pairs)} pairs named in all, {others} without a planted photo "
          f"[scan {scanned:.1f}s, search {time.monotonic() - started - scanned:.2f}s]")
    return 0


def cleanlab_flags(probs, labels, paths, data):
    """Paths cleanlab's find_label_issues flags on the same held-out probabilities, relative
    to data; None where cleanlab is not installed."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        return None
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate",
                                return_indices_ranked_by="self_confidence")
    return [os.path.relpath(paths[i], data) for i in flagged]


def main(argv=None):
    args = build_parser().parse_args(argv)
    work = os.path.abspath(args.work)
    data, cache = os.path.join(work, "faulty"), os.path.join(work, "cache")
    truth_path = os.path.join(work, "truth.json")
    if not os.path.exists(truth_path):
        truth = make_faulty_copy(args.src, data, args.seed)
        with open(truth_path, "w") as f:
            json.dump(truth, f, indent=1)
    with open(truth_path) as f:
        truth = json.load(f)
    print(f"faulty copy {data}: {len(truth['label'])} train photos moved to another class, "
          f"{len(truth['near_duplicate'])} test photos copied into train")
    if args.scan_only:
        return score_hash_pairs(data, os.path.join(work, "scan-only"), truth)

    held_out = {}
    original = data_issues.label_issues

    def keep_probs(probs, labels, paths, *rest, **kwargs):  # the probabilities the step used
        held_out["result"] = (probs, labels, paths)
        return original(probs, labels, paths, *rest, **kwargs)

    data_issues.label_issues = keep_probs
    cached = os.path.isdir(os.path.join(cache, "features"))  # the per-photo feature store
    try:
        output, wall, with_step = train_once(data, os.path.join(work, "run"), cache)
    finally:
        data_issues.label_issues = original
    _, wall_off, without = train_once(data, os.path.join(work, "run-off"), cache,
                                      find_issues=False)
    step = next(line for line in output.splitlines() if line.startswith("data issues:"))
    seconds = float(step.rsplit("[", 1)[1].rstrip("s]"))
    print(step)

    found = read_found(os.path.join(work, "run"), data)
    flagged = [path for path, _ in found["label"]]
    recall, precision, hits = score_labels(flagged, truth["label"])
    right_class = sum(truth["label"].get(path) == other for path, other in found["label"])
    print(f"label errors:     recall {recall:.2f} ({hits} of {len(truth['label'])}), precision "
          f"{precision:.2f} ({len(flagged)} flagged; {right_class} of the found with the right "
          f"class suggested)")
    theirs = cleanlab_flags(*held_out["result"], data)
    if theirs is not None:
        r, p, h = score_labels(theirs, truth["label"])
        same = len(set(theirs) & set(flagged))
        print(f"  cleanlab:       recall {r:.2f} ({h} of {len(truth['label'])}), precision "
              f"{p:.2f} ({len(theirs)} flagged; {same} in common)")
    else:
        print("  cleanlab:       not installed (pip install cleanlab)")
    share, named, others = score_duplicates(found["near_duplicate"], truth["near_duplicate"])
    print(f"near-duplicates:  {named} of {len(truth['near_duplicate'])} planted pairs named "
          f"({100 * share:.0f}%); {len(found['near_duplicate'])} pairs named in all, {others} "
          f"without a planted photo")
    print(f"cost: data-issues step {seconds:.1f}s of the run's {wall:.1f}s wall "
          f"({100 * seconds / wall:.1f}%; features {'from the cache' if cached else 'computed'}"
          f"); the run without it {wall_off:.1f}s (features from the cache)")
    same_head = all(torch.equal(with_step["state_dict"][k], without["state_dict"][k])
                    for k in with_step["state_dict"])
    print(f"unchanged by the step: head weights {'identical' if same_head else 'DIFFER'}, test "
          f"accuracy {100 * with_step['metrics'].get('test_acc', np.nan):.2f}% vs "
          f"{100 * without['metrics'].get('test_acc', np.nan):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
