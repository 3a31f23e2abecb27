// The checkpoint's evaluation preprocessing, as decode.load_eval_array does it in Python:
// decode (EXIF orientation applied, transparency on white), shrink a large photo first (JPEG:
// what Pillow's draft decode gives, other formats: Image.reduce), resize the shorter side to
// size / crop_pct with Pillow's resampling filter, crop the centre size x size, and normalise
// in float32. The resize is Pillow's algorithm (same kernel, same fixed-point rounding), not
// the canvas's own scaling, so that a photo smaller than twice the network's input reaches the
// model as the same bytes as in Python.
'use strict';

const PRECISION_BITS = 32 - 8 - 2;  // Pillow's fixed point for 8-bit images
const FILTERS = {
  bicubic: {
    support: 2.0,
    kernel(x) {  // a = -0.5, as Pillow
      x = Math.abs(x);
      if (x < 1) return (1.5 * x - 2.5) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * -0.5;
      return 0;
    },
  },
  bilinear: {
    support: 1.0,
    kernel(x) { x = Math.abs(x); return x < 1 ? 1 - x : 0; },
  },
};

// Python's round(): halves go to the even neighbour.
function pyRound(x) {
  const r = Math.round(x);
  return (Math.abs(x % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

function evalSide(pre) { return pyRound(pre.size / pre.crop_pct); }

// Kernel weights of the output positions [first, first + count) of a 1-D resize inSize ->
// outSize, as integers in Pillow's fixed point: {lo, n, k} per position.
function coefficients(inSize, outSize, first, count, filter) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filter.support * filterScale;
  const out = [];
  for (let xx = first; xx < first + count; xx++) {
    const center = (xx + 0.5) * scale;
    const lo = Math.max(0, Math.trunc(center - support + 0.5));
    const hi = Math.min(inSize, Math.trunc(center + support + 0.5));
    const w = [];
    let total = 0;
    for (let x = lo; x < hi; x++) {
      const v = filter.kernel((x - center + 0.5) / filterScale);
      w.push(v);
      total += v;
    }
    const k = new Float64Array(w.length);
    for (let i = 0; i < w.length; i++) {
      const v = total !== 0 ? w[i] / total : w[i];
      k[i] = Math.trunc(v < 0 ? -0.5 + v * (1 << PRECISION_BITS) : 0.5 + v * (1 << PRECISION_BITS));
    }
    out.push({lo, n: w.length, k});
  }
  return out;
}

function clip8(ss) {
  const v = Math.floor(ss / (1 << PRECISION_BITS));
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

// One pass of Pillow's separable resample over RGBA pixels (alpha ignored: the photo is RGB
// by now). horizontal: out[y][x] from in[y + rowOffset][...]; else out[y][x] from in[...][x].
function resamplePass(src, srcW, coeffs, outW, outH, horizontal, rowOffset) {
  const out = new Uint8ClampedArray(outW * outH * 4);
  const half = 1 << (PRECISION_BITS - 1);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const c = coeffs[horizontal ? x : y];
      let r = half, g = half, b = half;
      for (let i = 0; i < c.n; i++) {
        const at = horizontal ? ((y + rowOffset) * srcW + c.lo + i) * 4
                              : ((c.lo + i) * srcW + x) * 4;
        const k = c.k[i];
        r += src[at] * k; g += src[at + 1] * k; b += src[at + 2] * k;
      }
      const o = (y * outW + x) * 4;
      out[o] = clip8(r); out[o + 1] = clip8(g); out[o + 2] = clip8(b); out[o + 3] = 255;
    }
  }
  return out;
}

// Pillow's img.resize((newW, newH), filter).crop((left, top, left + size, top + size)),
// computing only the pixels the crop keeps (each depends only on its own weights).
function resizeAndCropPillow(img, newW, newH, left, top, size, filter) {
  const {data, width, height} = img;
  const cols = coefficients(width, newW, left, size, filter);
  const rows = coefficients(height, newH, top, size, filter);
  const vertical = newH !== height;
  // The rows the vertical pass reads (or, without one, the rows the crop keeps)
  const first = vertical ? rows[0].lo : top;
  const count = vertical ? rows[size - 1].lo + rows[size - 1].n - first : size;
  const across = newW !== width ? resamplePass(data, width, cols, size, count, true, first)
                                : cropRGBA(data, width, left, first, size, count);
  if (!vertical) return across;
  for (const r of rows) r.lo -= first;
  return resamplePass(across, size, rows, size, size, false, 0);
}

function cropRGBA(data, width, left, top, w, h) {
  const out = new Uint8ClampedArray(w * h * 4);
  for (let y = 0; y < h; y++) {
    out.set(data.subarray(((top + y) * width + left) * 4, ((top + y) * width + left + w) * 4),
            y * w * 4);
  }
  return out;
}

// Image.reduce(factor): the mean of each factor x factor block, the last row and column of
// blocks over the pixels that are there, in Pillow's fixed point: (sum + n/2) times a
// single-precision reciprocal of n, so that it rounds as Pillow does.
function boxReduce(img, factor) {
  const {data, width, height} = img;
  const w = Math.ceil(width / factor), h = Math.ceil(height / factor);
  const out = new Uint8ClampedArray(w * h * 4);
  for (let by = 0; by < h; by++) {
    const y0 = by * factor, y1 = Math.min(height, y0 + factor);
    for (let bx = 0; bx < w; bx++) {
      const x0 = bx * factor, x1 = Math.min(width, x0 + factor);
      let r = 0, g = 0, b = 0;
      for (let y = y0; y < y1; y++) {
        for (let i = (y * width + x0) * 4, end = (y * width + x1) * 4; i < end; i += 4) {
          r += data[i]; g += data[i + 1]; b += data[i + 2];
        }
      }
      const n = (y1 - y0) * (x1 - x0), amend = n >> 1, o = (by * w + bx) * 4;
      const multiplier = Math.trunc(Math.fround(4294967296 / Math.fround(256 * n)));
      out[o] = Math.floor((r + amend) * multiplier / 16777216);
      out[o + 1] = Math.floor((g + amend) * multiplier / 16777216);
      out[o + 2] = Math.floor((b + amend) * multiplier / 16777216);
      out[o + 3] = 255;
    }
  }
  return {data: out, width: w, height: h};
}

// decode.load_rgb(path, min_side): a JPEG at least twice the size the resize needs is
// decoded by libjpeg at 1/2, 1/4 or 1/8 scale (Pillow's draft); the scale it picks.
function jpegDraftScale(width, height, minSide) {
  const f = Math.min(width, height) / minSide;
  const ratio = Math.min(Math.floor(width / Math.ceil(width / f)),
                         Math.floor(height / Math.ceil(height / f)));
  return [8, 4, 2, 1].find(s => ratio >= s) || 1;
}

// A photo still twice the size the resize needs (not a JPEG, whose decode took care of that:
// app.js) is reduced by a whole factor first, as Python does (Image.reduce).
function shrinkLikePillow(img, minSide) {
  const factor = Math.floor(Math.min(img.width, img.height) / minSide);
  return factor >= 2 ? boxReduce(img, factor) : img;
}

// RGBA pixels of the decoded photo -> float32 (1, 3, size, size), as decode.eval_array.
function evalTensorData(img, pre) {
  img = shrinkLikePillow(img, evalSide(pre));
  const size = pre.size, short = evalSide(pre);
  const scale = short / Math.min(img.width, img.height);
  const newW = Math.max(size, pyRound(img.width * scale));
  const newH = Math.max(size, pyRound(img.height * scale));
  const filter = FILTERS[scale > 1 ? (pre.upscale || 'bicubic') : 'bicubic'];
  const left = Math.floor((newW - size) / 2), top = Math.floor((newH - size) / 2);
  const rgba = resizeAndCropPillow(img, newW, newH, left, top, size, filter);
  return normalize(rgba, size, pre.mean, pre.std);
}

// float32 arithmetic step by step, as numpy does it: (pixel * (1/255) - mean) / std.
function normalize(rgba, size, mean, std) {
  const plane = size * size, out = new Float32Array(3 * plane);
  const inv255 = Math.fround(1 / 255);
  for (let c = 0; c < 3; c++) {
    const m = Math.fround(mean[c]), s = Math.fround(std[c]);
    for (let i = 0; i < plane; i++) {
      out[c * plane + i] = Math.fround(Math.fround(rgba[i * 4 + c] * inv255) - m) / s;
    }
  }
  return out;
}

function isJpegBytes(head) {
  return head.length >= 3 && head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff;
}
