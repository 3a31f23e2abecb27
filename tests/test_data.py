"""The checked scan of an image folder, image reading, the data report and train.py's handling
of messy folders (issue 4). tests/messy.py writes the messy folder."""
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import messy
from conftest import FAST, make_image_folder
from imgclf.app import inference
from imgclf.cli import predict, train
from imgclf.data import data_report, decode, scanning
from imgclf.data.decode import load_rgb
from imgclf.data.scanning import check_file, scan_dataset
from imgclf.errors import UserError

# The quickest training run that still goes through every step.
TINY = [*FAST, "--aug_views", "0"]


def encode(img, fmt, **options):
    return messy.encode(img, fmt, **options)


def pixel(img, xy=(0, 0)):
    return tuple(int(v) for v in np.asarray(img)[xy[1], xy[0]])


def close(a, b, tol=8):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.fixture
def messy_tree(tmp_path):
    return messy.make_messy_tree(tmp_path / "messy")


@pytest.fixture
def checked(monkeypatch):
    """The paths check_file decodes (the scan runs in this process for small folders)."""
    seen = []
    real = scanning.check_file

    def spy(path):
        seen.append(path)
        return real(path)
    monkeypatch.setattr(scanning, "check_file", spy)
    return seen


def lock(monkeypatch, *names):
    """Make files unreadable the way chmod 000 does for a normal user (tests run as root,
    who reads any file whatever its permissions)."""
    real_open = open

    def fake_open(path, *args, **kwargs):
        if os.path.basename(str(path)) in names:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(scanning, "open", fake_open, raising=False)


# ---------------------------------------------------------------------------------------------
# Any image becomes RGB the same way
# ---------------------------------------------------------------------------------------------
def test_every_image_kind_reads_as_rgb():
    for name, data in messy.image_kinds(0, 1).items():
        img = load_rgb(data)
        assert img.mode == "RGB", name
        expected = {"rotated.jpg": (48, 64), "big.jpg": (160, 120)}.get(name, (48, 48))
        assert img.size == expected, name


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"),
                                     ("BMP", "bmp"), ("TIFF", "tiff"), ("GIF", "gif")])
def test_common_formats_keep_their_colour(tmp_path, fmt, ext):
    path = tmp_path / f"photo.{ext}"
    Image.new("RGB", (16, 16), (200, 40, 30)).save(path, fmt)
    assert close(pixel(load_rgb(str(path))), (200, 40, 30))


@pytest.mark.parametrize("img", [
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)),
    Image.new("LA", (4, 4), (0, 0)),
], ids=["RGBA", "LA"])
def test_transparent_pixels_become_white(img):
    assert pixel(load_rgb(encode(img, "PNG"))) == (255, 255, 255)


def test_half_transparent_black_is_mixed_with_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert close(pixel(load_rgb(encode(img, "PNG"))), (127, 127, 127), tol=1)


@pytest.mark.parametrize("mode,fill,fmt", [
    ("P", 0, "PNG"), ("P", 0, "GIF"), ("L", 0, "PNG"), ("RGB", (0, 0, 0), "PNG")])
def test_a_transparent_colour_becomes_white(mode, fill, fmt):
    img = Image.new(mode, (4, 4), fill)
    if mode == "P":
        img.putpalette([10, 20, 30] * 256)
    assert pixel(load_rgb(encode(img, fmt, transparency=fill))) == (255, 255, 255)


def test_palette_image_keeps_its_colours():
    img = Image.new("RGB", (8, 8), (30, 120, 220)).quantize(4)
    assert close(pixel(load_rgb(encode(img, "PNG"))), (30, 120, 220))


def test_grayscale_becomes_grey_rgb():
    assert pixel(load_rgb(encode(Image.new("L", (4, 4), 90), "PNG"))) == (90, 90, 90)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(fmt):
    values = np.array([[0, 200, 32768, 65535]], dtype=np.uint16)
    img = load_rgb(encode(Image.fromarray(values), fmt))
    assert np.asarray(img)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_dark_16_bit_grey_stays_dark():
    values = np.array([[200, 255]], dtype=np.uint16)  # no value above 8-bit range
    img = load_rgb(encode(Image.fromarray(values), "PNG"))
    assert np.asarray(img)[0, :, 0].tolist() == [1, 1]


