"""Reading any image as RGB, at the smallest scale the network needs, and the
preprocessing that turns it into the network's input (eval and train views)."""
import io
import math
import re
import struct
import warnings

import numpy as np
import pillow_heif
from PIL import Image, ImageOps, UnidentifiedImageError

# iPhones save HEIC by default; Pillow reads AVIF by itself, HEIC/HEIF through this plugin.
pillow_heif.register_heif_opener()
# Pixels above which an image is refused before decoding: a decompression bomb guard.
# 64 megapixels is beyond any camera photo a classifier needs, and far below what exhausts memory.
MAX_PIXELS = 64_000_000


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
class TooManyPixels(ValueError):
    """An image whose header claims more pixels than MAX_PIXELS: refused before decoding."""


def open_image(source):
    """Open an image (path, bytes or file object) and check its size before any pixel is read."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow's own guard fired while reading the header; say it in our words.
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise TooManyPixels(f"{int(found[1]):,} pixels" if found else "too many pixels") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise TooManyPixels(f"{w}x{h} pixels")
    return img


def to_rgb(img):
    """The one conversion to RGB used everywhere: EXIF orientation applied, first frame of an
    animation, transparency composited on white, 16-bit scaled down rather than clipped."""
    img.seek(0)
    img.load()
    img = _apply_orientation(img)
    if img.mode.startswith("I") or img.mode == "F":
        img = _wide_gray_to_l(img)
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        img = img.convert("RGBA")  # a transparent colour or palette entry, as in GIF and PNG
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


ORIENTATION_TAG = 0x0112


def _apply_orientation(img):
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, KeyError, TypeError, struct.error):
        return img  # a damaged EXIF block should not cost the picture, only its rotation


def _wide_gray_to_l(img):
    """16-bit (and 32-bit) grey to 8-bit by the format's full range, so nothing is clipped."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "F" and arr.size and arr.max() <= 1.0:
        top = 1.0
    else:  # "I" or "F" carry no bit depth: take the smallest common range that holds the data
        peak = float(arr.max()) if arr.size else 0.0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else peak
    out = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out)  # 2-D uint8: mode "L"


def load_rgb(source, min_side=None):
    """Decode an image file into an RGB PIL image (raises OSError/ValueError if broken).

    With min_side, the shorter side the caller needs, a larger image comes back smaller but
    never below it: a JPEG is decoded at 1/2, 1/4 or 1/8 scale inside the decoder (DCT scaling:
    a 12-megapixel photo in a fraction of the time of a full decode, the whole file still read
    and checked), other formats are decoded in full and then reduced by a whole factor."""
    img = open_image(source)
    try:
        if min_side:
            _draft_jpeg(img, min_side)
        rgb = to_rgb(img)
    finally:
        img.close()
    return _reduce(rgb, min_side) if min_side else rgb


def _draft_jpeg(img, min_side):
    # Orientation is applied after decoding, but the requirement is on the shorter side, which
    # a rotation does not change.
    if img.format in ("JPEG", "MPO"):
        w, h = img.size
        scale = min(w, h) / min_side
        img.draft(img.mode, (max(1, math.ceil(w / scale)), max(1, math.ceil(h / scale))))


def _reduce(img, min_side):
    factor = min(img.size) // min_side
    return img.reduce(factor) if factor >= 2 else img


def eval_side(preprocess):
    """The shorter side eval_array resizes a photo to."""
    return int(round(preprocess["size"] / preprocess["crop_pct"]))


# RandomResizedCrop takes from a quarter of the photo's area, at aspect ratios 3:4 to 4:3.
AUG_MIN_AREA = 0.25
AUG_RATIOS = (3 / 4, 4 / 3)


def augment_side(preprocess):
    """The shorter side a photo needs so that train_augment's smallest crop (a quarter of the
    area at aspect 3:4: sqrt(0.25 * 3/4) = 0.43 of the shorter side) still holds `size` pixels
    across, as it does from a full-size decode."""
    smallest = math.sqrt(AUG_MIN_AREA * AUG_RATIOS[0])
    return max(eval_side(preprocess), math.ceil(preprocess["size"] / smallest))


def load_eval_array(source, preprocess):
    """A photo as the network sees it at evaluation and prediction: decoded at the scale the
    resize needs, then eval_array."""
    return eval_array(load_rgb(source, eval_side(preprocess)), preprocess)


def describe_image_error(err):
    """A short reason for a file that failed to decode, for reports."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image (unknown format)"
    if isinstance(err, TooManyPixels):
        return (f"refused, not decoded: {err} is over the {MAX_PIXELS // 1_000_000}-megapixel "
                f"limit (possible decompression bomb)")
    if isinstance(err, PermissionError):
        return "unreadable (permission denied)"
    if isinstance(err, FileNotFoundError):
        return "unreadable (missing file or broken link)"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "truncated" in text.lower() or isinstance(err, EOFError):
        return "truncated (the file ends before the image does)"
    return "corrupt (" + text[:160] + ")"


# Errors that mean "this file is not a usable image" (never a bug of ours).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                Image.DecompressionBombWarning, UnidentifiedImageError)


RESIZE_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def resize_and_crop(img, size, crop_pct, upscale):
    """Resize the shorter side to size / crop_pct, then crop the centre size x size. Shrinking
    is bicubic; enlarging uses the `upscale` filter."""
    short = int(round(size / crop_pct))
    w, h = img.size
    scale = short / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), RESIZE_FILTERS[upscale if scale > 1 else "bicubic"])
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def to_normalized_array(img, mean, std):
    """RGB PIL image -> float32 CHW array, normalised."""
    arr = np.asarray(img, dtype=np.float32) * (1.0 / 255.0)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def upscale_filter(preprocess):
    # Checkpoints from before "upscale" was stored were trained with bicubic throughout.
    return preprocess.get("upscale", "bicubic")


def eval_array(img, preprocess):
    """The evaluation preprocessing shared by training (valid/test) and prediction."""
    img = resize_and_crop(img, preprocess["size"], preprocess["crop_pct"],
                          upscale_filter(preprocess))
    return to_normalized_array(img, preprocess["mean"], preprocess["std"])


def train_augment(preprocess):
    """Random crop, flip and a little colour change, as a function PIL image -> CHW array."""
    import torchvision.transforms.v2 as T
    size = preprocess["size"]
    ops = T.Compose([
        T.RandomResizedCrop(size, scale=(AUG_MIN_AREA, 1.0), ratio=AUG_RATIOS,
                            interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2),
    ])

    def augment(img):
        return to_normalized_array(ops(img), preprocess["mean"], preprocess["std"])
    return augment
