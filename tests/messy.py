"""A generated messy image folder: every kind of image, broken file and litter the scan handles.

Used by tests/test_data.py; run it as a script to write one and look at it:
    python tests/messy.py /tmp/messy && python train.py /tmp/messy --check
"""
import io
import os
import shutil
import struct
import sys
import zlib

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import draw_sample  # noqa: E402

CLASSES = ("cat", "dog", "fox")


def encode(img, fmt, **options):
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_header_only(width, height):
    """A small PNG whose header claims width x height RGB pixels: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) +
            png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + png_chunk(b"IEND", b""))


def with_orientation(img, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def image_kinds(ci, seed):
    """file name -> bytes: one file of each kind the scan must read, all pictures of class ci."""
    rgb = draw_sample(ci, seed, size=48)
    rgba = rgb.convert("RGBA")
    alpha = np.full((48, 48), 255, np.uint8)
    alpha[:8] = 0  # a transparent band on top
    rgba.putalpha(Image.fromarray(alpha))
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    palette = rgb.quantize(16)
    frames = [rgb, draw_sample(ci, seed + 1000, size=48)]
    return {
        "gray.png": encode(rgb.convert("L"), "PNG"),
        "palette.png": encode(palette, "PNG"),
        "palette_alpha.png": encode(palette, "PNG", transparency=0),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "gray16.png": encode(Image.fromarray(gray16), "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "la.png": encode(rgba.convert("LA"), "PNG"),
        "rotated.jpg": with_orientation(rgb.resize((64, 48)), 6),  # shown as 48x64
        "animated.gif": _animation(frames, "GIF"),
        "animated.webp": _animation(frames, "WEBP", lossless=True),
        "photo.bmp": encode(rgb, "BMP"),
        "photo.tiff": encode(rgb, "TIFF"),
        "photo.webp": encode(rgb, "WEBP", quality=90),
        "big.jpg": encode(rgb.resize((160, 120)), "JPEG"),
        "iphone.heic": heic(rgb),
        "photo.avif": encode(rgb, "AVIF", quality=90),
    }


def heic(img):
    """An HEIC file, as iPhones save photos."""
    import pillow_heif
    buf = io.BytesIO()
    pillow_heif.from_pillow(img).save(buf, quality=90)
    return buf.getvalue()


def _animation(frames, fmt, **options):
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, **options)
    return buf.getvalue()


def broken_kinds(ci, seed):
    """file name -> (bytes, words the reason must contain)."""
    jpeg = encode(draw_sample(ci, seed, size=48), "JPEG", quality=95)
    png = bytearray(encode(draw_sample(ci, seed, size=48), "PNG"))
    idat = png.index(b"IDAT") + 4
    png[idat + 20:idat + 200] = bytes(range(180))  # garbage inside the compressed pixels
    rng = np.random.default_rng(seed)
    return {
        "truncated.jpg": (jpeg[:len(jpeg) // 2], "truncated"),
        "corrupt.png": (bytes(png), "corrupt"),
        "empty.jpg": (b"", "empty file"),
        "random.jpg": (rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), "not an image"),
        "bomb.png": (png_header_only(100_000, 100_000), "decompression bomb"),
    }


LITTER = {  # path under the root -> bytes; none of these may be read as an image
    "train/.DS_Store": b"\x00\x00\x00\x01Bud1",
    "train/cat/.DS_Store": b"\x00\x00\x00\x01Bud1",
    "train/cat/._001.jpg": b"\x00\x05\x16\x07AppleDouble",
    "train/cat/Thumbs.db": b"\xd0\xcf\x11\xe0",
    "train/dog/desktop.ini": b"[.ShellClassInfo]\r\n",
    "train/dog/notes.txt": b"these are dogs\n",
    "valid/fox/Thumbs.db": b"\xd0\xcf\x11\xe0",
}


def make_messy_tree(root, plain=6, valid=3, test=3):
    """Write the messy folder; return what a correct scan must find in it.

    train/cat holds one file of every image kind, train/dog every kind of broken file, and
    test/cat an exact copy of a training image (leakage).
    """
    root = str(root)
    seed = 0
    usable = {}
    for split, count in (("train", plain), ("valid", valid), ("test", test)):
        for ci, cls in enumerate(CLASSES):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for n in range(count):
                seed += 1
                draw_sample(ci, seed).save(os.path.join(folder, f"{n:03d}.jpg"), quality=90)
            usable[split, cls] = count
    kinds = image_kinds(0, 500)
    for name, data in kinds.items():
        _write(os.path.join(root, "train", "cat", name), data)
    usable["train", "cat"] += len(kinds)
    broken = {}
    for name, (data, words) in broken_kinds(1, 600).items():
        path = os.path.join(root, "train", "dog", name)
        _write(path, data)
        broken[path] = words
    for rel, data in LITTER.items():
        _write(os.path.join(root, rel), data)
    # A notebook's checkpoint folder holds a real image; being hidden, it must not count.
    hidden = os.path.join(root, "train", "cat", ".ipynb_checkpoints", "000-checkpoint.jpg")
    os.makedirs(os.path.dirname(hidden))
    draw_sample(0, 1).save(hidden)
    shutil.copyfile(os.path.join(root, "train", "cat", "000.jpg"),
                    os.path.join(root, "test", "cat", "leaked.jpg"))
    usable["test", "cat"] += 1
    return dict(root=root, usable=usable, broken=broken, kinds=sorted(kinds),
                litter=len(LITTER) + 1)


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


if __name__ == "__main__":
    print(make_messy_tree(sys.argv[1])["root"])
