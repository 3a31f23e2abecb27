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
                   help="input size of the reference (default: 224, as train.py)")
    p.add_argument("--fastai_size", type=int, default=128, metavar="PX",
                   help="input size of fastai (default: 128, the setting of the figure in the "
                        "issue that asked for this benchmark)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    rows = []
    for name in ("reference", "default", "finetune", "fastai"):
        if name in args.skip:
            continue
        size = args.fastai_size if name == "fastai" else args.size
        runs = [run_contender(name, args.data_dir, seed, size) for seed in range(args.seeds)]
        done = [r for r in runs if not isinstance(r, str)]
        if not done:
            rows.append(dict(name=name, note=runs[0]))
            continue
        rows.append(dict(name=name, seeds=len(done), acc=statistics.mean(a for a, _ in done),
                         wall=statistics.mean(w for _, w in done)))
    print_table(rows)
    return 0


NOT_INSTALLED = 3  # the exit status of a contender whose library is missing
SKIP_NOTES = {"fastai": "skipped: fastai is not installed (pip install fastai)",
              "reference": "skipped: scikit-learn is not installed"}


def run_contender(name, data_dir, seed, size):
    """(test accuracy in percent, wall seconds), or a note saying why there is none."""
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
    if done.returncode == NOT_INSTALLED and name in SKIP_NOTES:
        return SKIP_NOTES[name]
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"{name} (seed {seed}): no result: {tail[0]}", file=sys.stderr)
        return f"failed (exit status {done.returncode}): {tail[0][:80]}"
    print(f"{name} (seed {seed}): test acc {found.group(1)}%  {wall:.1f}s", file=sys.stderr)
    return float(found.group(1)), wall


def print_table(rows):
    """One row per contender; wall time also as a ratio to the reference's and fastai's."""
    walls = {r["name"]: r["wall"] for r in rows if "wall" in r}
    print(f"{'contender':<12}{'seeds':>6}{'test acc':>10}{'wall s':>9}{'x reference':>13}"
          f"{'x fastai':>10}")
    for r in rows:
        if "note" in r:
            print(f"{r['name']:<12}  {r['note']}")
            continue
        ratios = [f"{r['wall'] / walls[b]:.2f}" if b in walls else "-"
                  for b in ("reference", "fastai")]
        print(f"{r['name']:<12}{r['seeds']:>6}{r['acc']:>9.1f}%{r['wall']:>9.1f}{ratios[0]:>13}"
              f"{ratios[1]:>10}")


# ---------------------------------------------------------------------------------------------
# The contenders that are not train.py, each run in its own process
# ---------------------------------------------------------------------------------------------
def reference(data_dir, seed, size):
    """Plain linear probe: fp32 features of the centre crops, then LogisticRegression."""
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return NOT_INSTALLED
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
        return NOT_INSTALLED
    import torch
    from torch import nn
    sys.path.insert(0, ROOT)
    import model_utils

    def lite0_body(pretrained=True):
        backbone = model_utils.build_lite_backbone("efficientnet_lite0")
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
