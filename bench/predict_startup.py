"""Wall time of one `python predict.py IMAGE MODEL` run, checkpoint against ONNX, side by side.

    python bench/predict_startup.py IMAGE CHECKPOINT MODEL_ONNX [--runs 5]

Each model gets one warm-up run (file caches), then the runs alternate between the two, so that
load from other programs hits both alike. Prints each median and the ratio.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_run(image, model):
    start = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), image, model],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description="Compare predict.py start-up: checkpoint vs ONNX.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("onnx", metavar="MODEL_ONNX")
    p.add_argument("--runs", type=int, default=5, metavar="N",
                   help="timed runs of each (default: 5)")
    args = p.parse_args(argv)
    models = {"checkpoint": args.checkpoint, "onnx": args.onnx}
    times = {name: [] for name in models}
    for name, model in models.items():
        timed_run(args.image, model)  # warm-up
    for _ in range(args.runs):
        for name, model in models.items():
            times[name].append(timed_run(args.image, model))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:<10}  median {medians[name]:.2f}s  runs " +
              " ".join(f"{x:.2f}" for x in t))
    print(f"onnx / checkpoint: {medians['onnx'] / medians['checkpoint']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
