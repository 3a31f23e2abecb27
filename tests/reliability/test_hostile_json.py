"""Case 7: a hostile or broken --category_names file gives one clear line, in both scripts."""
import json
import os
import random

from conftest import FAST

from . import harness


def json_files(folder):
    """name -> path of --category_names files that must be refused."""
    rng = random.Random(7)
    files = {}

    def write(name, content):
        path = os.path.join(folder, name.replace(" ", "-") + ".json")
        with open(path, "wb") as f:
            f.write(content if isinstance(content, bytes) else content.encode())
        files[name] = path

    write("plain text", "cat: a cat\ndog: a dog\n")
    write("random bytes", rng.randbytes(2000))
    write("invalid UTF-8", b'{"cat": "\xff\xfe"}')
    write("empty file", "")
    write("cut-off JSON", '{"cat": "Cat", "dog": ')
    write("JSON list", json.dumps(["cat", "dog", "fox"]))
    write("JSON string", json.dumps("cat"))
    write("JSON number", "42")
    write("JSON null", "null")
    write("nested values", json.dumps({"cat": {"name": "Cat"}, "dog": "Dog", "fox": "Fox"}))
    write("null values", json.dumps({"cat": None, "dog": "Dog", "fox": "Fox"}))
    write("list values", json.dumps({"cat": ["Cat"], "dog": "Dog", "fox": "Fox"}))
    write("deeply nested", "[" * 200_000 + "]" * 200_000)
    write("a 5000-digit number", '{"cat": ' + "9" * 5000 + ', "dog": "Dog", "fox": "Fox"}')
    big = {f"class{i}": "x" * 100 for i in range(110_000)}  # about 12 MB: over the limit
    write("huge (12 MB)", json.dumps(big))
    write("missing classes", json.dumps({"cat": "Cat"}))
    write("empty object", "{}")
    write("names for other classes", json.dumps({"1": "pink primrose", "2": "hard-leaved"}))
    files["a folder"] = folder
    files["no such file"] = os.path.join(folder, "absent.json")
    files["a device (/dev/zero)"] = "/dev/zero"
    return files


def test_hostile_category_names_give_one_line(tmp_path, trained, small_data, tally):
    t = tally("hostile JSON", "one line naming the file and the fix; nothing written or used")
    folder = tmp_path / "json"
    folder.mkdir()
    files = json_files(str(folder))
    image = os.path.join(trained["data"], "test", "cat", "000.jpg")
    for i, (name, path) in enumerate(files.items()):
        runs = {"predict.py": [image, trained["checkpoint"], "--category_names", path],
                "train.py": [small_data, "--category_names", path,
                             "--save_dir", tmp_path / f"save{i}", *FAST]}
        for script, args in runs.items():
            r = harness.run(script, args, tmp_path / "logs", name=f"{script}-{i}")
            line = harness.one_error_line(r.stderr)
            ok = r.returncode == 2 and line is not None and "--category_names" in line
            if script == "predict.py":
                ok = ok and len(r.stderr.strip().splitlines()) == 1
            else:
                ok = ok and not os.path.exists(tmp_path / f"save{i}" / "checkpoint.pth")
            t.check(ok, f"{script} {name}: status {r.returncode}, stderr {r.stderr[-300:]!r}")
    t.finish(minimum=40)


def test_byte_order_mark_is_accepted(tmp_path, trained):
    """A UTF-8 file with a byte order mark (as some Windows editors write) is valid JSON."""
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"cat": "Cat", "dog": "Dog",
                                                  "fox": "Fox"}).encode())
    image = os.path.join(trained["data"], "test", "cat", "000.jpg")
    r = harness.run("predict.py", [image, trained["checkpoint"], "--category_names", path],
                    tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Cat" in r.stdout
