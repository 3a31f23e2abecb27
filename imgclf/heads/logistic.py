"""The logistic-regression head's fit: a multinomial logistic regression on stored feature
rows by full-batch L-BFGS (fit_logistic), the standardisation it runs on (Standardizer), and
the fitted head on raw features (Head). linear_probe.py chooses its C and views."""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .views import ViewSet

# Folds of the cross-validation (linear_probe.py) that chooses a head's C and views.
FOLDS = 5
# Values per chunk of a pass over the rows (the chunk's float32 rows or its logits, whichever is
# wider): 64 MB, so a pass's memory does not grow with the rows.
CHUNK_VALUES = 1 << 24
# L-BFGS stops once every entry of the objective's gradient is below this: the final head's
# fit and the fits whose scores decide the choice (refine).
TOLERANCE = 1e-4


@dataclass
class Head:
    """A fitted head on raw features: logits = features @ weight.T + bias, averaged over
    view_set.test; plus what the choice found (its held-out loss and accuracy, and on what)."""
    weight: torch.Tensor
    bias: torch.Tensor
    view_set: ViewSet
    c: float
    cv_loss: float = float("nan")
    cv_acc: float = float("nan")
    held_out: str = f"{FOLDS} folds of train+valid"
    # (photos, classes) float32: each photo's logits from the fold fit that held it out, at
    # the chosen view set and C (None where the choice was made on a held-out set, or with
    # class weights): what the search for label errors (data_issues.py) and the unknown
    # verdict (novelty.py) need, fitted once (held_out_logits() below).
    held_out_logits: np.ndarray = None
    # the fold heads' mean logit_spread over all photos (linear_probe.out_of_fold_fits' scale)
    held_out_spread: float = float("nan")

    def logits(self, photos, device=None):
        """Logits (photos, classes) of photos (photos, views, dim), averaged over the
        prediction views; computed a chunk of photos at a time, on device if given."""
        photos = torch.as_tensor(photos)
        device = device or self.weight.device
        weight, bias = self.weight.to(device), self.bias.to(device)
        out = torch.empty(len(photos), len(bias), device=device)
        step = chunk_rows(len(bias), photos.shape[-1])
        for start in range(0, len(photos), step):
            part = photos[start:start + step].to(device=device, dtype=torch.float32)
            out[start:start + step] = torch.stack([part[:, v] @ weight.T + bias
                                                   for v in self.view_set.test]).mean(0)
        return out


def chunk_rows(num_classes, width):
    """Rows per chunk of a pass, so that neither its rows nor its logits pass CHUNK_VALUES."""
    return max(256, CHUNK_VALUES // max(num_classes, width))


class Standardizer:
    """Per-feature mean and scale of the rows a head trains on. The floor on the scale (a
    thousandth of the largest) keeps near-constant features, which some augmented views have,
    from being blown up. Rows other than float32, or more than chunk of them, are summed a
    chunk at a time (in float64; float32 within a chunk where not exact), never copied whole."""

    def __init__(self, rows, chunk=None, exact=True):
        if rows.dtype == torch.float32 and (chunk is None or len(rows) <= chunk):
            self.mean, std = rows.mean(0), rows.std(0)
        else:
            self.mean, std = chunked_moments(rows, chunk or len(rows), exact)
        self.scale = std + 1e-3 * std.max() + 1e-12

    def __call__(self, rows):
        return (rows - self.mean) / self.scale

    @classmethod
    def streamed(cls, rows, num_classes, device=None, exact=True):
        """The scaler of rows that fit_logistic reads a chunk at a time (float16 as stored, say):
        summed in the chunks of its passes, on device (the rows' by default)."""
        return cls(rows, chunk_rows(num_classes, rows.shape[1]), exact).to(device or rows.device)

    def to(self, device):
        self.mean, self.scale = self.mean.to(device), self.scale.to(device)
        return self

    def unscaled(self, weight, bias):
        """The same head on raw features: W (x - m) / s + b = (W / s) x + (b - W m / s)."""
        weight = weight / self.scale
        return weight, bias - weight @ self.mean


def chunked_moments(rows, chunk, exact=True):
    """(mean, standard deviation) of each column of rows, float32, summed in float64 a chunk
    of rows at a time around the first chunk's mean (no cancellation of large offsets). Not
    exact: each chunk summed in float32 first, 4x faster on float16 rows and the same to 5e-7,
    for the label-error search's fits; the head's keep float64, as its choice of C moved with
    such differences (docs/scaling.md, "Tried and left out")."""
    dtype = torch.float64 if exact else torch.float32
    centre = rows[:chunk].to(dtype).mean(0)
    shift = centre.double()
    total = torch.zeros_like(shift)
    squares = torch.zeros_like(shift)
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk].to(dtype) - centre
        total += part.sum(0).double()
        squares += part.pow(2).sum(0).double()
    n = len(rows)
    mean = total / n
    var = (squares - n * mean.pow(2)) / max(n - 1, 1)
    return (mean + shift).float(), var.clamp(min=0).sqrt().float()


