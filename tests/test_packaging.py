"""The installed package: every module of imgclf/ in the wheel and nothing else at its top, each
importable from any folder, the commands, --version, and the version floors. These tests build
the wheel from a copy of the project's files and check what lands in it."""
import glob
import importlib
import os
import re
import subprocess
import sys
import tomllib
import zipfile

import pytest

from conftest import ROOT

SCRIPTS = ("train", "predict", "export", "serve")


def package_modules():
    """imgclf's modules as paths inside the wheel: imgclf/data/decode.py, ..."""
    paths = glob.glob(os.path.join(ROOT, "imgclf", "**", "*.py"), recursive=True)
    return sorted(os.path.relpath(p, ROOT).replace(os.sep, "/") for p in paths)


def package_data():
    """The files of the package that are not modules: the web export's page."""
    paths = glob.glob(os.path.join(ROOT, "imgclf", "export", "web", "*"))
    return sorted(os.path.relpath(p, ROOT).replace(os.sep, "/") for p in paths)


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel setuptools builds from a copy of the project's top-level files."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in os.listdir(ROOT):
        if name.endswith((".py", ".toml", ".md", ".json")):
            with open(os.path.join(ROOT, name), "rb") as f:
                (src / name).write_bytes(f.read())
    for path in package_modules() + package_data():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(ROOT, path), "rb") as f:
            (src / path).write_bytes(f.read())
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index",
                    "--no-build-isolation", "-w", str(out), str(src)], check=True)
    [path] = out.glob("imgclf-*.whl")
    return path


def test_the_wheel_holds_every_module_of_the_package_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.endswith(".py")) == package_modules()
    assert {n.split("/")[0] for n in names} == {"imgclf", wheel.name.split("-py3")[0] + ".dist-info"}


def test_the_wheel_holds_the_web_page_the_web_export_copies(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert package_data() and set(package_data()) <= set(names)


def test_every_module_imports_from_the_installed_wheel_in_any_folder(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    modules = [p[:-3].replace("/", ".").removesuffix(".__init__") for p in package_modules()]
    code = "import importlib; [importlib.import_module(m) for m in %r]; print('ok')" % modules
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert (done.returncode, done.stdout) == (0, "ok\n"), done.stderr[-2000:]


def test_the_installed_commands_run_the_scripts(wheel, tmp_path):
    scripts = pyproject()["project"]["scripts"]
    assert sorted(scripts) == sorted(f"imgclf-{s}" for s in SCRIPTS)
    assert all(target == f"imgclf.cli:{command[len('imgclf-'):]}_command"
               for command, target in scripts.items())
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # From an empty folder with only the unpacked wheel on the path.
    code = ("import sys; from imgclf import cli; sys.argv = ['imgclf-predict', '--version']; "
            "cli.predict_command()")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert (done.returncode, done.stdout, done.stderr) == (0, f"imgclf-predict {version()}\n", "")


def version():
    with open(os.path.join(ROOT, "imgclf", "version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_prints_its_version(script, capsys):
    module = importlib.import_module(f"imgclf.cli.{script}")
    with pytest.raises(SystemExit) as stop:
        module.main(["--version"])
    assert stop.value.code == 0
    assert re.fullmatch(r"\S+ (\S+)\n", capsys.readouterr().out).group(1) == version()


def requirement_lines(name):
    with open(os.path.join(ROOT, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def test_requirements_txt_is_the_package_at_the_locked_versions():
    """`pip install -r requirements.txt` installs the package, whose dependencies are
    pyproject.toml's, constrained by requirements-lock.txt: no third list to keep in step.
    CI installs through it, and the README's quick start says it."""
    assert requirement_lines("requirements.txt") == ["-c requirements-lock.txt", "-e ."]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    assert "pip install -q --disable-pip-version-check -r requirements.txt " in ci
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "pip install -r requirements.txt" in f.read()


def test_version_floors_are_the_versions_ci_installs():
    project = pyproject()["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra]
    lock = {}
    for name in ("requirements-lock.txt", "requirements-mobile.txt"):  # the mobile extra's pins
        with open(os.path.join(ROOT, name)) as f:
            lock.update(line.strip().split("==") for line in f
                        if "==" in line and not line.startswith("#"))
    lock = {normalize(k): v for k, v in lock.items()}
    for requirement in requirements:
        name, floor = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][^,;\s]*)", requirement).groups()
        assert lock.get(normalize(name)) == floor, f"{name}: floor {floor}, lock {lock.get(name)}"
