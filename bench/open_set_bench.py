"""The unknown verdict and calibration, measured on held-out classes.

    python bench/open_set_bench.py DATA FAR WORK [--hold N] [--splits M] [--seed S]

DATA and FAR hold train/ valid/ test/ class folders. Each is trained on once by train.py (in
this process; the features it stored are kept in WORK/<name>.npz for the next benchmark);
then, on the stored features, for each of M splits of DATA's classes into known ones and N
held-out ones (all splits when there are at most M; default N: 2 of 5 classes, else half):
the default head is fitted on the known classes' train+valid photos as train.py fits it
(cross-validated C and views), the temperature and the novelty as train.py fits them, and

- accuracy and the expected calibration error (ECE) on the known classes' test photos;
- AUROC and FPR95 (the share of unknown photos accepted at the threshold that keeps 95% of
  the known test photos) for near unknowns (the held-out classes' photos, every split) and
  far ones (FAR's test photos), for the shipped novelty and, on the same features and head,
  the scores of issue 26's table: max softmax, energy, the nearest training photo's cosine
  (L2-normalised features) and Mahalanobis distance (shared covariance);
- the share of known test photos called unknown at the stored (default) threshold.

Prints one line per split and the mean over splits.
"""
import argparse
import itertools
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imgclf.analysis import calibration  # noqa: E402
from imgclf.heads import linear_probe, novelty  # noqa: E402

