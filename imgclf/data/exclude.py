"""--exclude FILE: the photos a user left out (one path a line, or a CSV with a path column such
as a filtered report/data_issues.csv), taken out of the scan before anything is computed."""
import csv
import os

from ..errors import UserError
from ..utils.text import plural


def read_path_list(list_path):
    """The paths of an --exclude file: one a line, or a CSV with a path column (such as a
    filtered data_issues.csv); blank lines and # comments are skipped."""
    try:
        with open(list_path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except OSError as err:
        raise UserError(f"--exclude {list_path}: cannot read it ({err.strerror})") from None
    lines = [line for line in text.splitlines() if line.strip() and
             not line.lstrip().startswith("#")]
    if lines and "path" in next(csv.reader([lines[0]])):
        return [row["path"] for row in csv.DictReader(lines) if row.get("path")]
    return [line.strip() for line in lines]


def exclude_photos(scan, list_path):
    """Leave the photos listed in list_path out of every split of scan (in place): paths are
    relative to DATA_DIR or absolute. Paths not in the data set are named in a warning; a list
    with none of them is refused."""
    listed = read_path_list(list_path)
    if not listed:
        raise UserError(f"--exclude {list_path}: lists no paths; give one path a line, or a CSV "
                        f"with a path column such as a filtered report/data_issues.csv")
    known = {os.path.abspath(p) for samples in scan.samples.values() for p, _ in samples}
    known |= {os.path.abspath(p) for p, _ in scan.skipped}
    wanted = {_resolve(p, scan.root, known) for p in listed}
    missing = sorted(wanted - known)
    if len(missing) == len(wanted):
        raise UserError(f"--exclude {list_path}: none of its {len(wanted)} paths is a photo of "
                        f"{scan.root} (e.g. {listed[0]}); give paths relative to DATA_DIR or "
                        f"absolute")
    if missing:
        scan.warnings.append(f"--exclude {list_path}: {len(missing)} of its paths are not in "
                             f"{scan.root} and were ignored, e.g. {missing[0]}")
    scan.leave_out(wanted - set(missing))
    _check_classes_left(scan, list_path)
    scan.notes.append(f"--exclude {list_path}: left out {plural(len(scan.excluded), 'photo')}")
    return scan


def _resolve(path, root, known):
    """An --exclude path as an absolute one: relative to DATA_DIR where that names a photo
    (the report's paths include DATA_DIR as typed, so those are tried as given too)."""
    if os.path.isabs(path):
        return os.path.abspath(path)
    under_root = os.path.abspath(os.path.join(root, path))
    return under_root if under_root in known else os.path.abspath(path)


def _check_classes_left(scan, list_path):
    counts = scan.counts("train")
    empty = [c for i, c in enumerate(scan.classes) if not counts.get(i)]
    if empty:
        raise UserError(f"--exclude {list_path}: leaves no train photo of class "
                        f"{', '.join(empty[:5])}; keep some, or remove the class folder")
