"""What the default head costs: its time and peak memory on synthetic stored features, beside
one scikit-learn LogisticRegression fit (lbfgs, C=1) on the same rows.

    python bench/head_bench.py                                    # 10k and 100k photos
    python bench/head_bench.py --sizes 10000x100 1000000x1000     # photos x classes

Each size runs in a subprocess of its own (and scikit-learn in another), so each peak RSS is
that run's alone. The features are what train.py's default mode holds: float16, 2 views (the
plain one and its mirror image) of 1,280 values per photo, train+valid split 7:1 and joined as
feature_trainer.FeatureTrainer.logistic_head joins them. Each class's photos scatter round a centre of
their own (Gaussian, with per-feature scales and offsets as a backbone's features have), so
the fit is not trivially separable. The head runs as in train.py (linear_probe.choose_and_fit
on the run's threads rule); scikit-learn fits the plain and mirrored rows of train+valid in
float32, and is skipped where those would pass --sklearn_max_gb.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imgclf.analysis import data_issues  # noqa: E402
from imgclf.engine import feature_trainer  # noqa: E402
from imgclf.heads import linear_probe  # noqa: E402

DIM, VIEWS = 1280, 2


def build_parser():
    p = argparse.ArgumentParser(description="Time the default head against scikit-learn.")
    p.add_argument("--sizes", nargs="+", default=["10000x100", "10000x1000", "100000x100",
                                                   "100000x1000"], metavar="PHOTOSxCLASSES",
                   help="train+valid photos x classes (default: 10k and 100k x 100 and 1,000)")
    p.add_argument("--sklearn_max_gb", type=float, default=8.0, metavar="GB",
                   help="skip scikit-learn where its float32 rows would pass this (default: 8)")
    p.add_argument("--no_sklearn", action="store_true", help="time the head alone")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where the head fits (default: cpu)")
    p.add_argument("--passes", type=int, metavar="N",
                   help="instead of the whole head: the features joined and standardised, then "
                        "N L-BFGS iterations of one fit (its memory, and the seconds of a pass "
                        "over the rows, for sizes too slow to fit whole here)")
    p.add_argument("--data_issues", action="store_true",
                   help="then time train.py's next step in the same process: the search for "
                        "label errors (data_issues.out_of_fold_probs: 5 fits warm-started from "
                        "the head, where the choice was not cross-validated); the peak then "
                        "includes it")
    p.add_argument("--one", choices=["head", "sklearn"], help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.one:
        photos, classes = parse_size(args.sizes[0])
        if args.one == "head":
            print(json.dumps(run_head(photos, classes, args.device, args.passes,
                                      args.data_issues)))
        else:
            print(json.dumps(run_sklearn(photos, classes)))
        return 0
    if args.passes:
        print(f"{'photos':>9} {'classes':>7}  {'passes':>6} {'s a pass':>8} {'GiB':>6}  "
              f"features f32 GiB")
        for size in args.sizes:
            photos, classes = parse_size(size)
            probe = in_subprocess("head", size, args.device, args.passes)
            print(f"{photos:9d} {classes:7d}  {probe['passes']:6d} {probe['per_pass']:8.1f} "
                  f"{probe['peak_gib']:6.2f}  {photos * VIEWS * DIM * 4 / 2**30:.2f}", flush=True)
        return 0
    print(f"{'photos':>9} {'classes':>7}  {'head s':>8} {'head GiB':>8} {'head acc':>8}  "
          f"{'sklearn s':>9} {'sk GiB':>7} {'sk acc':>6}  {'ratio':>5}  features f32 GiB")
    for size in args.sizes:
        photos, classes = parse_size(size)
        head = in_subprocess("head", size, args.device, issues=args.data_issues)
        rows_gb = photos * VIEWS * DIM * 4 / 2**30
        sk = None if args.no_sklearn or rows_gb > args.sklearn_max_gb else \
            in_subprocess("sklearn", size, args.device)
        sk_cols = (f"{sk['seconds']:9.1f} {sk['peak_gib']:7.2f} {100 * sk['acc']:6.1f}  "
                   f"{head['seconds'] / sk['seconds']:5.2f}") if sk else f"{'-':>9} {'-':>7} " \
            f"{'-':>6}  {'-':>5}"
        print(f"{photos:9d} {classes:7d}  {head['seconds']:8.1f} {head['peak_gib']:8.2f} "
              f"{100 * head['acc']:8.1f}  {sk_cols}  {rows_gb:.2f}  ({head['line']})",
              flush=True)
        if args.data_issues:
            print(f"{'':18}then the search for label errors: {head['issues_seconds']:.1f} s",
                  flush=True)
    return 0


def parse_size(size):
    photos, classes = size.lower().split("x")
    return int(photos), int(classes)


def in_subprocess(what, size, device, passes=None, issues=False):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", what, "--sizes",
                          size, "--device", device] + (["--passes", str(passes)] if passes else [])
                         + ["--data_issues"] * issues, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic(photos, classes, seed, chunk=8192, dim=DIM):
    """(features (photos, 2, DIM) float16, labels): class centres plus noise per photo, the
    mirror view a noisier copy; made a chunk at a time, so memory is the float16 array. The
    seed draws the photos; the classes are the same for every seed."""
    g = torch.Generator().manual_seed(1234)  # the same classes in every split
    centres = torch.randn(classes, dim, generator=g) * 0.12 * (DIM / dim) ** 0.5
    scale = torch.rand(dim, generator=g) * 2 + 0.2
    offset = torch.rand(dim, generator=g) * 2
    g.manual_seed(seed)
    labels = torch.randint(classes, (photos,), generator=g)
    x = torch.empty(photos, VIEWS, dim, dtype=torch.float16)
    for start in range(0, photos, chunk):
        y = labels[start:start + chunk]
        plain = centres[y] + torch.randn(len(y), dim, generator=g)
        mirror = plain + 0.3 * torch.randn(len(y), dim, generator=g)
        x[start:start + chunk] = (torch.stack([plain, mirror], 1) * scale + offset).half()
    return x, labels.numpy()


def split(photos):
    """(train, valid) photo counts of train+valid, as train.py's default split has them."""
    valid = photos // 8
    return photos - valid, valid


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_head(photos, classes, device, passes=None, issues=False):
    train_n, valid_n = split(photos)
    train = synthetic(train_n, classes, seed=0)
    valid = synthetic(valid_n, classes, seed=1)
    test = synthetic(min(photos // 4, 20000), classes, seed=2)
    started = time.monotonic()
    # as feature_trainer.FeatureTrainer.logistic_head: the splits joined (and then held only there),
    # the threads rule
    x = torch.cat([train[0], valid[0]])
    y = np.concatenate([train[1], valid[1]])
    del train, valid
    threads = feature_trainer.head_threads(x, classes)
    if passes:
        return probe_passes(x, y, classes, device, passes, threads)
    with threads:
        head, scores = linear_probe.choose_and_fit(
            x, y, classes, linear_probe.candidates(VIEWS), valid=valid_n, device=device)
    seconds = time.monotonic() - started
    acc = (head.logits(test[0]).argmax(1).numpy() == test[1]).mean()
    result = dict(seconds=seconds, acc=float(acc),
                  line=linear_probe.choice_line(head, scores, seconds))
    if issues:  # as feature_trainer.FeatureTrainer.fit_logistic: the joined features, the threads rule
        started = time.monotonic()
        with feature_trainer.head_threads(x, classes):
            if head.held_out_logits is None:  # a cross-validated head kept them: no fit
                data_issues.out_of_fold_probs(x, y, classes, head, device=device)
        result["issues_seconds"] = time.monotonic() - started
    return dict(result, peak_gib=peak_gib())


def probe_passes(x, y, classes, device, iterations, threads):
    """A few L-BFGS iterations of the final fit's kind (plain + mirrored rows, float16 read in
    chunks, the scaling folded in): (seconds a pass over the rows, passes, peak)."""
    rows, labels, weights = linear_probe.training_rows(x, torch.as_tensor(y),
                                                       linear_probe.MIRRORED)
    scaler = linear_probe.Standardizer(rows, linear_probe.chunk_rows(classes, DIM))
    passes = []
    step = torch.optim.LBFGS.step

    def counted(self, closure):
        out = step(self, closure)
        passes.append(self.state[self._params[0]]["func_evals"])
        return out

    torch.optim.LBFGS.step = counted
    started = time.monotonic()
    with threads:
        linear_probe.fit_logistic(rows, labels, classes, 1.0, weights, scaler=scaler,
                                  device=device, max_iter=iterations)
    seconds = time.monotonic() - started
    return dict(per_pass=seconds / passes[0], passes=passes[0], peak_gib=peak_gib())


def run_sklearn(photos, classes):
    from sklearn.linear_model import LogisticRegression
    train_n, valid_n = split(photos)
    x = torch.cat([synthetic(train_n, classes, seed=0)[0], synthetic(valid_n, classes, 1)[0]])
    y = np.concatenate([synthetic(train_n, classes, seed=0)[1],
                        synthetic(valid_n, classes, seed=1)[1]])
    rows = x.reshape(-1, DIM).float().numpy()
    del x
    started = time.monotonic()
    fit = LogisticRegression(C=1.0, solver="lbfgs").fit(rows, np.repeat(y, VIEWS))
    seconds = time.monotonic() - started
    test = synthetic(min(photos // 4, 20000), classes, seed=2)
    acc = (fit.predict(test[0][:, 0].float().numpy()) == test[1]).mean()
    return dict(seconds=seconds, peak_gib=peak_gib(), acc=float(acc), iterations=int(fit.n_iter_[0]))


if __name__ == "__main__":
    sys.exit(main())
