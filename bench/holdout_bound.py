"""From how many valid photos is choosing the head's C on the valid split (a warm-started path)
as good as 5-fold cross-validation over train+valid? linear_probe.HOLDOUT_MIN_PHOTOS is set
from this.

    python bench/holdout_bound.py [--classes 20] [--dim 128] [--seeds 3]

On head_bench.py's synthetic features (class centres plus noise, 2 views), train:valid 7:1 as
train.py splits, for valid splits of 125 to 2,000 photos: the test log loss and accuracy of the
head each way chooses and fits, and the seconds each took (one thread), averaged over seeds.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from head_bench import synthetic  # noqa: E402

from imgclf.heads import linear_probe  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="Cross-validation against a valid-split choice.")
    p.add_argument("--classes", type=int, default=20, metavar="N", help="classes (default: 20)")
    p.add_argument("--dim", type=int, default=128, metavar="N", help="features (default: 128)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="data sets (default: 3)")
    p.add_argument("--valid", type=int, nargs="+", default=[125, 250, 500, 1000, 2000],
                   metavar="N", help="valid photos (default: 125 250 500 1000 2000)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'valid':>6} {'photos':>7}  {'test loss CV':>12} {'valid':>7}  {'test acc CV':>11} "
          f"{'valid':>6}  {'seconds CV':>10} {'valid':>6}")
    for valid in args.valid:
        runs = np.array([compare(valid, args, seed) for seed in range(args.seeds)]).mean(0)
        print(f"{valid:6d} {8 * valid:7d}  {runs[0]:12.4f} {runs[1]:7.4f}  {100 * runs[2]:11.2f} "
              f"{100 * runs[3]:6.2f}  {runs[4]:10.1f} {runs[5]:6.1f}", flush=True)
    return 0


def compare(valid, args, seed):
    """(test loss, test loss, accuracy, accuracy, seconds, seconds): cross-validation, then the
    valid split."""
    train = synthetic(7 * valid, args.classes, 3 * seed, dim=args.dim)
    held = synthetic(valid, args.classes, 3 * seed + 1, dim=args.dim)
    test = synthetic(5000, args.classes, 3 * seed + 2, dim=args.dim)
    x, y = torch.cat([train[0], held[0]]), np.concatenate([train[1], held[1]])
    view_sets = linear_probe.candidates(2)
    losses, accs, seconds = [], [], []
    for bound in (float("inf"), 0):  # cross-validation always; the valid split always
        linear_probe.HOLDOUT_MIN_PHOTOS = bound
        started = time.monotonic()
        head, _ = linear_probe.choose_and_fit(x, y, args.classes, view_sets, seed, valid=valid)
        seconds.append(time.monotonic() - started)
        logits = head.logits(test[0])
        truth = torch.as_tensor(test[1])
        losses.append(F.cross_entropy(logits, truth).item())
        accs.append((logits.argmax(1) == truth).float().mean().item())
    return (*losses, *accs, *seconds)


if __name__ == "__main__":
    sys.exit(main())
