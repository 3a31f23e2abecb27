"""Phone-sized photos against small ones: the same photos at their own size and as 12-megapixel
JPEGs, side by side.

    python bench/photo_sizes.py SRC WORK [--train 35 --valid 5 --test 20] [--skip NAME ...]

makes WORK/small (a subset of the data set SRC, which has train/ valid/ test/ class folders:
that many photos of each class per split, the files copied as they are) and WORK/12mp (the same
photos as 4032x3024 JPEGs of quality 90, upscaled, with a little grain, about 1.5 MB each, as
a phone takes them), unless they are there already, and prints for each:

- scan: photos/s of the data scan (train.py's "checking images"), empty scan cache, the CPU
  count's workers as train.py;
- features: views/s of the feature pass of a default run (the train split: plain and mirrored
  views), --workers as train.py's default;
- train: wall seconds of `train.py DIR` with default options (the whole process, empty caches)
  and of bench/train_bench.py's reference (float32 features of each photo decoded once at full
  size, scikit-learn's LogisticRegression), with the test accuracy of each;
- predict: wall seconds of `predict.py FOLDER CHECKPOINT` on the test photos, per photo.

Runs alternate between the two sizes (small, 12 MP, small, ...): on a shared machine compare the
ratios, which were taken side by side.
"""
import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHONE_SIZE = (4032, 3024)
SPLITS = ("train", "valid", "test")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", metavar="SRC", help="a data set with train/ valid/ test/ class folders")
    p.add_argument("work", metavar="WORK", help="where the two copies are made (kept)")
    for split, n in zip(SPLITS, (35, 5, 20)):
        p.add_argument(f"--{split}", type=int, default=n, metavar="N",
                       help=f"{split} photos of each class (default: {n})")
    p.add_argument("--skip", nargs="*", default=[], metavar="NAME",
                   choices=["scan", "features", "train", "reference", "predict"],
                   help="measurements to leave out")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    counts = dict(train=args.train, valid=args.valid, test=args.test)
    small = os.path.join(args.work, "small")
    phone = os.path.join(args.work, "12mp")
    make_copies(args.src, small, counts, copy_file)
    make_copies(small, phone, counts, phone_copy)
    sets = {"small": small, "12 MP": phone}
    rows = {}
    for name, measure in MEASUREMENTS:
        if name in args.skip:
            continue
        for label, folder in sets.items():
            rows.setdefault(name, {})[label] = measure(folder)
            print(f"{name} {label}: {rows[name][label]}", file=sys.stderr, flush=True)
    print_table(rows, sets, counts)
    return 0


# ---------------------------------------------------------------------------------------------
# The copies
# ---------------------------------------------------------------------------------------------
def make_copies(src, dest, counts, write):
    """The first counts[split] photos of each class of each split (sorted by name)."""
    marker = os.path.join(dest, ".complete")
    if os.path.exists(marker):
        return
    for split in SPLITS:
        for cls in sorted(os.listdir(os.path.join(src, split))):
            names = sorted(os.listdir(os.path.join(src, split, cls)))[:counts[split]]
            os.makedirs(os.path.join(dest, split, cls), exist_ok=True)
            for name in names:
                write(os.path.join(src, split, cls, name), os.path.join(dest, split, cls, name))
    open(marker, "w").close()


def copy_file(src, dest):
    shutil.copyfile(src, dest)


def phone_copy(src, dest):
    """A 4032x3024 JPEG of the photo: the centre 4:3 of it enlarged, with a little grain."""
    img = Image.open(src).convert("RGB")
    w, h = img.size
    crop_h = min(h, round(w * 3 / 4))
    crop_w = round(crop_h * 4 / 3)
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    big = img.crop((left, top, left + crop_w, top + crop_h)).resize(PHONE_SIZE, Image.BICUBIC)
    rng = np.random.default_rng(abs(hash(os.path.basename(src))) % 2**32)
    grain = rng.standard_normal((PHONE_SIZE[1], PHONE_SIZE[0], 1), dtype=np.float32) * 2.5
    pixels = np.clip(np.asarray(big, dtype=np.float32) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.splitext(dest)[0] + ".jpg", quality=90)


# ---------------------------------------------------------------------------------------------
# The measurements, each in its own process with empty caches
# ---------------------------------------------------------------------------------------------
def photo_count(folder):
    return sum(len([n for n in files if not n.startswith(".")])
               for _, _, files in os.walk(folder))