SCORES = ("novelty", "max softmax", "energy", "kNN cosine", "Mahalanobis")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", metavar="DATA", help="the data set whose classes are held out")
    p.add_argument("far", metavar="FAR", help="another data set: the far unknowns")
    p.add_argument("work", metavar="WORK", help="folder for the runs and feature caches")
    p.add_argument("--hold", type=int, metavar="N",
                   help="classes held out per split (default: 2 of 5, else half)")
    p.add_argument("--splits", type=int, default=10, metavar="M",
                   help="splits of the classes, at random beyond all of them (default: 10)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="(default: 0)")
    return p


def stored_features(data, work):
    """{split: (features (photos, views, dim) float32, labels)} of data as train.py's default
    head sees them (taken from its run, in this process, by wrapping FeatureTrainer.open_set),
    kept in WORK/<name>.npz so that a second benchmark reads them back."""
    name = os.path.basename(os.path.normpath(data))
    saved = os.path.join(work, f"{name}.npz")
    if not os.path.isfile(saved):
        from imgclf.cli import train
        from imgclf.engine import feature_trainer
        captured, original = {}, feature_trainer.FeatureTrainer.open_set

        def capture(self, head, stored, result):
            captured.update({split: (np.asarray(x, np.float32), np.asarray(y))
                             for split, (x, y) in stored.items()})
            return original(self, head, stored, result)
        feature_trainer.FeatureTrainer.open_set = capture
        try:
            save = os.path.join(work, name)
            assert train.main([data, "--save_dir", save, "--cache_dir",
                               os.path.join(save, "cache")]) == 0
        finally:
            feature_trainer.FeatureTrainer.open_set = original
        os.makedirs(work, exist_ok=True)
        np.savez(saved, **{f"{s}_{part}": v for s, pair in captured.items()
                           for part, v in zip(("x", "y"), pair)})
    arrays = np.load(saved)
    return {s: (arrays[f"{s}_x"], arrays[f"{s}_y"]) for s in ("train", "valid", "test")}


def auroc(known, unknown):
    """P(an unknown photo scores above a known one), ties counting half."""
    from scipy.stats import rankdata
    ranks = rankdata(np.concatenate([known, unknown]))[len(known):]
    return (ranks.sum() - len(unknown) * (len(unknown) + 1) / 2) / (len(unknown) * len(known))


def fpr95(known, unknown):
    return float((unknown <= np.percentile(known, 95)).mean())


def baseline_scores(head, train_x, train_y, sets):
    """{score: {set: values}} of issue 26's scores (higher = more novel), for sets {name: x}."""
    feats = {n: novelty.photo_features(x, head.view_set.test).numpy() for n, x in sets.items()}
    bank = novelty.unit_rows(novelty.photo_features(train_x, head.view_set.test)).numpy()
    raw = novelty.photo_features(train_x, head.view_set.test).numpy().astype(np.float64)
    means = np.stack([raw[train_y == c].mean(0) for c in np.unique(train_y)])
    centred = raw - means[train_y]
    cov = centred.T @ centred / len(raw)
    precision = np.linalg.pinv(cov + 1e-6 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    out = {s: {} for s in SCORES[1:]}
    for name, x in sets.items():
        logits = head.logits(torch.as_tensor(x))
        out["max softmax"][name] = -torch.softmax(logits, 1).max(1).values.numpy()
        out["energy"][name] = -torch.logsumexp(logits, 1).numpy()
        cos = novelty.unit_rows(torch.as_tensor(feats[name])).numpy() @ bank.T
        out["kNN cosine"][name] = -cos.max(1)
        diff = feats[name][:, None, :].astype(np.float64) - means[None]
        out["Mahalanobis"][name] = np.einsum("nkd,de,nke->nk", diff, precision, diff).min(1)
    return out


def one_split(stored, far, held, seed):
    """The figures of one split: held, the held-out classes."""
    x = np.concatenate([stored[s][0] for s in ("train", "valid")])
    y = np.concatenate([stored[s][1] for s in ("train", "valid")])
    known = ~np.isin(y, held)
    classes = np.unique(y[known])
    remap = np.full(y.max() + 1, -1)
    remap[classes] = np.arange(len(classes))
    train_x, train_y = torch.as_tensor(x[known]), remap[y[known]]
    test_x, test_y = stored["test"]
    in_test = ~np.isin(test_y, held)
    views = min(test_x.shape[1], x.shape[1])
    sets = {"known": test_x[in_test][:, :views],
            "near": np.concatenate([x[~known][:, :views], test_x[~in_test][:, :views]]),
            "far": far[:, :views] if far.shape[1] >= views else np.repeat(far, views, 1)}
    candidates = linear_probe.candidates(min(views, train_x.shape[1]))
    head, _ = linear_probe.choose_and_fit(train_x, train_y, len(classes), candidates, seed)
    held_out, scale = linear_probe.out_of_fold_fits(train_x, train_y, len(classes), head, seed)
    temperature, _, _ = calibration.fit_temperature(held_out.numpy(), train_y, scale)
    head.weight, head.bias = head.weight / temperature, head.bias / temperature
    entry = novelty.fit(train_x, train_y, head.view_set.test, held_out * (scale / temperature),
                        seed)
    scorer = novelty.NoveltyScorer(entry)
    scores = baseline_scores(head, train_x, train_y, sets)
    scores["novelty"] = {}
    for name, s in sets.items():
        logits = head.logits(torch.as_tensor(s))
        scores["novelty"][name] = scorer(novelty.photo_features(s, head.view_set.test),
                                         logits).numpy()
    logits = head.logits(torch.as_tensor(sets["known"])).numpy()
    probs = calibration.softmax(logits)
    figures = dict(accuracy=float((logits.argmax(1) == remap[test_y[in_test]]).mean()),
                   ece=calibration.expected_calibration_error(probs, remap[test_y[in_test]]),
                   ece_if_calibrated=calibration.ece_if_calibrated(probs),
                   called=float((scores["novelty"]["known"] > scorer.threshold).mean()),
                   temperature=temperature, bank_mb=novelty.entry_bytes(entry) / 1e6)
    for score, values in scores.items():
        for kind in ("near", "far"):
            figures[score, kind] = (auroc(values["known"], values[kind]),
                                    fpr95(values["known"], values[kind]))
    return figures


def print_table(rows, title):
    print(f"\n{title}")
    print("| score | near AUROC / FPR95 | far AUROC / FPR95 |\n|---|---|---|")
    for score in SCORES:
        cells = [np.mean([r[score, kind] for r in rows], 0) for kind in ("near", "far")]
        print(f"| {score} | " + " | ".join(f"{a:.3f} / {f:.3f}" for a, f in cells) + " |")
    mean = {k: np.mean([r[k] for r in rows]) for k in ("accuracy", "ece", "ece_if_calibrated",
                                                        "called", "temperature", "bank_mb")}
    print(f"known test photos: accuracy {100 * mean['accuracy']:.1f}%, ECE "
          f"{100 * mean['ece']:.2f}% (perfectly calibrated: {100 * mean['ece_if_calibrated']:.2f}%)"
          f", called unknown at the default threshold "
          f"{100 * mean['called']:.1f}%; temperature {mean['temperature']:.2f}; novelty data "
          f"{mean['bank_mb']:.2f} MB")


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    stored = stored_features(args.data, args.work)
    far = stored_features(args.far, args.work)["test"][0]
    classes = np.unique(stored["train"][1])
    hold = args.hold or (2 if len(classes) == 5 else len(classes) // 2)
    splits = list(itertools.combinations(classes.tolist(), hold))
    if len(splits) > args.splits:
        rng = np.random.default_rng(args.seed)
        splits = [splits[i] for i in sorted(rng.choice(len(splits), args.splits, False))]
    rows = []
    for held in splits:
        rows.append(one_split(stored, far, held, args.seed))
        r = rows[-1]
        print(f"held out {list(held)}: novelty near {r['novelty', 'near'][0]:.3f} / "
              f"{r['novelty', 'near'][1]:.3f}, far {r['novelty', 'far'][0]:.3f} / "
              f"{r['novelty', 'far'][1]:.3f}; energy near {r['energy', 'near'][0]:.3f}, kNN far "
              f"{r['kNN cosine', 'far'][0]:.3f}; accuracy {100 * r['accuracy']:.1f}%, ECE "
              f"{100 * r['ece']:.2f}% (perfectly calibrated: {100 * r['ece_if_calibrated']:.2f}%), "
              f"called unknown {100 * r['called']:.1f}%", flush=True)
    print_table(rows, f"{args.data}: {len(rows)} splits holding out {hold} of {len(classes)} "
                      f"classes; far: {args.far}'s test photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
