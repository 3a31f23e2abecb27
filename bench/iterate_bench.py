"""Iterating on a data set: a first run, then reruns after each of three edits, against fresh runs.

    python bench/iterate_bench.py SET [SET ...] [--per_class N] [--work DIR] [-- TRAIN OPTIONS]

The SETs (folders with train/ valid/ test/ class folders; several are joined into one set, their
classes prefixed with the set's name) are copied into WORK/data less one class, then:

1. first run: train.py WORK/data --save_dir WORK/run --cache_dir WORK/cache;
2. add a class: the class held back is put in, and the same command runs again;
3. move 20 photos: 20 train photos of the first class go to the second class's folder;
4. exclude: the rows of WORK/run/report/data_issues.csv whose issue is "label" are left out
   with --exclude.

Each rerun is compared with a fresh run on the same data (its own save_dir, an empty cache):
the same test accuracy and the same head weights, or the table says how far apart. Each run is
a process of its own; the table gives its wall seconds, its ratio to the first run's, the
seconds of its stages (measured inside it: the scan, the backbone pass, the head's fit, the
search for data issues) and how many photos went through the backbone.
"""
import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's imgclf, here and in the runs
MOVED = 20
SPLITS = ("train", "valid", "test")
STAGES = {"scan": ("imgclf.data.scanning", "scan_dataset"),
          "backbone": ("imgclf.engine.features", "extract_features"),
          "head": ("imgclf.heads.linear_probe", "choose_and_fit"),
          "data issues": ("imgclf.analysis.data_issues", "find_issues")}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sets", nargs="*", metavar="SET",
                   help="folders with train/ valid/ test/ class folders")
    p.add_argument("--per_class", type=int, default=None, metavar="N",
                   help="at most N train photos of each class, N/3 valid and test "
                        "(default: all)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="the folder of the copies, runs and caches, emptied first and kept "
                        "(default: a temporary folder, removed at the end)")
    p.epilog = "options after -- go to every train.py run, e.g. -- --image_size 160"
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:  # one run, in its own process
        return child(argv[1:])
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:len(argv) - len(extra) - bool(extra)])
    if not args.sets:
        build_parser().error("give at least one SET")
    work = args.work or tempfile.mkdtemp(prefix="iterate-bench-")
    shutil.rmtree(work, ignore_errors=True)
    held = build_data(args.sets, os.path.join(work, "data"), args.per_class)
    rows = []
    for step, edit in (("first run", None), ("add a class", add_class),
                       (f"move {MOVED} photos", move_photos), ("exclude label rows", None)):
        options = list(extra)
        if edit:
            step = edit(work, held) or step
        if step.startswith("exclude"):
            listed = write_exclude_list(work)
            if not listed:
                print("| exclude label rows | - (data_issues.csv has no label rows) |")
                continue
            options += ["--exclude", listed]
        rerun = run_train(work, "run", "cache", options)
        rerun["step"] = step
        if step != "first run":
            fresh = run_train(work, f"fresh{len(rows)}", f"fresh-cache{len(rows)}", options)
            rerun["same"] = same_result(os.path.join(work, "run"),
                                        os.path.join(work, f"fresh{len(rows)}"))
            rerun["fresh wall"] = fresh["wall"]
        rows.append(rerun)
        print_row(rerun, rows[0]["wall"], flush=True)
    print_table(rows)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def build_data(sets, dest, per_class):
    """Copy the sets into dest (prefixed class names when several), the last class held back
    in dest + "-held"; returns that folder."""
    held = dest + "-held"
    for source in sets:
        prefix = os.path.basename(os.path.normpath(source)) + "-" if len(sets) > 1 else ""
        for split in SPLITS:
            for cls in sorted(os.listdir(os.path.join(source, split))):
                files = sorted(os.listdir(os.path.join(source, split, cls)))
                limit = per_class if split == "train" else per_class and max(1, per_class // 3)
                target = os.path.join(dest, split, prefix + cls)
                os.makedirs(target)
                for name in files[:limit]:
                    shutil.copy2(os.path.join(source, split, cls, name), target)
    last = sorted(os.listdir(os.path.join(dest, "train")))[-1]
    for split in SPLITS:
        shutil.move(os.path.join(dest, split, last), os.path.join(held, split, last))
    return held


def add_class(work, held):
    for split in SPLITS:
        for cls in os.listdir(os.path.join(held, split)):
            shutil.move(os.path.join(held, split, cls), os.path.join(work, "data", split, cls))


def move_photos(work, held):
    """MOVED train photos of the first class (at most half of them) into the second's folder."""
    train = os.path.join(work, "data", "train")
    first, second = sorted(os.listdir(train))[:2]
    names = sorted(os.listdir(os.path.join(train, first)))
    moved = names[:min(MOVED, len(names) // 2)]
    for name in moved:
        shutil.move(os.path.join(train, first, name),
                    os.path.join(train, second, f"moved-{name}"))
    return f"move {len(moved)} photos"


def write_exclude_list(work):
    """The label rows of the last run's data_issues.csv, as an --exclude file (None: none)."""
    with open(os.path.join(work, "run", "report", "data_issues.csv"), newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f) if row["issue"] == "label"]
    if not paths:
        return None
    path = os.path.join(work, "exclude.txt")
    with open(path, "w") as f:
        f.write("\n".join(paths) + "\n")
    return path


def run_train(work, save, cache, options):
    """One train.py run as a process of its own: its wall seconds and stages."""
    argv = [os.path.join(work, "data"), "--save_dir", os.path.join(work, save),
            "--cache_dir", os.path.join(work, cache), *options]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *argv],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"train.py {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    stages = json.loads(done.stdout.rsplit("STAGES ", 1)[1])
    return dict(wall=wall, **stages)


def child(argv):
    """train.main(argv) with its stages timed (the seconds in each function of STAGES) and the
    photos that went through the backbone counted."""
    import importlib
    spent, counted = dict.fromkeys(STAGES, 0.0), {"photos": 0}
    for stage, (module_name, name) in STAGES.items():
        module = importlib.import_module(module_name)
        setattr(module, name, timed(getattr(module, name), spent, stage, counted))
    from imgclf.cli import train
    start = time.perf_counter()
    status = train.main(argv)
    seconds = time.perf_counter() - start
    print("STAGES " + json.dumps(dict(stages=spent, inside=seconds, photos=counted["photos"],
                                      test_acc=test_accuracy(argv[argv.index("--save_dir") + 1]))))
    return status


def timed(fn, spent, stage, counted):
    def wrapper(*args, **kwargs):
        if stage == "backbone":  # extract_features(backbone, samples, ...)
            counted["photos"] += len(args[1])
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[stage] += time.perf_counter() - start
    return wrapper


def test_accuracy(save_dir):
    from imgclf.checkpoints import load_checkpoint
    return load_checkpoint(os.path.join(save_dir, "checkpoint.pth"))["metrics"].get("test_acc")


def same_result(run, fresh):
    """"same" when the two checkpoints' test accuracy and head weights are equal; else how
    far apart."""
    import torch
    from imgclf.checkpoints import load_checkpoint
    a, b = (load_checkpoint(os.path.join(d, "checkpoint.pth")) for d in (run, fresh))
    if a["metrics"].get("test_acc") != b["metrics"].get("test_acc"):
        return f"test acc {a['metrics']['test_acc']:.4f} vs {b['metrics']['test_acc']:.4f}"
    differ = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    if differ:
        gap = max((a["state_dict"][k] - b["state_dict"][k]).abs().max().item() for k in differ)
        return f"head differs (max |dw| {gap:.2g})"
    return "same"


def print_row(row, first, flush=False):
    s = row["stages"]
    other = row["wall"] - sum(s.values())
    fresh = f"{row['fresh wall']:.1f}" if "fresh wall" in row else "-"
    print(f"| {row['step']} | {row['wall']:.1f} | {row['wall'] / first:.2f}x | "
          f"{s['scan']:.1f} | {s['backbone']:.1f} | {s['head']:.1f} | {s['data issues']:.1f} | "
          f"{other:.1f} | {row['photos']} | {100 * (row['test_acc'] or 0):.1f}% | "
          f"{row.get('same', '-')} | {fresh} |", flush=flush)


def print_table(rows):
    print("\n| run | wall s | x first | scan | backbone | head | data issues | other (imports, "
          "reports) | photos through the backbone | test acc | = fresh run | fresh run wall s |")
    print("|---" * 12 + "|")
    for row in rows:
        print_row(row, rows[0]["wall"])


if __name__ == "__main__":
    sys.exit(main())
