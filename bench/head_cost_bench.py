"""What the head costs beside the backbone pass, this checkout against an earlier commit.

    python bench/head_cost_bench.py DATA_DIR [--before REF] [--work DIR] [-- TRAIN OPTIONS]

1. A first run of this checkout (train.py DATA_DIR, an empty feature store): the backbone
   pass's seconds, and this checkout's head.
2. The same run of REF's code (default: main), reading the store the first run filled, so no
   backbone; then this checkout again on the same store, so both heads run under the same
   conditions (the first run's head ran beside a warm-up).

Each run is a process of its own with its stages timed inside it: the backbone pass
(features.extract_features), the head's choice and final fit (linear_probe.choose_and_fit), the
out-of-fold fits after it (linear_probe.out_of_fold_logits: the unknown verdict's and the search
for label errors' held-out logits), the calibration and unknown verdict (FeatureTrainer.open_set,
the out-of-fold fits in it included) and the search for data issues (data_issues.find_issues).
"head" below is all the head's fits: choose_and_fit + open_set + find_issues. The table prints
REF's and this checkout's figures side by side, the head's ratio to the backbone pass, and what
each chose (view set, C) and scored (test accuracy).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from iterate_bench import timed  # bench/ is this script's folder, first on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (module, the function timed: the first of the names it has, its class or None). The out-of-
# fold fits: out_of_fold_fits, which every caller reaches now, or out_of_fold_logits in
# commits before it.
STAGES = {"backbone": ("imgclf.engine.features", "extract_features", None),
          "choice": ("imgclf.heads.linear_probe", "choose_and_fit", None),
          "out-of-fold": ("imgclf.heads.linear_probe", "out_of_fold_fits out_of_fold_logits",
                          None),
          "open set": ("imgclf.engine.feature_trainer", "open_set", "FeatureTrainer"),
          "data issues": ("imgclf.analysis.data_issues", "find_issues", None)}
HEAD = ("choice", "open set", "data issues")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", metavar="DATA_DIR", help="a folder with train/ valid/ test/")
    p.add_argument("--before", default="main", metavar="REF",
                   help="the commit whose head to compare with (default: main)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="runs, store and REF's code here, emptied first and kept (default: a "
                        "temporary folder, removed at the end)")
    p.add_argument("--cache_dir", default=None, metavar="DIR",
                   help="a feature store to start from (copied): the first run then sends only "
                        "the photos it lacks through the backbone, and the table gives the "
                        "backbone's seconds a photo times all the photos (default: none, a "
                        "full backbone pass)")
    p.epilog = "options after -- go to every train.py run"
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[2:])
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:len(argv) - len(extra) - bool(extra)])
    work = args.work or tempfile.mkdtemp(prefix="head-cost-bench-")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    before_root = export_commit(args.before, os.path.join(work, "before-code"))
    cache = os.path.join(work, "cache")
    if args.cache_dir:
        shutil.copytree(args.cache_dir, cache)
    first = run_train(ROOT, args.data, os.path.join(work, "first"), cache, extra)
    before = run_train(before_root, args.data, os.path.join(work, "before"), cache, extra)
    after = run_train(ROOT, args.data, os.path.join(work, "after"), cache, extra)
    print_table(args.before, first, before, after)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def export_commit(ref, dest):
    """REF's tracked files in dest (git archive): the code of the 'before' runs."""
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", ROOT, "archive", ref], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def run_train(code, data, save, cache, options):
    """One train.py run of the code in `code`, a process of its own: wall and stage seconds."""
    argv = [data, "--save_dir", save, "--cache_dir", cache, *options]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", code, *argv],
                          capture_output=True, text=True, cwd=code)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"train.py {' '.join(argv)} ({code}) failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.rsplit("STAGES ", 1)[1])
    result["choice_line"] = next((line for line in done.stdout.splitlines()
                                  if line.startswith("head: logistic")), "")
    return dict(wall=wall, **result)


def child(code, argv):
    """train.main(argv) of the code in `code`, with each stage's seconds summed and the photos
    through the backbone counted."""
    import importlib
    sys.path.insert(0, code)
    spent, counted = dict.fromkeys(STAGES, 0.0), {"photos": 0}
    for stage, (module_name, names, owner) in STAGES.items():
        module = importlib.import_module(module_name)
        holder = getattr(module, owner) if owner else module
        name = next(name for name in names.split() if hasattr(holder, name))
        setattr(holder, name, timed(getattr(holder, name), spent, stage, counted))
    from imgclf.checkpoints import load_checkpoint
    from imgclf.cli import train
    status = train.main(argv)
    metrics = load_checkpoint(os.path.join(argv[argv.index("--save_dir") + 1],
                                           "checkpoint.pth"))["metrics"]
    photos = sum(len(scan_split) for scan_split in scanned_photos(argv[0]))
    print("STAGES " + json.dumps(dict(stages=spent, test_acc=metrics.get("test_acc"),
                                      through_backbone=counted["photos"], photos=photos)))
    return status


def scanned_photos(data):
    """Each split's image files under data (what a full backbone pass reads)."""
    return [[name for _, _, names in os.walk(os.path.join(data, split)) for name in names]
            for split in ("train", "valid", "test")]


def print_table(ref, first, before, after):
    through, photos = first["through_backbone"], first["photos"]
    backbone = first["stages"]["backbone"] * photos / max(through, 1)
    if through == photos:
        print(f"\nbackbone pass (first run): {backbone:.1f} s for its {photos} photos\n")
    else:
        print(f"\nbackbone pass: {first['stages']['backbone']:.1f} s for the {through} photos "
              f"the store lacked; for all {photos} photos at that rate: {backbone:.1f} s\n")
    rows = [(f"{ref} (store warm)", before), ("this checkout, first run", first),
            ("this checkout (store warm)", after)]
    print("| code | head s | x backbone | choice | open set | of which out-of-fold fits | "
          "data issues | wall s | test acc | chosen |")
    print("|---" * 10 + "|")
    for name, run in rows:
        s = run["stages"]
        head = sum(s[k] for k in HEAD)
        chosen = run["choice_line"].split(" (held-out")[0].replace("head: logistic regression "
                                                                     "on ", "")
        print(f"| {name} | {head:.1f} | {head / backbone:.2f}x | {s['choice']:.1f} | "
              f"{s['open set']:.1f} | {s['out-of-fold']:.1f} | {s['data issues']:.1f} | "
              f"{run['wall']:.1f} | {100 * (run['test_acc'] or 0):.2f}% | {chosen} |")


if __name__ == "__main__":
    sys.exit(main())
