"""Peak memory of train.py as the number of images grows.

    python bench/memory_bench.py [--sizes 10000 100000] [--keep DIR]

For each size N it writes N small PNGs (16x16, random pixels, 10 class folders, no split
folders so train.py splits them) into a temporary folder, then runs, each in a fresh process:

  scan   train.py DATA --check                         (decodes and checks every image)
  train  train.py DATA --image_size 32 --epochs 1 --aug_views 2 --head adamw   (stores features,
         trains the head)

and prints the peak resident memory (ru_maxrss) of train.py's own process up to its exit
handlers, of the largest of its children (the image-decoding workers), and of the whole run as
/usr/bin/time -v reports it (wait4: the process or any child, up to the very end, where
unloading torch's libraries pages in ~150 MB of their code whatever the data), and the wall
time. The training run finds the scan cached by the first.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 10
# Runs train.py in this very process (so RUSAGE_SELF is train.py's own peak) and writes the
# peaks of the process and of its children to the file named by MEMORY_BENCH_OUT at exit.
SHIM = """
import atexit, json, os, resource, runpy, sys
def report():
    with open(os.environ["MEMORY_BENCH_OUT"], "w") as f:
        json.dump([resource.getrusage(who).ru_maxrss * 1024
                   for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)], f)
atexit.register(report)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def build_parser():
    p = argparse.ArgumentParser(description="Peak RSS of train.py's scan and training run "
                                            "for generated image folders of several sizes.")
    p.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000], metavar="N",
                   help="numbers of images (default: 10000 100000)")
    p.add_argument("--train", default=os.path.join(ROOT, "train.py"), metavar="PATH",
                   help="the train.py to measure (default: this checkout's)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="--workers of the runs (default: 2)")
    p.add_argument("--train_args",
                   default="--image_size 32 --epochs 1 --aug_views 2 --head adamw",
                   metavar="ARGS", help="options of the training run (default: '--image_size 32 "
                                        "--epochs 1 --aug_views 2 --head adamw')")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="OMP_NUM_THREADS of the runs (default: 1; on a busy shared CPU more "
                        "threads than free cores slow the backbone down many times)")
    p.add_argument("--keep", metavar="DIR",
                   help="generate into DIR and keep it (reused when it holds N images)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    base = args.keep or tempfile.mkdtemp(prefix="memory-bench-")
    try:
        rows = []
        for n in args.sizes:
            data = os.path.join(base, f"images-{n}")
            seconds = generate(data, n)
            print(f"{n} images: generated in {seconds:.0f}s", flush=True)
            work = tempfile.mkdtemp(prefix=f"run-{n}-", dir=base)
            common = [data, "--cache_dir", os.path.join(work, "cache"), "--workers",
                      str(args.workers)]
            for step, extra in (("scan", ["--check"]),
                                ("train", args.train_args.split() +
                                 ["--save_dir", os.path.join(work, "run")])):
                (rss, workers, whole), seconds, status = peak_rss(
                    [args.train, *common, *extra], args.threads, work)
                rows.append((n, step, rss, seconds, status))
                print(f"{n:>7} images  {step:<5}  peak RSS {rss / 2**20:6.0f} MiB  largest "
                      f"child {workers / 2**20:4.0f} MiB  whole run {whole / 2**20:6.0f} MiB  "
                      f"{seconds:6.1f}s  exit {status}", flush=True)
            shutil.rmtree(work)
        print_growth(rows)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


def generate(folder, n):
    """n 16x16 PNGs of random pixels in 10 class folders; skipped when already there."""
    marker = folder + ".complete"
    if os.path.exists(marker):
        return 0.0
    start = time.monotonic()
    rng = np.random.default_rng(n)
    for c in range(CLASSES):
        os.makedirs(os.path.join(folder, f"class{c}"), exist_ok=True)
    for start_i in range(0, n, 10_000):
        count = min(10_000, n - start_i)
        pixels = rng.integers(0, 256, size=(count, 16, 16, 3), dtype=np.uint8)
        for j in range(count):
            i = start_i + j
            Image.fromarray(pixels[j]).save(
                os.path.join(folder, f"class{i % CLASSES}", f"{i:07d}.png"), compress_level=1)
    open(marker, "w").close()
    return time.monotonic() - start


def peak_rss(cmd, threads, work):
    """((peak resident bytes of the script's process, of its largest child, of the whole run),
    seconds, exit status) of python SCRIPT ARGS... given as cmd."""
    out = os.path.join(work, "rss.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MEMORY_BENCH_OUT=out)
    start = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", SHIM, *cmd], stdout=subprocess.DEVNULL,
                                stderr=err, cwd=ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        if proc.returncode:
            err.seek(0)
            print(err.read().decode(errors="replace")[-2000:], file=sys.stderr)
    with open(out) as f:
        own, children = json.load(f)
    return (own, children, usage.ru_maxrss * 1024), seconds, proc.returncode


def print_growth(rows):
    sizes = sorted({n for n, *_ in rows})
    if len(sizes) < 2:
        return
    small, large = sizes[0], sizes[-1]
    for step in ("scan", "train"):
        rss = {n: r for n, s, r, *_ in rows if s == step}
        per_image = (rss[large] - rss[small]) / (large - small)
        print(f"{step}: {small} -> {large} images: peak RSS {rss[small] / 2**20:.0f} -> "
              f"{rss[large] / 2**20:.0f} MiB, {per_image:.0f} bytes per added image")


if __name__ == "__main__":
    sys.exit(main())