def fit_logistic(x, y, num_classes, c, sample_weight=None, init=None, max_iter=500,
                 scaler=None, device=None, tolerance=TOLERANCE, solver="torch"):
    """Weights (classes, features) and bias minimising the sample-weighted mean cross-entropy
    plus |W|^2 / (2 C n), n the summed weights: scikit-learn's objective divided by C n, the
    same optimum with gradients of a size L-BFGS handles well. init warm-starts from an earlier
    (weight, bias); rows of weight 0 take no part (held-out folds). Both solvers stop once every
    entry of the gradient is below tolerance: "torch" (torch.optim.LBFGS) or "scipy" (scipy's
    L-BFGS-B, as scikit-learn runs it: lbfgs_scipy).

    With scaler, x is raw (float16 as stored, say) and the fit is the one on scaler(x): the
    scaling is folded into each pass, and the weights returned are those of the standardised
    rows. Each pass reads x a chunk of rows at a time (as float32, on device: x's own by
    default), so its memory does not grow with the rows."""
    device = torch.device(device) if device is not None else x.device
    w = torch.ones(len(y)) if sample_weight is None else sample_weight
    n = float(w.sum())
    w, y = (w / n).to(device), y.to(device)
    l2 = 1.0 / (2.0 * c * n)
    weight = torch.zeros(num_classes, x.shape[1]) if init is None else init[0].clone()
    bias = torch.zeros(num_classes) if init is None else init[1].clone()
    weight = weight.to(device).requires_grad_(True)
    bias = bias.to(device).requires_grad_(True)
    step = chunk_rows(num_classes, x.shape[1])

    def closure():
        weight.grad, bias.grad = None, None
        loss = 0.0
        for start in range(0, len(y), step):
            stop = start + step
            rows = x[start:stop].to(device=device, dtype=torch.float32)
            weight_x, bias_x = (weight, bias) if scaler is None else \
                scaler.unscaled(weight, bias)
            ce = F.cross_entropy(torch.addmm(bias_x, rows, weight_x.T), y[start:stop],
                                 reduction="none")
            part = (w[start:stop] * ce).sum()
            part.backward()  # the chunk's graph goes now: memory of one chunk at a time
            loss = loss + part.detach()
        penalty = l2 * weight.pow(2).sum()
        penalty.backward()
        return loss + penalty.detach()

    with torch.enable_grad():
        if solver == "scipy":
            lbfgs_scipy([weight, bias], closure, max_iter, tolerance)
        else:
            optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter,
                                          history_size=10, tolerance_grad=tolerance,
                                          tolerance_change=1e-9, line_search_fn="strong_wolfe")
            optimizer.step(closure)
    return weight.detach(), bias.detach()


def lbfgs_scipy(params, closure, max_iter, tolerance):
    """Minimise closure() (it fills the params' .grad) over params in place by scipy's L-BFGS-B
    with scikit-learn's settings (LogisticRegression(solver="lbfgs")). Its first step has unit
    length where torch.optim.LBFGS's is 1 / |gradient|_1, hundreds of times shorter with 10^5
    weights, which its line search then spends passes over the rows to lengthen: 7 passes
    against 13 for a cold fit on 54,000 x 1,280 rows of 100 classes (docs/scaling.md). The
    label-error search's fold fits at 20,000 photos and more use it (linear_probe.search_fits)."""
    import scipy.optimize  # here: predicting never fits, and scipy costs its import time

    def value_and_gradient(theta):
        copy_into(params, theta)
        loss = float(closure())
        return loss, torch.cat([p.grad.reshape(-1) for p in params]).double().cpu().numpy()

    theta = torch.cat([p.detach().reshape(-1) for p in params]).double().cpu().numpy()
    result = scipy.optimize.minimize(
        value_and_gradient, theta, jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter, "maxls": 50, "gtol": tolerance,
                 "ftol": 64 * np.finfo(float).eps})
    copy_into(params, result.x)  # the last point evaluated may be a line search's trial


def copy_into(params, theta):
    """Copy the flat float64 array theta into params (in order), in their dtype and device."""
    start = 0
    with torch.no_grad():
        for p in params:
            p.copy_(torch.from_numpy(theta[start:start + p.numel()]).view_as(p))
            start += p.numel()
