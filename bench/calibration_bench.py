"""Calibration of the default head on test photos, by how its temperature is chosen.

    python bench/calibration_bench.py WORK DATA [DATA ...] [--hold 1,3 ...] [--seed S]

Each DATA (train/ valid/ test/ class folders) is trained on once by train.py, its features kept
in WORK/<name>.npz (open_set_bench.stored_features: a second run, or open_set_bench's, reads
them back). On them, as train.py fits them: the head on train+valid (cross-validated C and
views), its out-of-fold logits (linear_probe.out_of_fold_fits); then the expected calibration
error (ECE, 15 bins) and the log loss of the test photos for each way of choosing the
temperature, all fitted on held-out logits only:

- none: temperature 1;
- gated: the out-of-fold logits' temperature, kept where it lowers their ECE by half a point
  (what train.py did until 2026-12-03);
- fold: the out-of-fold logits' temperature, always;
- scaled (shipped): that temperature times how much larger the head's logits are than the fold
  heads' (out_of_fold_fits' scale).

Beside them: the ECE a perfectly calibrated model would measure on the same test photos
(calibration.ece_if_calibrated), the accuracy (no temperature changes it). With --hold, each
comma-separated list of classes is also held out of the first DATA in a run of its own (the
head trained on the other classes, tested on their test photos).
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imgclf.analysis import calibration  # noqa: E402
from imgclf.heads import linear_probe  # noqa: E402

from open_set_bench import stored_features  # noqa: E402

RULES = ("none", "gated", "fold", "scaled")
OLD_MIN_GAIN = 0.005  # the gated rule's half point


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", metavar="WORK", help="folder for the runs and feature caches")
    p.add_argument("data", nargs="+", metavar="DATA", help="data sets to train on")
    p.add_argument("--hold", action="append", default=[], metavar="I,J",
                   help="classes of the first DATA to hold out in a run of their own "
                        "(repeatable; default: none)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="(default: 0)")
    return p


def temperatures(held_out, labels, scale):
    """{rule: temperature}, each fitted on the out-of-fold logits alone."""
    fold, before, after = calibration.fit_temperature(held_out, labels)
    return dict(none=1.0, gated=fold if before - after >= OLD_MIN_GAIN else 1.0, fold=fold,
                scaled=fold * scale)


def one_run(stored, keep, seed):
    """The figures of one run: the head on train+valid photos of the classes in keep."""
    x = np.concatenate([stored[s][0] for s in ("train", "valid")])
    y = np.concatenate([stored[s][1] for s in ("train", "valid")])
    test_x, test_y = stored["test"]
    remap = np.full(max(y.max(), test_y.max()) + 1, -1)
    remap[keep] = np.arange(len(keep))
    fit, test = np.isin(y, keep), np.isin(test_y, keep)
    views = min(x.shape[1], test_x.shape[1])
    x, y = torch.as_tensor(x[fit][:, :views]), remap[y[fit]]
    test_x, test_y = torch.as_tensor(test_x[test][:, :views]), remap[test_y[test]]
    head, _ = linear_probe.choose_and_fit(x, y, len(keep), linear_probe.candidates(views), seed)
    held_out, scale = linear_probe.out_of_fold_fits(x, y, len(keep), head, seed)
    logits = head.logits(test_x).numpy()
    figures = dict(photos=len(test_y), accuracy=float((logits.argmax(1) == test_y).mean()),
                   scale=scale, floor=calibration.ece_if_calibrated(calibration.softmax(logits)))
    for rule, t in temperatures(held_out.numpy(), y, scale).items():
        figures[rule] = (t, calibration.expected_calibration_error(
            calibration.softmax(logits, t), test_y), calibration.log_loss(logits, test_y, t))
    return figures


def print_row(name, f):
    cells = " | ".join(f"{100 * f[r][1]:.2f}% ({f[r][0]:.2f})" for r in RULES)
    losses = " / ".join(f"{f[r][2]:.3f}" for r in RULES)
    print(f"| {name} | {f['photos']} | {100 * f['accuracy']:.1f}% | {cells} | "
          f"{100 * f['floor']:.2f}% | {losses} | {f['scale']:.3f} |", flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    print("| set | test photos | accuracy | ECE (temperature): " + " | ".join(RULES)
          + " | perfectly calibrated | log loss: " + " / ".join(RULES) + " | scale |")
    print("|---|---:|---:|" + "---:|" * len(RULES) + "---:|---|---:|")
    runs = []
    for i, data in enumerate(args.data):
        stored = stored_features(data, args.work)
        classes = np.unique(stored["train"][1])
        name = os.path.basename(os.path.normpath(data))
        runs.append((name, stored, classes))
        print_row(name, one_run(stored, classes, args.seed))
    for spec in args.hold:
        name, stored, classes = runs[0]
        held = [int(c) for c in spec.split(",")]
        print_row(f"{name} without {held}", one_run(stored, np.setdiff1d(classes, held),
                                                     args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