def run(cmd):
    """(output, wall seconds, CPU seconds of all its processes): on a shared machine the CPU
    seconds say more than the wall."""
    start, cpu = time.monotonic(), children_cpu()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall, cpu = time.monotonic() - start, children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr, wall, cpu


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def scan_rate(folder):
    code = ("import sys, tempfile, time; sys.path.insert(0, '.'); import data_utils\n"
            "with tempfile.TemporaryDirectory() as cache:\n"
            "    start = time.perf_counter()\n"
            f"    data_utils.scan_dataset({folder!r}, cache_dir=cache)\n"
            "    print('seconds', time.perf_counter() - start)")
    out, _, _ = run([sys.executable, "-c", code])
    seconds = float(re.search(r"seconds (\S+)", out)[1])
    return dict(rate=photo_count(folder) / seconds)


def train_runs(folder):
    """Wall and test accuracy of the default train.py, and the feature pass's rate on train."""
    with tempfile.TemporaryDirectory() as work:
        out, wall, cpu = run([sys.executable, "train.py", folder, "--save_dir", work,
                         "--cache_dir", os.path.join(work, "cache"), "--seed", "0"])
        predict = predict_time(folder, os.path.join(work, "checkpoint.pth"))
    rate = re.findall(r"features train.*?(\d+)/\d+ .*?(\d+\.\d+)/s", out)
    acc = re.search(r"^test acc (\d+(?:\.\d+)?)%", out, re.M)
    return dict(wall=wall, cpu=cpu, acc=float(acc[1]) if acc else None,
                views=float(rate[-1][1]) if rate else None, predict=predict)


def predict_time(folder, checkpoint):
    test = os.path.join(folder, "test")
    _, wall, _ = run([sys.executable, "predict.py", test, checkpoint])
    return wall / photo_count(test)


def reference_run(folder):
    out, wall, cpu = run([sys.executable, os.path.join(ROOT, "bench", "train_bench.py"),
                          "--reference", folder, "0", "224"])
    acc = re.search(r"test acc \(reference C tuned\) (\d+(?:\.\d+)?)%", out)
    return dict(wall=wall, cpu=cpu, acc=float(acc[1]))


MEASUREMENTS = [("scan", scan_rate), ("train", train_runs), ("reference", reference_run)]


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------
def print_table(rows, sets, counts):
    labels = list(sets)
    print(f"photos a class: train {counts['train']}, valid {counts['valid']}, test "
          f"{counts['test']}; {os.cpu_count()} CPUs")
    print(f"{'':<34}" + "".join(f"{label:>12}" for label in labels) + f"{'ratio':>10}")

    def line(name, values, fmt):
        shown = [fmt.format(v) if v is not None else "-" for v in values]
        ratio = (f"{values[1] / values[0]:.2f}x" if None not in values[:2] and values[0]
                 else "-")
        print(f"{name:<34}" + "".join(f"{s:>12}" for s in shown) + f"{ratio:>10}")

    def get(name, key):
        return [rows.get(name, {}).get(label, {}).get(key) for label in labels]

    line("scan, photos/s", get("scan", "rate"), "{:.0f}")
    line("features train, views/s", get("train", "views"), "{:.1f}")
    line("train.py default, wall s", get("train", "wall"), "{:.1f}")
    line("reference, wall s", get("reference", "wall"), "{:.1f}")
    walls = get("train", "wall")
    refs = get("reference", "wall")
    line("default / reference wall", [w / r if w and r else None for w, r in zip(walls, refs)],
         "{:.2f}")
    line("train.py default, CPU s", get("train", "cpu"), "{:.0f}")
    line("reference, CPU s", get("reference", "cpu"), "{:.0f}")
    cpus, ref_cpus = get("train", "cpu"), get("reference", "cpu")
    line("default / reference CPU", [c / r if c and r else None for c, r in zip(cpus, ref_cpus)],
         "{:.2f}")
    line("test acc default, %", get("train", "acc"), "{:.1f}")
    line("test acc reference (C tuned), %", get("reference", "acc"), "{:.1f}")
    line("predict.py on test/, s a photo", get("train", "predict"), "{:.3f}")


if __name__ == "__main__":
    sys.exit(main())