def test_cmyk_jpeg_keeps_its_colour():
    data = encode(Image.new("RGB", (16, 16), (200, 50, 30)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert close(pixel(load_rgb(data)), (200, 50, 30))


# EXIF orientation -> where the left (red) half of the stored picture ends up when shown.
@pytest.mark.parametrize("orientation,red_at", [(1, (2, 24)), (3, (61, 24)), (6, (24, 2)),
                                                (8, (24, 61))])
def test_exif_orientation_is_applied(orientation, red_at):
    stored = Image.new("RGB", (64, 48), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 48))
    img = load_rgb(messy.with_orientation(stored, orientation))
    assert img.size == ((64, 48) if orientation in (1, 3) else (48, 64))
    assert close(pixel(img, red_at), (255, 0, 0), tol=40)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_gives_its_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    data = messy._animation(frames, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert close(pixel(load_rgb(data)), (255, 0, 0))


def test_prediction_reads_images_with_the_same_function(tmp_path):
    path = tmp_path / "clear.png"
    img = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 20, 30))
    img.save(path)
    pre = {"size": 32, "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.25] * 3}
    expected = decode.eval_array(load_rgb(str(path)), pre)
    assert np.array_equal(inference.load_image(str(path), pre), expected)


def test_decompression_bomb_is_refused_from_its_header():
    data = messy.png_header_only(100_000, 100_000)
    with pytest.raises(decode.TooManyPixels):
        decode.open_image(data)
    assert "decompression bomb" in decode.describe_image_error(
        pytest.raises(ValueError, load_rgb, data).value)


def test_image_over_the_pixel_limit_is_refused_before_decoding(monkeypatch):
    data = encode(Image.new("RGB", (48, 48)), "PNG")
    monkeypatch.setattr(decode, "MAX_PIXELS", 1000)

    def never(self):
        raise AssertionError("decoded an image over the pixel limit")
    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(decode.TooManyPixels, match="48x48 pixels"):
        load_rgb(data)


# ---------------------------------------------------------------------------------------------
# Checking one file
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(messy.broken_kinds(0, 1)))
def test_each_broken_kind_is_reported_with_its_reason(tmp_path, name):
    data, words = messy.broken_kinds(0, 1)[name]
    path = tmp_path / name
    path.write_bytes(data)
    check = check_file(str(path))
    assert not check.ok and not check.litter
    assert words in check.reason


def test_unreadable_file_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "locked.jpg"
    messy.draw_sample(0, 1).save(path)
    lock(monkeypatch, "locked.jpg")
    check = check_file(str(path))
    assert not check.ok and check.reason == "unreadable (permission denied)"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads any file whatever its permissions; "
                           "test_unreadable_file_is_reported simulates it")
def test_file_without_read_permission_is_reported(tmp_path):
    path = tmp_path / "locked.jpg"
    messy.draw_sample(0, 1).save(path)
    path.chmod(0)
    assert check_file(str(path)).reason == "unreadable (permission denied)"


def test_broken_link_and_pipe_are_reported(tmp_path):
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")  # reading it would wait forever
    assert check_file(str(tmp_path / "link.jpg")).reason.startswith("unreadable")
    assert check_file(str(tmp_path / "pipe.jpg")).reason.startswith("not a regular file")


def test_text_file_is_litter_but_a_broken_jpg_is_not(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "notes.jpg").write_text("hello")
    assert check_file(str(tmp_path / "notes.txt")).litter
    assert not check_file(str(tmp_path / "notes.jpg")).litter


