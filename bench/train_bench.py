"""Training benchmark panel: our modes against a plain linear probe, on several data sets.

    python bench/train_bench.py SET [SET ...] [--seeds N] [--skip finetune]

Each contender runs as its own process, one after another, on the same data and backbone
(EfficientNet-Lite0), with empty caches. Per set, the table gives test accuracy and wall
seconds (the whole process: imports, scan, features, training) of:

1. reference: frozen backbone features of the plain images (fp32, as a straightforward script
   computes them), then scikit-learn's LogisticRegression, with C=1 (its default) and with C
   chosen on the valid split (one process, one feature pass, two fits);
2. train.py with default options;
3. train.py --finetune;
4. fastai's vision_learner(...).fine_tune(3) with the same backbone weights (only with
   --fastai; a note when fastai is not installed).

Sets whose test split has fewer than 500 photos run --seeds seeds of our modes (default 3),
larger ones one: the table shows the mean. The reference has no randomness and runs once.
Make few-shot copies of a set with bench/few_shot.py.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference's grid of C when it is chosen on the valid split.
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
FEW_TEST_PHOTOS = 500  # below this, our modes run several seeds
NOT_INSTALLED = 3  # the exit status of a contender whose library is missing
SKIP_NOTES = {"fastai": "fastai is not installed (pip install fastai)",
              "reference": "scikit-learn is not installed"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sets", nargs="+", metavar="SET",
                   help="folders with train/ valid/ test/ class folders")
    p.add_argument("--seeds", type=int, default=3, metavar="N",
                   help=f"seeds of our modes on sets whose test split has fewer than "
                        f"{FEW_TEST_PHOTOS} photos; the table shows the mean (default: 3)")
    p.add_argument("--skip", nargs="*", default=[], metavar="NAME",
                   choices=["reference", "default", "finetune"],
                   help="contenders to leave out")
    p.add_argument("--fastai", action="store_true",
                   help="also run fastai's fine_tune(3) (at --fastai_size px)")
    p.add_argument("--size", type=int, default=224, metavar="PX",
                   help="input size of the reference (default: 224, as train.py)")
    p.add_argument("--fastai_size", type=int, default=128, metavar="PX",
                   help="input size of fastai (default: 128)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    contenders = [c for c in ("reference", "default", "finetune") if c not in args.skip]
    contenders += ["fastai"] if args.fastai else []
    rows = [bench_set(data_dir, contenders, args) for data_dir in args.sets]
    print()
    print_table(rows, contenders)
    return 0


def bench_set(data_dir, contenders, args):
    counts = {s: count_photos(os.path.join(data_dir, s)) for s in ("train", "valid", "test")}
    classes = len(os.listdir(os.path.join(data_dir, "train")))
    seeds = args.seeds if counts["test"] < FEW_TEST_PHOTOS else 1
    row = dict(set=os.path.basename(os.path.normpath(data_dir)), classes=classes,
               regime=regime(counts, classes), seeds=seeds, acc={}, wall={})
    for name in contenders:
        size = args.fastai_size if name == "fastai" else args.size
        runs = [run_contender(name, data_dir, seed, size)
                for seed in range(1 if name == "reference" else seeds)]
        done = [r for r in runs if not isinstance(r, str)]
        if not done:
            row["acc"][name] = runs[0]
            continue
        for key in done[0][0]:
            row["acc"][key] = statistics.mean(accs[key] for accs, _ in done)
        row["wall"][name] = statistics.mean(w for _, w in done)
    return row


def count_photos(folder):
    return sum(len(files) for _, _, files in os.walk(folder)) if os.path.isdir(folder) else 0


def regime(counts, classes):
    per_class = counts["train"] / classes
    return (f"{counts['train']}/{counts['valid']}/{counts['test']}, "
            f"~{per_class:.0f} train a class")


def run_contender(name, data_dir, seed, size):
    """({result name: test accuracy in percent}, wall seconds), or a note saying why there is
    none. The reference reports two results: C=1 and C tuned on valid."""
    work = tempfile.mkdtemp(prefix=f"bench-{name}-")
    try:
        if name == "reference":
            cmd = [sys.executable, __file__, "--reference", data_dir, str(seed), str(size)]
        elif name == "fastai":
            cmd = [sys.executable, __file__, "--fastai", data_dir, str(seed), str(size), work]
        else:
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), data_dir, "--save_dir", work,
                   "--seed", str(seed)] + (["--finetune"] if name == "finetune" else [])
        start = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.monotonic() - start
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if done.returncode == NOT_INSTALLED and name in SKIP_NOTES:
        return SKIP_NOTES[name]
    found = dict(re.findall(r"^test acc(?: \((.*?)\))? (\d+(?:\.\d+)?)%", done.stdout, re.M))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"{name} (seed {seed}): no result: {tail[0]}", file=sys.stderr)
        return f"failed (exit status {done.returncode}): {tail[0][:60]}"
    accs = {key or name: float(acc) for key, acc in found.items()}
    print(f"{os.path.basename(os.path.normpath(data_dir))} {name} (seed {seed}): "
          f"{accs}  {wall:.1f}s", file=sys.stderr, flush=True)
    return accs, wall


def print_table(rows, contenders):
    """One row per set: accuracies, then wall seconds and their ratio to the reference's; a
    last row with the mean accuracy over the sets."""
    acc_cols = [k for k in ("reference C=1", "reference C tuned", "default", "finetune",
                            "fastai") if any(k in r["acc"] for r in rows)]
    wall_cols = [c for c in contenders if c != "reference"]
    head = f"{'set':<14}{'train/valid/test, regime':<32}{'seeds':>6}"
    head += "".join(f"{short(k):>10}" for k in acc_cols)
    head += f"{'ref s':>8}" + "".join(f"{c + ' s':>12}{'x ref':>7}" for c in wall_cols)
    print(head)
    for r in rows:
        line = f"{r['set']:<14}{r['regime']:<32}{r['seeds']:>6}"
        line += "".join(f"{cell(r['acc'].get(k)):>10}" for k in acc_cols)
        ref = r["wall"].get("reference")
        line += f"{ref:>8.0f}" if ref else f"{'-':>8}"
        for c in wall_cols:
            wall = r["wall"].get(c)
            line += f"{wall:>12.0f}" if wall else f"{'-':>12}"
            line += f"{wall / ref:>7.2f}" if wall and ref else f"{'-':>7}"
        print(line)
    means = [statistics.mean(r["acc"][k] for r in rows)
             if all(isinstance(r["acc"].get(k), float) for r in rows) else None
             for k in acc_cols]
    print(f"{'mean':<52}" + "".join(f"{cell(m):>10}" for m in means))
    for r in rows:
        for k, v in r["acc"].items():
            if isinstance(v, str):
                print(f"{r['set']} {k}: {v}")


def short(key):
    return {"reference C=1": "ref C=1", "reference C tuned": "ref tuned"}.get(key, key)


def cell(value):
    return f"{value:.1f}%" if isinstance(value, float) else "-"


# ---------------------------------------------------------------------------------------------
# The contenders that are not train.py, each run in its own process
# ---------------------------------------------------------------------------------------------
def reference(data_dir, seed, size):
    """Plain linear probe: fp32 features of the centre crops, then LogisticRegression with C=1
    and with C chosen by accuracy on the valid split (fit on train alone)."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return NOT_INSTALLED
    import numpy as np
    import torch
    from torchvision import datasets, transforms
    sys.path.insert(0, ROOT)
    from imgclf.models import efficientnet_lite
    torch.manual_seed(seed)
    backbone = efficientnet_lite.build_lite_backbone("efficientnet_lite0").eval()
    tf = transforms.Compose([transforms.Resize(int(size / 0.875)), transforms.CenterCrop(size),
                             transforms.ToTensor(),
                             transforms.Normalize([0.5] * 3, [0.5] * 3)])

    def features(split):
        folder = datasets.ImageFolder(os.path.join(data_dir, split), tf)
        loader = torch.utils.data.DataLoader(folder, batch_size=64, num_workers=2)
        xs, ys = [], []
        with torch.no_grad():
            for x, y in loader:
                xs.append(backbone(x).numpy())
                ys.append(y.numpy())
        return np.concatenate(xs), np.concatenate(ys)

    def fit(train, c):
        return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(*train)

    train, valid, test = features("train"), features("valid"), features("test")
    print(f"test acc (reference C=1) {100 * fit(train, 1.0).score(*test):.1f}%")
    # max() keeps the first of equals: the smallest C, the strongest regularisation
    best_c = max(C_GRID, key=lambda c: fit(train, c).score(*valid))
    print(f"test acc (reference C tuned) {100 * fit(train, best_c).score(*test):.1f}%  "
          f"(C={best_c:g})")
    return 0


