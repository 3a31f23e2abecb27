"""The rules, checked in the product code (every .py file outside tests/): no unsafe loading.

No weights_only=False and no torch.load without weights_only=True; no pickle, marshal, shelve or
dill; no eval/exec/compile; no numpy allow_pickle=True; no yaml.load. Parsed with ast, so a
comment or a string that mentions them does not count and a call split over lines is found.
"""
import ast
import os

from .harness import ROOT

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle",
                  "joblib"}
UNSAFE_BUILTINS = {"eval", "exec", "compile"}


def product_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in ("tests", ".venv", ".git", "__pycache__")
                       and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def _keyword(call, name):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _dotted(node):
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def violations(source):
    """[(line, what)] of the unsafe patterns in one file's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in \
                UNSAFE_MODULES:
            found.append((node.lineno, f"from {node.module} import"))
        elif isinstance(node, ast.keyword) and node.arg in ("weights_only", "allow_pickle") \
                and not (isinstance(node.value, ast.Constant) and
                         node.value.value is (node.arg == "weights_only")):
            found.append((node.value.lineno, f"{node.arg}={ast.unparse(node.value)}"))
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in UNSAFE_BUILTINS or name.startswith("builtins."):
                found.append((node.lineno, f"{name}()"))
            elif name.endswith("torch.load") or name == "load" and "torch" in source:
                weights_only = _keyword(node, "weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append((node.lineno, f"{name}() without weights_only=True"))
            elif name in ("yaml.load", "yaml.unsafe_load", "torch.jit.load"):
                found.append((node.lineno, f"{name}()"))
    return found


def test_the_rule_finder_finds_what_it_should():
    bad = ("import pickle\nfrom marshal import loads\nimport torch\n"
           "torch.load(p)\ntorch.load(p,\n    weights_only=False)\neval('1')\nexec(s)\n"
           "np.load(p, allow_pickle=True)\nyaml.load(s)\n")
    assert sorted(line for line, _ in violations(bad)) == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    good = ("import torch\ntorch.load(p, map_location='cpu', weights_only=True)\n"
            "model.eval()\n# eval(x) or pickle.load in a comment\ns = 'weights_only=False'\n")
    assert violations(good) == []


def test_no_unsafe_loading_in_product_code(tally):
    t = tally("code rules", "no weights_only=False, no pickle/marshal, no eval/exec, no "
                            "allow_pickle in any product .py file")
    files = sorted(product_files())
    assert any(f.endswith(os.path.join("imgclf", "checkpoints.py")) for f in files)
    for path in files:
        with open(path, encoding="utf-8") as f:
            found = violations(f.read())
        t.check(not found, f"{os.path.relpath(path, ROOT)}: " +
                ", ".join(f"line {line}: {what}" for line, what in found))
    t.finish(minimum=4)
