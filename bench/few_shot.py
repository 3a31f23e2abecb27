"""Make a few-shot copy of an image folder: N train and N valid photos a class, the test split
whole (as Oxford Flowers-102's official split: 10 + 10 a class).

    python bench/few_shot.py SRC DST N [--seed S]

SRC holds train/ valid/ [test/] class folders. The photos are hard links where SRC and DST
share a file system (copies elsewhere), chosen at random with the seed, the same on every run.
"""
import argparse
import os
import random
import shutil
import sys

SPLITS = ("train", "valid", "test")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", metavar="SRC", help="folder with train/ valid/ [test/] class folders")
    p.add_argument("dst", metavar="DST", help="folder to create (must not exist)")
    p.add_argument("n", type=int, metavar="N", help="train and valid photos a class")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    return p


def pick(files, n, rng):
    files = sorted(files)
    return sorted(rng.sample(files, min(n, len(files))))


def link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def make_few_shot(src, dst, n, seed=0):
    """Lay out dst; returns {split: photo count}."""
    rng = random.Random(seed)
    counts = {}
    for split in SPLITS:
        split_dir = os.path.join(src, split)
        if not os.path.isdir(split_dir):
            continue
        counts[split] = 0
        for cls in sorted(os.listdir(split_dir)):
            cls_dir = os.path.join(split_dir, cls)
            if not os.path.isdir(cls_dir):
                continue
            files = [f for f in os.listdir(cls_dir) if not f.startswith(".")]
            chosen = sorted(files) if split == "test" else pick(files, n, rng)
            os.makedirs(os.path.join(dst, split, cls))
            for name in chosen:
                link_or_copy(os.path.join(cls_dir, name), os.path.join(dst, split, cls, name))
            counts[split] += len(chosen)
    return counts


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.n <= 0:
        print(f"error: N {args.n}: must be greater than 0", file=sys.stderr)
        return 2
    if not os.path.isdir(os.path.join(args.src, "train")):
        print(f"error: {args.src}: no train/ folder; give a folder with train/ valid/ [test/]",
              file=sys.stderr)
        return 2
    if os.path.exists(args.dst):
        print(f"error: {args.dst}: already exists; give a new folder", file=sys.stderr)
        return 2
    counts = make_few_shot(args.src, args.dst, args.n, args.seed)
    print(f"{args.dst}: " + ", ".join(f"{s} {c}" for s, c in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