def fastai_finetune(data_dir, seed, size, work):
    """fastai's fine_tune(3) with the same EfficientNet-Lite0 weights as a custom backbone."""
    try:
        from fastai.vision.all import (
            ImageDataLoaders,
            Normalize,
            Resize,
            accuracy,
            aug_transforms,
            vision_learner,
        )
    except ImportError:
        return NOT_INSTALLED
    import torch
    from torch import nn
    sys.path.insert(0, ROOT)
    from imgclf.models import efficientnet_lite

    def lite0_body(pretrained=True):
        backbone = efficientnet_lite.build_lite_backbone("efficientnet_lite0")
        # fastai cuts the model before its last pooling layer and adds its own pooling head.
        return nn.Sequential(nn.Sequential(backbone._conv_stem, backbone._bn0, nn.ReLU6()),
                             *backbone._blocks,
                             nn.Sequential(backbone._conv_head, backbone._bn1, nn.ReLU6()),
                             nn.AdaptiveAvgPool2d(1))

    torch.manual_seed(seed)

    def loaders(valid):
        return ImageDataLoaders.from_folder(data_dir, train="train", valid=valid, seed=seed,
                                            item_tfms=Resize(size),
                                            batch_tfms=[*aug_transforms(),
                                                        Normalize.from_stats([0.5] * 3, [0.5] * 3)],
                                            bs=32, num_workers=2)

    dls = loaders("valid")
    learn = vision_learner(dls, lite0_body, metrics=accuracy, pretrained=True,
                           normalize=False, path=work)
    learn.fine_tune(3)
    test = loaders("test")  # the same classes in the same (sorted) order
    assert list(test.vocab) == list(dls.vocab)
    _, acc = learn.validate(dl=test.valid)
    print(f"test acc {100 * float(acc):.1f}%")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--reference":
        sys.exit(reference(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    if len(sys.argv) > 1 and sys.argv[1] == "--fastai":
        sys.exit(fastai_finetune(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
    sys.exit(main())
