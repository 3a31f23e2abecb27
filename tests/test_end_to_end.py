"""The whole path as a user runs it: train.py then predict.py, as processes."""
import os
import re
import subprocess
import sys

from conftest import FAST, FLOWERS5, ROOT, make_image_folder, needs_flowers5


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1200)


def test_cli_train_then_predict(tmp_path):
    data = make_image_folder(tmp_path / "data")
    trained = run("train.py", data, "--save_dir", str(tmp_path / "run"), *FAST)
    assert trained.returncode == 0, trained.stderr
    assert re.search(r"^head: logistic regression on [a-z0-9 +]+ views?, C=[0-9.e-]+ \(held-out "
                     r"loss \d\.\d{3}, accuracy \d+\.\d% over 5 folds of train\+valid",
                     trained.stdout, re.M)
    assert re.search(r"^test acc \d+\.\d%$", trained.stdout, re.M)
    predicted = run("predict.py", os.path.join(data, "test", "fox", "001.jpg"),
                    str(tmp_path / "run" / "checkpoint.pth"), "--top_k", "3")
    assert predicted.returncode == 0, predicted.stderr
    *lines, verdict = predicted.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["1.", "2.", "3."]
    assert sorted(line.split()[1] for line in lines) == ["cat", "dog", "fox"]
    assert re.fullmatch(r"verdict: (one of the known classes|unknown - .*) \(novelty -?\d+\.\d+ "
                        r"(<=|>) threshold -?\d+\.\d+\).*", verdict)


def test_cli_user_mistakes_get_one_line_and_status_2(tmp_path):
    cases = [
        ("train.py", str(tmp_path / "missing")),
        ("train.py", str(tmp_path), "--arch", "nosuchnet"),
        ("train.py", str(tmp_path), "--gpu"),
        ("predict.py", str(tmp_path / "none.jpg"), str(tmp_path / "none.pth")),
    ]
    for args in cases:
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, args


@needs_flowers5
def test_flowers5_with_default_options_reaches_70_percent(tmp_path):
    """The issue's acceptance run: default options on real flower photos."""
    trained = run("train.py", FLOWERS5, "--save_dir", str(tmp_path))
    assert trained.returncode == 0, trained.stderr
    accuracy = float(re.search(r"^test acc (\d+\.\d)%$", trained.stdout, re.M).group(1))
    assert accuracy >= 70.0
    photo = os.path.join(FLOWERS5, "test", "sunflower",
                         sorted(os.listdir(os.path.join(FLOWERS5, "test", "sunflower")))[0])
    predicted = run("predict.py", photo, str(tmp_path / "checkpoint.pth"), "--top_k", "3")
    lines = predicted.stdout.splitlines()
    assert predicted.returncode == 0 and len(lines) == 4 and lines[-1].startswith("verdict: ")
