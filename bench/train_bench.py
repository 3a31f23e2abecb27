"""Training benchmark: our modes against a plain linear probe and fastai, on one data set.

    python bench/train_bench.py DATA_DIR [--seeds 1] [--skip finetune fastai]

Each contender runs as its own process, one after another, on the same data and backbone
(EfficientNet-Lite0), with empty caches, and the table gives test accuracy, wall seconds (the
whole process: imports, scan, features, training) and the ratio to the reference's wall time.

1. reference: frozen backbone features of the plain images (fp32, as a straightforward script
   computes them), then scikit-learn's LogisticRegression;
2. train.py with default options;
3. train.py --finetune;
4. fastai's vision_learner(...).fine_tune(3) with the same backbone weights (skipped with a
   note when fastai is not installed).
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


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", metavar="DATA_DIR", help="folder with train/ valid/ test/")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="seeds per contender; the table shows the mean (default: 1)")
    p.add_argument("--skip", nargs="*", default=[], metavar="NAME",
                   choices=["reference", "default", "finetune", "fastai"],
                   help="contenders to leave out")
    p.add_argument("--size", type=int, default=224, metavar="PX",
                   help="input size of the reference and fastai (default: 224)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    rows = []
    for name in ("reference", "default", "finetune", "fastai"):
        if name in args.skip:
            continue
        runs = [run_contender(name, args.data_dir, seed, args.size) for seed in range(args.seeds)]
        runs = [r for r in runs if r]
        if not runs:
            rows.append((name, None, None, "skipped: " + SKIP_NOTES.get(name, "failed")))
            continue
        rows.append((name, statistics.mean(a for a, _ in runs),
                     statistics.mean(w for _, w in runs), ""))
    print_table(rows)
    return 0


SKIP_NOTES = {"fastai": "fastai is not installed (pip install fastai)",
              "reference": "scikit-learn is not installed"}


def run_contender(name, data_dir, seed, size):
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
    found = re.search(r"^test acc (\d+(?:\.\d+)?)%$", done.stdout, re.M)
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"{name} (seed {seed}): no result: {tail[0]}", file=sys.stderr)
        return None
    print(f"{name} (seed {seed}): test acc {found.group(1)}%  {wall:.1f}s", file=sys.stderr)
    return float(found.group(1)), wall


def print_table(rows):
    reference = next((w for n, _, w, _ in rows if n == "reference" and w), None)
    print(f"{'contender':<12}{'test acc':>10}{'wall s':>10}{'x reference':>13}")
    for name, acc, wall, note in rows:
        if acc is None:
            print(f"{name:<12}  {note}")
            continue
        ratio = f"{wall / reference:.2f}" if reference else "-"
        print(f"{name:<12}{acc:>9.1f}%{wall:>10.1f}{ratio:>13}")


# ---------------------------------------------------------------------------------------------
# The contenders that are not train.py, each run in its own process
# ---------------------------------------------------------------------------------------------
def reference(data_dir, seed, size):
    """Plain linear probe: fp32 features of the centre crops, then LogisticRegression."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return 3
    import numpy as np
    import torch
    from torchvision import datasets, transforms
    sys.path.insert(0, ROOT)
    import model_utils
    torch.manual_seed(seed)
    backbone = model_utils.build_lite_backbone("efficientnet_lite0").eval()
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

    train_x, train_y = features("train")
    test_x, test_y = features("test")
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(train_x, train_y)
    print(f"test acc {100 * clf.score(test_x, test_y):.1f}%")
    return 0


def fastai_finetune(data_dir, seed, size, work):
    """fastai's fine_tune(3) with the same EfficientNet-Lite0 weights as a custom backbone."""
    try:
        from fastai.vision.all import (ImageDataLoaders, Normalize, Resize, accuracy,
                                       aug_transforms, vision_learner)
    except ImportError:
        return 3
    import torch
    from torch import nn
    sys.path.insert(0, ROOT)
    import model_utils

    def lite0_body(pretrained=True):
        backbone = model_utils.build_lite_backbone("efficientnet_lite0")
        # fastai cuts a body and adds its own pooling head: drop our global pooling.
        return nn.Sequential(nn.Sequential(backbone._conv_stem, backbone._bn0, nn.ReLU6()),
                             *backbone._blocks,
                             nn.Sequential(backbone._conv_head, backbone._bn1, nn.ReLU6()))

    torch.manual_seed(seed)
    dls = ImageDataLoaders.from_folder(data_dir, train="train", valid="valid", seed=seed,
                                       item_tfms=Resize(size),
                                       batch_tfms=[*aug_transforms(),
                                                   Normalize.from_stats([0.5] * 3, [0.5] * 3)],
                                       bs=32, num_workers=2)
    learn = vision_learner(dls, lite0_body, metrics=accuracy, pretrained=True, cut=None,
                           normalize=False, path=work)
    learn.fine_tune(3)
    test_dl = dls.test_dl(
        [os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(data_dir, "test")) for f in fs],
        with_labels=True)
    _, acc = learn.validate(dl=test_dl)
    print(f"test acc {100 * float(acc):.1f}%")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--reference":
        sys.exit(reference(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    if len(sys.argv) > 1 and sys.argv[1] == "--fastai":
        sys.exit(fastai_finetune(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
    sys.exit(main())
