"""What changed since the last run into the same --save_dir.

The checkpoint stores its photos (photo_list: each photo's path relative to DATA_DIR, split,
class and the first 8 bytes of its content digest). A rerun reads the checkpoint it is about
to replace and says in its first lines what differs: classes added or removed; photos added,
removed, left out by --exclude, moved to another class or split, renamed. Photos are matched by
content, so a renamed or moved file is the same photo. At its end it gives the test accuracy
before and after and the classes whose test F1 moved most.
"""
import os

import torch

from .. import checkpoints
from ..errors import UserError
from . import report

SPLITS = ("train", "valid", "test")
DIGEST_BYTES = 8  # of the scan's 16: one wrong match in 2**64 photo pairs
EXAMPLES = 3      # paths named per kind of change
MOVERS = 5        # classes named whose F1 moved most


def record(checkpoint, scan, result):
    """Add to the checkpoint what the next run compares with: its photos, and the test F1 of
    each class."""
    checkpoint["data"]["photos"] = photo_list(scan)
    if result.test_probs is not None and "test" in scan.samples:
        labels = [label for _, label in scan.samples["test"]]
        f1 = report.compute_metrics(result.test_probs, labels, len(scan.classes))["f1"]
        checkpoint["metrics"]["test_f1"] = {c: float(f) for c, f in zip(scan.classes, f1)}


def photo_list(scan):
    """The checkpoint's record of the run's photos: plain strings and tensors (weights_only),
    4.2 MiB for 100,000 photos (measured)."""
    rows = [(s, path, label) for s in SPLITS for path, label in scan.samples.get(s, ())]
    root = os.path.abspath(scan.root)
    digests = b"".join(bytes.fromhex(scan.digests[path])[:DIGEST_BYTES] for _, path, _ in rows)
    return {"paths": "\n".join(os.path.relpath(os.path.abspath(p), root) for _, p, _ in rows),
            "splits": torch.tensor([SPLITS.index(s) for s, _, _ in rows], dtype=torch.uint8),
            "labels": torch.tensor([label for _, _, label in rows], dtype=torch.int32),
            "digests": torch.tensor(list(digests), dtype=torch.uint8).reshape(-1, DIGEST_BYTES)}


def previous_run(save_dir):
    """The checkpoint a run into save_dir replaces, or None (none there, or not readable: a
    fresh start, said in the next line)."""
    path = os.path.join(save_dir, "checkpoint.pth")
    if not os.path.isfile(path):
        return None
    try:
        return checkpoints.load_checkpoint(path)
    except UserError as err:
        print(f"changes since the last run: not compared ({err})")
        return None


def photos_of_checkpoint(ckpt):
    """{digest hex: (relative path, split, class)} of a checkpoint's photo list, or None for
    checkpoints from before it was stored."""
    photos = ckpt.get("data", {}).get("photos")
    if not photos:
        return None
    paths = photos["paths"].split("\n") if photos["paths"] else []
    classes = ckpt["classes"]
    return {bytes(d).hex(): (p, SPLITS[s], classes[y]) for p, s, y, d in
            zip(paths, photos["splits"].tolist(), photos["labels"].tolist(),
                photos["digests"].numpy())}


def photos_of_scan(scan):
    root = os.path.abspath(scan.root)
    return {scan.digests[p][:2 * DIGEST_BYTES]: (os.path.relpath(os.path.abspath(p), root), s,
                                                 scan.classes[y])
            for s in SPLITS for p, y in scan.samples.get(s, ())}


def excluded_digests(scan):
    root = os.path.abspath(scan.root)
    excluded = set(scan.excluded)
    return {d[:2 * DIGEST_BYTES] for p, d in scan.digests.items()
            if os.path.relpath(os.path.abspath(p), root) in excluded}


def compare(before, after, excluded=()):
    """{kind: [description]} of the photos that differ between two {digest: (path, split,
    class)}; kinds: added, removed, excluded, moved between classes, moved between splits,
    renamed; and "unchanged": a count."""
    changes = {kind: [] for kind in ("added", "removed", "excluded", "moved between classes",
                                     "moved between splits", "renamed")}
    unchanged = 0
    for digest, (path, split, cls) in after.items():
        old = before.get(digest)
        if old is None:
            changes["added"].append(path)
        elif old[2] != cls:
            changes["moved between classes"].append(f"{path} ({old[2]} -> {cls})")
        elif old[1] != split:
            changes["moved between splits"].append(f"{path} ({old[1]} -> {split})")
        elif old[0] != path:
            changes["renamed"].append(f"{old[0]} -> {path}")
        else:
            unchanged += 1
    for digest, (path, _, _) in before.items():
        if digest not in after:
            changes["excluded" if digest in excluded else "removed"].append(path)
    return changes, unchanged


FINETUNE_LINE = ("  reuse: --finetune trains the backbone, so its epochs cannot reuse stored "
                 "features; only the frozen backbone's (the bar it must beat) come from the store")


def change_lines(ckpt, scan, save_dir, finetune=False):
    """The rerun's first lines: what differs from the checkpoint in save_dir."""
    where = os.path.join(save_dir, "checkpoint.pth")
    lines = [f"changes since the last run ({where}):"]
    lines += [FINETUNE_LINE] * bool(finetune)
    added = [c for c in scan.classes if c not in ckpt["classes"]]
    removed = [c for c in ckpt["classes"] if c not in scan.classes]
    if added:
        lines.append(f"  classes added: {len(added)} ({_listed(added)})")
    if removed:
        lines.append(f"  classes removed: {len(removed)} ({_listed(removed)})")
    before = photos_of_checkpoint(ckpt)
    if before is None:
        lines.append("  photos: not compared (the checkpoint predates its photo list)")
        return lines
    changes, unchanged = compare(before, photos_of_scan(scan), excluded_digests(scan))
    for kind, items in changes.items():
        if items:
            lines.append(f"  photos {kind}: {len(items)} ({_listed(items)})")
    if len(lines) == 1 + bool(finetune):
        lines[0] += " none, the same classes and photos"
    else:
        lines.append(f"  photos unchanged: {unchanged} (renamed and moved photos too reuse "
                     f"their stored features)")
    return lines


def score_lines(ckpt, metrics, f1, classes):
    """The rerun's last lines: test accuracy before and after, the classes whose F1 moved
    most (f1: {class: test F1} of this run)."""
    before = ckpt.get("metrics", {})
    if "test_acc" not in before or "test_acc" not in metrics:
        return []
    old, new = 100 * before["test_acc"], 100 * metrics["test_acc"]
    lines = [f"since the last run: test acc {old:.1f}% -> {new:.1f}% ({new - old:+.1f} "
             f"points; each on its own test split)"]
    old_f1 = before.get("test_f1") or {}
    moved = sorted((c for c in classes if c in old_f1 and c in f1),
                   key=lambda c: -abs(f1[c] - old_f1[c]))[:MOVERS]
    moved = [c for c in moved if round(f1[c] - old_f1[c], 2)]
    if moved:
        lines.append("  F1 moved most: " + ", ".join(
            f"{c} {old_f1[c]:.2f} -> {f1[c]:.2f}" for c in moved))
    elif old_f1:
        lines.append("  no class's test F1 moved by 0.01 or more")
    return lines


def _listed(items):
    shown = ", ".join(items[:EXAMPLES])
    return shown + (f", ... {len(items) - EXAMPLES} more" if len(items) > EXAMPLES else "")