# ---------------------------------------------------------------------------------------------
# The scan of the messy folder
# ---------------------------------------------------------------------------------------------
def test_scan_of_messy_folder_finds_every_usable_image(messy_tree):
    scan = scan_dataset(messy_tree["root"], workers=1)
    assert scan.layout == "splits" and scan.classes == list(messy.CLASSES)
    for (split, cls), n in messy_tree["usable"].items():
        assert scan.counts(split)[scan.classes.index(cls)] == n, (split, cls)
    names = {os.path.basename(p) for p, _ in scan.samples["train"]}
    assert set(messy_tree["kinds"]) <= names
    assert scan.warnings == []


def test_scan_skips_each_broken_file_with_its_reason(messy_tree):
    scan = scan_dataset(messy_tree["root"], workers=1)
    reasons = dict(scan.skipped)
    assert set(reasons) == set(messy_tree["broken"])
    for path, words in messy_tree["broken"].items():
        assert words in reasons[path], path


def test_litter_is_counted_and_hidden_files_never_opened(messy_tree, checked):
    scan = scan_dataset(messy_tree["root"], workers=1)
    assert sum(scan.litter.values()) == messy_tree["litter"]
    assert scan.litter["hidden or system"] == messy_tree["litter"] - 1
    assert scan.litter["not an image by content"] == 1  # notes.txt
    for path in checked:
        parts = os.path.relpath(path, messy_tree["root"]).split(os.sep)
        assert not any(p.startswith(".") or p.lower() in ("thumbs.db", "desktop.ini")
                       for p in parts), path
    used = {os.path.basename(p) for samples in scan.samples.values() for p, _ in samples}
    used |= {os.path.basename(p) for p, _ in scan.skipped}
    assert not any("checkpoint" in name or name.endswith(".txt") for name in used)


