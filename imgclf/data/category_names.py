"""The class-name file (--category_names): a JSON object of folder name -> display name."""
import json
import os

from ..errors import UserError  # noqa: F401 (data_utils.UserError, as before)

# ---------------------------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------------------------
MAX_NAMES_BYTES = 10_000_000


def read_category_names(path):
    """A JSON object mapping class folder names to display names."""
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "no such file"
        raise UserError(f"--category_names {path}: {what}; give a JSON file like "
                        f'{{"1": "pink primrose"}}')
    try:
        # Read at most one byte past the limit: the size check then holds for a file that
        # grows or lies about its size.
        with open(path, "rb") as f:
            data = f.read(MAX_NAMES_BYTES + 1)
    except OSError as err:
        raise UserError(f"--category_names {path}: cannot read it ({err.strerror})") from None
    if len(data) > MAX_NAMES_BYTES:
        raise UserError(f"--category_names {path}: over {MAX_NAMES_BYTES} bytes is too large "
                        f"for a class-name file; give a JSON object of class names")
    try:
        names = json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
        why = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise UserError(f"--category_names {path}: not valid JSON ({why}); give a JSON object "
                        f'like {{"1": "pink primrose"}}') from None
    if not isinstance(names, dict) or not all(isinstance(v, (str, int, float))
                                              for v in names.values()):
        raise UserError(f"--category_names {path}: must be a JSON object mapping class folder "
                        f'names to names, like {{"1": "pink primrose"}}')
    return {str(k): str(v) for k, v in names.items()}


def check_category_names(names, classes, path):
    missing = [c for c in classes if c not in names]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise UserError(f"--category_names {path}: no name for {len(missing)} of the "
                        f"{len(classes)} classes ({shown}); add them to the file")
    return {c: names[c] for c in classes}