def test_parallel_scan_agrees_with_the_serial_one(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split={"train": 30, "valid": 4})
    with open(os.path.join(root, "train", "cat", "bad.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really")
    serial, parallel = scan_dataset(root, workers=1), scan_dataset(root, workers=2)
    assert parallel.samples == serial.samples and parallel.skipped == serial.skipped
    assert len(serial.skipped) == 1


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", ["val", "validation", "validate", "Valid"])
def test_valid_folder_aliases(tmp_path, alias):
    root = make_image_folder(tmp_path / "data", per_split={"train": 3, "valid": 2, "test": 1})
    os.rename(os.path.join(root, "valid"), os.path.join(root, alias))
    scan = scan_dataset(root, workers=1)
    assert scan.layout == "splits" and len(scan.samples["valid"]) == 6
    layout = data_report.report_lines(scan)[1]
    assert f"{alias}/" in layout and (alias == "valid" or "(as valid)" in layout)


def test_single_folder_is_split_70_10_20_per_class(tmp_path):
    root = make_image_folder(tmp_path / "data", layout="single", per_split={"all": 20})
    scan = scan_dataset(root, seed=3, workers=1)
    assert scan.layout == "single"
    for split, n in (("train", 14), ("valid", 2), ("test", 4)):
        assert [scan.counts(split)[i] for i in range(3)] == [n] * 3, split
    files = scan.split_files
    every = sorted(os.path.relpath(os.path.join(d, f), root)
                   for d, _, fs in os.walk(root) for f in fs)
    assert sorted(files["train"] + files["valid"] + files["test"]) == every
    assert [n for n in scan.notes if "split each class 70/10/20" in n] == scan.notes
    again, other = scan_dataset(root, seed=3, workers=1), scan_dataset(root, seed=4, workers=1)
    assert again.split_files == files
    assert other.split_files["test"] != files["test"]


def test_split_option_without_test(tmp_path):
    root = make_image_folder(tmp_path / "data", layout="single", per_split={"all": 10})
    scan = scan_dataset(root, split=(0.8, 0.2, 0.0), workers=1)
    assert sorted(scan.samples) == ["train", "valid"]
    assert len(scan.samples["train"]) == 24 and len(scan.samples["valid"]) == 6


def test_train_only_carves_valid_and_test_said_in_one_line(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split={"train": 20})
    scan = scan_dataset(root, workers=1)
    assert scan.layout == "train-only"
    assert [len(scan.samples[s]) for s in ("train", "valid", "test")] == [42, 6, 12]
    assert len(scan.notes) == 1
    assert "carved valid and test out of train/, 70/10/20" in scan.notes[0]
    assert sum(line.startswith("note: ") for line in data_report.summary_lines(scan)) == 1


def test_train_and_test_without_valid_carves_only_valid(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split={"train": 16, "test": 4})
    scan = scan_dataset(root, workers=1)
    assert len(scan.samples["test"]) == 12
    assert all("/test/" in p for p, _ in scan.samples["test"])
    assert [len(scan.samples[s]) for s in ("train", "valid")] == [42, 6]
    assert scan.notes == ["no valid/ folder: carved valid out of train/, 88/12 per class "
                          "(--split, --seed 0)"]


# ---------------------------------------------------------------------------------------------
# Errors and warnings of the scan
# ---------------------------------------------------------------------------------------------
def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    root = make_image_folder(tmp_path / "data")
    os.makedirs(os.path.join(root, "train", "owl"))
    with pytest.raises(UserError, match=r"train: class folder\(s\) with no usable image: owl;"):
        scan_dataset(root, workers=1)


def test_class_of_only_broken_files_is_an_error_naming_it(tmp_path):
    root = make_image_folder(tmp_path / "data", layout="single", per_split={"all": 5})
    os.makedirs(os.path.join(root, "owl"))
    with open(os.path.join(root, "owl", "0.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff")
    with pytest.raises(UserError, match=r"no usable image: owl;"):
        scan_dataset(root, workers=1)


@pytest.mark.parametrize("split", ["valid", "test"])
def test_class_missing_from_train_is_an_error_naming_it(tmp_path, split):
    root = make_image_folder(tmp_path / "data")
    shutil.copytree(os.path.join(root, split, "cat"), os.path.join(root, split, "owl"))
    with pytest.raises(UserError, match=rf"{split}: class folder\(s\) not in train/: owl;"):
        scan_dataset(root, workers=1)


def test_class_of_train_missing_from_valid_is_a_warning(tmp_path):
    root = make_image_folder(tmp_path / "data")
    shutil.rmtree(os.path.join(root, "valid", "fox"))
    scan = scan_dataset(root, workers=1)
    assert len(scan.warnings) == 1 and "valid has no images of 1 class: fox" in scan.warnings[0]
    assert "warning: " + scan.warnings[0] in data_report.summary_lines(scan)


def test_split_without_usable_images_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split={"train": 3, "val": 0})
    with pytest.raises(UserError, match=r"val: no usable images"):
        scan_dataset(root, workers=1)


@pytest.mark.parametrize("make,match", [
    (lambda r: None, "no such folder"),
    (lambda r: make_image_folder(r, per_split={"valid": 2}), "no train/ folder"),
    (lambda r: make_image_folder(r, classes=("cat",), layout="single"), "only one class"),
    (lambda r: os.makedirs(os.path.join(r, "train")), "no class folders found"),
])
def test_unusable_folders_are_errors(tmp_path, make, match):
    root = str(tmp_path / "data")
    make(root)
    with pytest.raises(UserError, match=match):
        scan_dataset(root, workers=1)


# ---------------------------------------------------------------------------------------------
# The scan cache
# ---------------------------------------------------------------------------------------------
def test_second_scan_decodes_nothing_and_a_changed_file_is_checked_again(tmp_path, checked):
    root = make_image_folder(tmp_path / "data", per_split={"train": 4, "valid": 2})
    cache = str(tmp_path / "cache")
    first = scan_dataset(root, cache_dir=cache, workers=1)
    assert len(checked) == 18
    checked.clear()
    assert scan_dataset(root, cache_dir=cache, workers=1).samples == first.samples
    assert checked == []
    changed = os.path.join(root, "train", "dog", "001.jpg")
    data = open(changed, "rb").read()
    with open(changed, "wb") as f:
        f.write(data[:len(data) // 2])
    touched = os.path.join(root, "train", "cat", "002.jpg")
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    third = scan_dataset(root, cache_dir=cache, workers=1)
    assert sorted(checked) == sorted([changed, touched])
    assert [p for p, _ in third.skipped] == [changed]
    assert third.fingerprint != first.fingerprint


def test_unreadable_file_is_checked_again_next_time(tmp_path, monkeypatch, checked):
    root = make_image_folder(tmp_path / "data", per_split={"train": 2, "valid": 1})
    cache = str(tmp_path / "cache")
    with monkeypatch.context() as m:
        lock(m, "001.jpg")
        assert len(scan_dataset(root, cache_dir=cache, workers=1).skipped) == 3
    checked.clear()
    scan = scan_dataset(root, cache_dir=cache, workers=1)  # permissions fixed
    assert scan.skipped == [] and len(checked) == 3


def test_scan_cache_follows_the_folder_not_the_spelling_of_its_path(tmp_path, monkeypatch,
                                                                      checked):
    make_image_folder(tmp_path / "data", per_split={"train": 2, "valid": 1})
    cache = str(tmp_path / "cache")
    scan_dataset(str(tmp_path / "data"), cache_dir=cache, workers=1)
    checked.clear()
    monkeypatch.chdir(tmp_path)
    scan_dataset("./data", cache_dir=cache, workers=1)
    assert checked == []


def test_damaged_scan_cache_costs_only_a_fresh_scan(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split={"train": 2, "valid": 1})
    cache = tmp_path / "cache"
    scan_dataset(root, cache_dir=str(cache), workers=1)
    for path in cache.iterdir():
        path.write_text("{not json")
    assert len(scan_dataset(root, cache_dir=str(cache), workers=1).samples["train"]) == 6


# ---------------------------------------------------------------------------------------------
# train.py on messy folders
# ---------------------------------------------------------------------------------------------
def test_train_uses_the_usable_images_and_lists_what_it_skipped(messy_tree, tmp_path, capsys,
                                                                monkeypatch):
    root = messy_tree["root"]
    locked = os.path.join(root, "train", "fox", "locked.jpg")
    shutil.copyfile(os.path.join(root, "train", "fox", "000.jpg"), locked)
    lock(monkeypatch, "locked.jpg")
    save = tmp_path / "run"
    assert train.main([root, "--save_dir", str(save), *TINY]) == 0
    out = capsys.readouterr().out
    assert "left out: 6 unusable images and 8 files that are not images" in out
    for path, words in {**messy_tree["broken"], locked: "permission denied"}.items():
        line = [x for x in out.splitlines() if os.path.relpath(path, root) in x]
        assert len(line) == 1 and words in line[0], path
    ckpt = torch.load(save / "checkpoint.pth", weights_only=True)
    usable = messy_tree["usable"]
    assert ckpt["classes"] == list(messy.CLASSES)
    assert ckpt["data"]["counts"] == {s: sum(n for (sp, _), n in usable.items() if sp == s)
                                      for s in ("train", "valid", "test")}
    # an iPhone photo, trained on above (one of train/cat's kinds), is predicted like a JPEG
    heic = os.path.join(root, "train", "cat", "iphone.heic")
    assert predict.main([heic, str(save / "checkpoint.pth")]) == 0
    assert "cat" in capsys.readouterr().out


def test_train_records_an_automatic_split_in_the_checkpoint(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", layout="single", per_split={"all": 10})
    save = tmp_path / "run"
    assert train.main([root, "--save_dir", str(save), "--seed", "5", *TINY]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note: ")]
    assert len(notes) == 1 and "70/10/20" in notes[0]
    data = torch.load(save / "checkpoint.pth", weights_only=True)["data"]
    assert data["layout"] == "single"
    assert data["split_files"] == scan_dataset(root, seed=5, workers=1).split_files
    assert data["split_files"] != scan_dataset(root, seed=6, workers=1).split_files


def _one_error_line(capsys):
    captured = capsys.readouterr()
    # Besides the error only the scan's progress line may be there.
    lines = [x for x in captured.err.strip().splitlines() if not x.startswith("checking images")]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


@pytest.mark.parametrize("break_it,words", [
    (lambda r: os.makedirs(os.path.join(r, "train", "owl")), ["train", "owl", "add images"]),
    (lambda r: shutil.copytree(os.path.join(r, "valid", "cat"), os.path.join(r, "valid", "owl")),
     ["valid", "owl", "not in"]),
    (lambda r: shutil.rmtree(os.path.join(r, "train")), ["no train/ folder"]),
], ids=["empty class", "class not in train", "no train folder"])
def test_train_stops_with_one_line_on_a_data_error(tmp_path, capsys, break_it, words):
    root = make_image_folder(tmp_path / "data", per_split={"train": 2, "valid": 1})
    break_it(root)
    save = tmp_path / "run"
    assert train.main([root, "--save_dir", str(save), *TINY]) == 2
    line = _one_error_line(capsys)
    assert all(w in line for w in words), line
    assert not (save / "checkpoint.pth").exists()


# ---------------------------------------------------------------------------------------------
# The data report
# ---------------------------------------------------------------------------------------------
def test_check_prints_the_report_and_trains_nothing(messy_tree, tmp_path, capsys):
    root = messy_tree["root"]
    save = tmp_path / "run"
    assert train.main([root, "--check", "--save_dir", str(save)]) == 0
    out = capsys.readouterr().out
    for row in ("class train valid test", "cat 22 3 4", "dog 6 3 3", "fox 6 3 3",
                "total 34 9 10"):
        assert re.search("^" + r"\s+".join(row.split()) + "$", out, re.M), row
    assert "class balance (train): largest cat 22, smallest dog 6 (3.7x)" in out
    assert "image sizes: width 48-160 px, height 48-120 px" in out
    assert "ignored, not images: 8 files" in out
    assert "skipped, unusable images: 5" in out
    for path, words in messy_tree["broken"].items():
        assert re.search(rf"^  {re.escape(os.path.relpath(path, root))}: .*{words}", out, re.M)
    assert "identical files in more than one split (leakage): 1" in out
    assert "train/cat/000.jpg = test/cat/leaked.jpg" in out
    assert "epoch" not in out and not (save / "checkpoint.pth").exists()


def test_check_shows_class_names_and_checks_them(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", per_split={"train": 2, "valid": 1})
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"cat": "house cat", "dog": "dog", "fox": "red fox"}))
    assert train.main([root, "--check", "--category_names", str(names),
                       "--save_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^cat \(house cat\)\s+2\s+1$", out, re.M)
    assert re.search(r"^dog\s+2\s+1$", out, re.M)
    names.write_text(json.dumps({"cat": "house cat"}))
    assert train.main([root, "--check", "--category_names", str(names),
                       "--save_dir", str(tmp_path)]) == 2
    assert "no name for 2 of the 3 classes (dog, fox)" in _one_error_line(capsys)


def test_leak_with_two_labels_is_pointed_out(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split={"train": 2, "valid": 1})
    shutil.copyfile(os.path.join(root, "train", "cat", "000.jpg"),
                    os.path.join(root, "valid", "dog", "copy.jpg"))
    lines = data_report.report_lines(scan_dataset(root, workers=1))
    assert "  train/cat/000.jpg = valid/dog/copy.jpg  (labelled cat and dog)" in lines


def test_summary_lists_ten_skipped_files_at_most(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split={"train": 2, "valid": 1})
    for n in range(12):
        with open(os.path.join(root, "train", "cat", f"bad{n:02d}.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0" + bytes(50))
    lines = data_report.summary_lines(scan_dataset(root, workers=1))
    assert sum(line.startswith("  skipped ") for line in lines) == 10
    assert "  ... and 2 more" in lines


# ---------------------------------------------------------------------------------------------
# Big photos: decoded once at the scale the network needs (issue 19)
# ---------------------------------------------------------------------------------------------
PRE = {"size": 64, "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.5] * 3}


def photo(width, height, seed=0):
    """A smooth picture with a little grain, like an enlarged photo."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    pixels = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels += rng.normal(0, 3, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_big_photo_is_decoded_small_and_preprocessed_as_from_a_full_decode(fmt):
    data = encode(photo(1200, 900), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    side = decode.eval_side(PRE)  # 73
    reduced = load_rgb(data, side)
    assert side <= min(reduced.size) < min(load_rgb(data).size) / 4
    full = decode.eval_array(load_rgb(data), PRE)
    # The network's input, in normalised units (2 is the range of 255 levels): within 3 levels
    # on average for this picture's sharp colour patches (2.2 measured); 0.27 of a level on
    # 12-megapixel copies of real photos (docs/benchmarks.md).
    assert np.abs(decode.load_eval_array(data, PRE) - full).mean() < 3 * 2 / 255


def test_augmented_views_keep_enough_pixels_for_their_smallest_crop():
    side = decode.augment_side(PRE)
    assert side >= PRE["size"] / (0.25 * 3 / 4) ** 0.5  # a quarter of the area at aspect 3:4
    # a portrait photo stored on its side: the shorter side, as displayed, is what counts
    img = load_rgb(messy.with_orientation(photo(1600, 1000), 6), side)
    assert img.width < img.height and side <= img.width < 1000 / 2


def test_the_scan_catches_a_truncated_big_jpeg(tmp_path):
    data = encode(photo(1600, 1200), "JPEG", quality=90)
    whole, cut = tmp_path / "whole.jpg", tmp_path / "cut.jpg"
    whole.write_bytes(data)
    cut.write_bytes(data[:int(len(data) * 0.9)])
    assert (check_file(str(whole)).width, check_file(str(whole)).height) == (1600, 1200)
    check = check_file(str(cut))
    assert not check.ok and "truncated" in check.reason


def test_the_scan_gives_the_size_a_photo_is_displayed_at(tmp_path):
    path = tmp_path / "turned.jpg"
    path.write_bytes(messy.with_orientation(photo(400, 300), 6))
    check = check_file(str(path))
    assert check.ok and (check.width, check.height) == (300, 400)


def test_heic_photos_are_read_and_scanned(tmp_path):
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(messy.heic(Image.new("RGB", (64, 48), (200, 40, 30))))
    assert path.name.lower().endswith(scanning.IMAGE_EXTENSIONS)
    assert close(pixel(load_rgb(str(path))), (200, 40, 30))
    check = check_file(str(path))
    assert check.ok and (check.width, check.height) == (64, 48)


def test_a_photos_views_come_from_one_decode_and_repeat_whatever_the_workers(tmp_path,
                                                                            monkeypatch):
    from imgclf.engine import distributed, features
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.jpg"))
        photo(640, 480, seed=i).save(paths[-1], quality=90)
    decoded = []
    real = decode.load_rgb
    monkeypatch.setattr(decode, "load_rgb", lambda *a: decoded.append(a) or real(*a))
    dataset = features.ViewDataset([(p, 0) for p in paths], PRE, views=2, seed=3, mirror=True)
    views, label = dataset[1]
    assert views.shape == (4, 3, 64, 64) and label == 0 and len(decoded) == 1
    assert np.array_equal(views[1], views[0][..., ::-1])  # the mirror image
    assert not np.array_equal(views[2], views[3])  # two different augmentations
    job = distributed.Single(torch.device("cpu"))
    batches = {workers: [x for x, _ in features.make_loader(dataset, 2, workers, job)]
               for workers in (0, 2)}
    assert all(np.array_equal(a, b) for a, b in zip(batches[0], batches[2]))
    assert np.array_equal(batches[0][0][1], views)


# ---------------------------------------------------------------------------------------------
# Near-duplicates across splits by perceptual hash (issue 21)
# ---------------------------------------------------------------------------------------------
def save_shrunk_copy(src, dst, scale=0.85, quality=80):
    """The same picture, other bytes: resized and saved as a JPEG."""
    with Image.open(src) as img:
        size = (round(img.width * scale), round(img.height * scale))
        img.convert("RGB").resize(size, Image.BICUBIC).save(dst, quality=quality)


def hash_bits(a, b):
    return (int(a, 16) ^ int(b, 16)).bit_count()


def test_hash_of_a_shrunk_recompressed_copy_is_close_and_of_another_photo_far(tmp_path):
    digits = pytest.importorskip("sklearn.datasets").load_digits()
    hashes = []
    for size in (32, 128):  # as small as the demo's digits, and a small photo
        for i in range(10):  # real scans, one of each digit
            path = tmp_path / f"{size}-{i}.png"
            gray = (255 - digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(gray, "L").resize((size, size), Image.BILINEAR).save(path)
            save_shrunk_copy(path, tmp_path / f"{size}-{i}-copy.jpg")
            hashes.append([check_file(str(path)).phash,
                           check_file(str(tmp_path / f"{size}-{i}-copy.jpg")).phash])
    for original, copy in hashes:
        assert hash_bits(original, copy) <= data_report.NEAR_DUPLICATE_BITS
    for (a, _), (b, _) in zip(hashes[:10], hashes[1:10]):
        assert hash_bits(a, b) > data_report.NEAR_DUPLICATE_BITS


def test_band_search_finds_what_comparing_every_pair_finds():
    rng = np.random.default_rng(0)
    references = [int(h) for h in rng.integers(0, 2**63, 300, dtype=np.int64)]
    queries = [int(h) for h in rng.integers(0, 2**63, 100, dtype=np.int64)]
    for i, j in enumerate(rng.choice(300, 60, replace=False)):  # planted: 0 to 6 bits flipped
        flips = rng.choice(64, i % 7, replace=False)
        queries[i] = references[j] ^ sum(1 << int(b) for b in flips)
    for max_bits in (2, 4, 6):
        brute = [[j for j, r in enumerate(references) if (q ^ r).bit_count() <= max_bits]
                 for q in queries]
        assert data_report.close_hashes(queries, references, max_bits) == brute
        assert sum(map(bool, brute)) >= 60 * (max_bits + 1) // 7


def test_flat_pictures_have_no_hash_and_do_not_pair(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split={"train": 2, "valid": 1, "test": 1})
    for split, shade in (("train", 250), ("valid", 252), ("test", 255)):
        Image.new("RGB", (48, 48), (shade, shade, shade)).save(
            os.path.join(root, split, "cat", "blank.png"))
    scan = scan_dataset(root, workers=1)
    assert scan.phashes[os.path.join(root, "test", "cat", "blank.png")] == ""
    assert data_report.find_near_duplicates(scan) == []


def test_check_lists_a_near_duplicate_across_splits_once(tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", per_split={"train": 3, "valid": 1, "test": 1})
    save_shrunk_copy(os.path.join(root, "train", "dog", "001.jpg"),
                     os.path.join(root, "test", "dog", "copy.jpg"))
    shutil.copyfile(os.path.join(root, "train", "cat", "000.jpg"),  # a leak, not a near-copy
                    os.path.join(root, "valid", "cat", "leaked.jpg"))
    assert train.main([root, "--check", "--save_dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "near-duplicates across splits (perceptual hash): 1;" in out
    assert re.search(r"^  train/dog/001\.jpg ~ test/dog/copy\.jpg  \(differ in \d of 64 bits\)$",
                     out, re.M)
    assert "identical files in more than one split (leakage): 1" in out
    summary = data_report.summary_lines(scan_dataset(root, workers=1))
    assert "warning: near-duplicates across splits (perceptual hash): 1; --check lists them" \
        in summary
