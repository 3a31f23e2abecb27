"""The default mode: a frozen backbone passes every image through once, its features are
stored (features.py), and the head is fitted on them (linear_probe.py, or epochs of AdamW)."""
import contextlib
import copy
import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..analysis import calibration, data_issues
from ..heads import linear_probe, novelty
from ..models import classifier
from ..utils.progress import Progress
from ..utils.stopping import StopSignals
from ..utils.text import plural
from . import features
from .epoch_loop import (
    Result,
    class_weights,
    cosine_lr,
    make_criterion,
    run_epochs,
    seed_everything,
)
from .train_config import HEAD_EPOCHS, HEAD_MIN_STEPS


# ---------------------------------------------------------------------------------------------
# Default mode: frozen backbone, stored features
# ---------------------------------------------------------------------------------------------
class FeatureTrainer:
    verbose = True
    finds_data_issues = True  # data_issues.py, from the stored features, once the head is fitted
    fits_open_set = True  # calibration and the unknown verdict's data, once the head is fitted
    splits = ("train", "valid", "test")  # the splits whose features are computed and scored

    def __init__(self, config, scan, model, preprocess, job, cache_dir=None, resume=None):
        self.config, self.scan, self.model, self.preprocess = config, scan, model, preprocess
        self.job, self.device, self.cache_dir, self.resume = job, job.device, cache_dir, resume

    def fit(self):
        if self.config.head == "logistic" and not self.logistic_fits_in_memory():
            self.config = dataclasses.replace(
                self.config, head="adamw",
                aug_views=1 if self.config.aug_views is None else self.config.aug_views)
        if self.config.head == "logistic":
            return self.fit_logistic()
        return self.fit_by_epochs()

    def logistic_fits_in_memory(self):
        """Whether the logistic head's fit (its train+valid features in memory) fits in the
        memory available; if not, it says so in one line and the run takes the epoch head,
        which reads the features from disk. Rank 0's answer holds for all ranks."""
        photos = sum(len(self.scan.samples.get(s, ())) for s in ("train", "valid"))
        views = 2 + (self.config.aug_views or 0)
        need = linear_probe.fit_memory(photos, views, self.model.head[-1].in_features,
                                       len(self.scan.classes))
        have = linear_probe.available_memory()
        if self.job.agree(need <= have):
            return True
        if self.verbose and self.job.is_main:
            print(f"head: the logistic head needs about {need / 2**30:.1f} GiB for its "
                  f"{photos} photos' features, {have / 2**30:.1f} GiB is available: training "
                  f"the epoch head (--head adamw) instead, which reads them from disk")
        return False

    def fit_logistic(self):
        """The logistic-regression head (linear_probe.py): features of the plain, mirrored
        and, for small data sets, augmented views; cross-validation over the fitting photos
        chooses C and the views; the head is fitted on them all. The test split's features come
        after the choice: its mirror images only when the head averages them in."""
        stored = self.logistic_features()
        head = None
        if self.job.is_main:  # the head is fitted on rank 0 alone
            started = time.monotonic()
            head, scores = self.logistic_head(stored, ("train", "valid"))
            if self.verbose:
                print(linear_probe.choice_line(head, scores, time.monotonic() - started))
        test = self.test_features(head)
        if not self.job.is_main:
            return None
        result = Result()
        result.metrics["cv_acc"] = head.cv_acc
        if test is not None:
            stored = {**stored, "test": test}
        if self.finds_data_issues:
            # fits only where the cross-validation kept no held-out logits
            with head_threads(stored["train"][0], len(self.scan.classes)):
                result.data_issues = data_issues.find_issues(
                    stored, self.scan, head, self.config.seed, fit_features=self.joined,
                    device=self.device)
        if self.fits_open_set:
            head = self.open_set(head, stored, result)
        self.joined = None  # the run's largest array, not needed past here
        if "test" in stored:
            logits = head.logits(stored["test"][0])
            correct = logits.argmax(1).numpy() == stored["test"][1]
            result.metrics["test_acc"] = float(correct.mean())
            result.test_probs = torch.softmax(logits, 1).numpy()
            if result.novelty is not None:
                result.test_novelty = novelty.NoveltyScorer(result.novelty)(
                    novelty.photo_features(stored["test"][0], head.view_set.test),
                    logits).numpy()
        self.install(head)
        return result

    def open_set(self, head, stored, result):
        """Calibration and the unknown verdict, from out-of-fold logits of train+valid (the
        cross-validation's, where it kept them; else k more fits, made once for this and the
        search for label errors): the
        head divided by the temperature of their lowest log loss times how much larger the
        head's logits are than the fold heads' (the fold heads see fewer photos:
        calibration.fit_temperature, docs/open_set.md), and the novelty's bank, references and
        threshold (novelty.fit) in result.novelty. Returns the head as it now predicts."""
        started = time.monotonic()
        labels = np.concatenate([stored[s][1] for s in ("train", "valid")])
        with head_threads(self.joined, len(self.scan.classes)):  # where there is no CV's
            held_out, scale = linear_probe.held_out_fits(
                self.joined, labels, len(self.scan.classes), head, self.config.seed,
                device=self.device)
        temperature, before, after = calibration.fit_temperature(held_out.numpy(), labels, scale)
        head = dataclasses.replace(head, weight=head.weight / temperature,
                                   bias=head.bias / temperature)
        # the novelty's references: the held-out logits at their own temperature
        result.novelty = novelty.fit(self.joined, labels, head.view_set.test,
                                     held_out * (scale / temperature), self.config.seed)
        result.metrics.update(temperature=temperature, held_out_ece=after,
                              unknown_threshold=result.novelty["threshold"])
        if self.verbose:
            scaled = (f"temperature {temperature:.2f} (held-out calibration error "
                      f"{100 * before:.1f}% -> {100 * after:.1f}% at {temperature / scale:.2f}; the "
                      f"head's logits are {scale:.2f}x the fold heads')")
            print(f"calibration: {scaled}; unknown verdict: threshold "
                  f"{result.novelty['threshold']:.2f} keeps {100 * novelty.KEEP:.0f}% of the "
                  f"held-out known photos  [{time.monotonic() - started:.1f}s]")
        return head

    def valid_loss_of_train_fit(self):
        """The valid loss of the logistic head fitted on the train split alone, as fine-tuning
        is: the bar --finetune must beat (None in other processes than rank 0)."""
        stored = self.logistic_features()
        if not self.job.is_main:
            return None
        head, _ = self.logistic_head(stored, ("train",))
        x, labels = stored["valid"]
        return F.cross_entropy(head.logits(x), torch.from_numpy(labels)).item()

    def logistic_features(self):
        """{split: (features (photos, views, dim), labels)} of train and valid, with the views the
        head may train on (augmented ones where --aug_views asks for them)."""
        aug = self.config.aug_views or 0
        return {split: self.photo_features(self.frozen_backbone(), split, aug)
                for split in ("train", "valid")}

    def test_features(self, head):
        """(features, labels) of the test split with the views the head predicts from (its
        mirror image only when the head averages it in), or None where it is not scored. In
        every process: rank 0's head decides."""
        if "test" not in self.splits or "test" not in self.scan.samples:
            return None
        self.job.wait_for_main("rank 0's choice of head")
        mirror = self.job.agree(head is not None and 1 in head.view_set.test)
        return self.photo_features(self.frozen_backbone(), "test", 0, mirror)

    def frozen_backbone(self):
        return classifier.freeze(self.model.backbone).eval()

    def logistic_head(self, stored, fit_splits):
        """The head fitted on fit_splits, its C and views chosen on held-out photos of them
        (linear_probe.choose_and_fit: the valid split when it is one of them and large
        enough); and the scores of the choice. The fits run on the run's device. The splits'
        features are joined into self.joined, of which stored's become views."""
        x = self.joined = torch.cat([stored[s][0] for s in fit_splits])
        y = np.concatenate([stored[s][1] for s in fit_splits])
        start = 0
        for split in fit_splits:  # the splits become views of the joined rows: held once
            count = len(stored[split][1])
            stored[split] = (x[start:start + count], stored[split][1])
            start += count
        valid = len(stored["valid"][1]) if fit_splits[-1] == "valid" else 0
        view_sets = linear_probe.candidates(x.shape[1], self.config.always_augment)
        weight = class_weights(y, len(self.scan.classes)) if self.config.balance else None
        threads = head_threads(x, len(self.scan.classes))
        progress = LateProgress("fitting the head")
        # A stop signal ends the fit wherever it is: nothing is written until it is done.
        with StopSignals(), threads:
            head, scores = linear_probe.choose_and_fit(
                x, y, len(self.scan.classes), view_sets, self.config.seed, class_weight=weight,
                valid=valid, device=self.device, on_fit=progress.update)
        progress.close()
        return head, scores

    def photo_features(self, backbone, split, aug, mirror=True):
        """(features (photos, views, dim) float16, labels (photos,)) of one split: the plain
        view, with mirror the mirror image, then aug augmented views of each photo."""
        rows, labels = features.cached_features(backbone, split, aug, self.config, self.scan,
                                                self.preprocess, self.job, self.cache_dir,
                                                mirror=mirror)
        if rows is None:  # another rank's: rank 0 reads the store
            return None, None
        per_photo = 1 + mirror + aug
        # float16 as stored: half the memory, and the head computes in float32 a chunk at a
        # time (linear_probe.fit_logistic), so nothing is lost.
        x = torch.from_numpy(np.asarray(rows[:len(labels)]))
        return x.reshape(-1, per_photo, x.shape[-1]), labels[::per_photo]

    def install(self, head):
        """Write the fitted head into the model's last Linear layer; the model predicts as
        the head was chosen to (averaging the mirror image in, or not)."""
        linear = self.model.head[-1]
        with torch.no_grad():
            linear.weight.copy_(head.weight)
            linear.bias.copy_(head.bias)
        self.model.flip_tta = 1 in head.view_set.test

    def fit_by_epochs(self):
        """The head trained by AdamW epochs (run_epochs), early-stopped on the valid split."""
        backbone = classifier.freeze(self.model.backbone).eval()
        stored = {split: features.cached_features(
                      backbone, split, self.config.aug_views if split == "train" else 0,
                      self.config, self.scan, self.preprocess, self.job, self.cache_dir)
                  for split in self.scan.samples if split in self.splits}
        if not self.job.is_main:
            # The head trains in seconds: on rank 0 alone, faster than DDP (docs/scaling.md);
            # the other ranks' work ends with their share of features.
            return None
        train, valid = stored["train"], stored["valid"]
        with StopSignals() as signals, single_thread():
            signals.defer()
            if self.resume:
                views = self.resume["views_used"]  # filled in and checked by load_resume
            else:
                views = self.choose_views(train, valid)
            head, result = self.train_head(self.model.head, views, train, valid, self.verbose,
                                           signals, self.resume)
        result.train_state["views_used"] = views
        if self.finds_data_issues and not result.interrupted:
            with single_thread():
                result.data_issues = data_issues.find_issues_in_rows(
                    stored, {"train": self.config.aug_views}, self.scan, self.config.seed)
        head.eval()
        _, result.metrics["valid_acc"] = evaluate_rows(head, *valid, self.device)
        if "test" in stored:
            _, result.metrics["test_acc"], result.test_probs = evaluate_rows(
                head, *stored["test"], self.device, keep_probs=True)
        self.model.head = head.cpu()
        if self.fits_open_set and not result.interrupted:
            self.epoch_head_novelty(stored, result)
        return result

    def epoch_head_novelty(self, stored, result):
        """The unknown verdict of the epoch head (self.model.head): no out-of-fold fits, so the
        references and threshold come from the valid split, which it was not fitted on
        (novelty.fit_on_held_out), and the bank from the train split's plain views (a
        stratified sample of novelty.BANK_MAX at most, read from the store)."""
        started = time.monotonic()
        rows, labels = stored["train"]
        plain = view_rows(len(labels), self.config.aug_views or 0, 0)
        plain = plain[novelty.bank_photos(labels[plain], novelty.BANK_MAX, self.config.seed)]
        valid_rows, valid_labels = stored["valid"]
        valid_x = torch.from_numpy(np.asarray(valid_rows[:len(valid_labels)])).float()
        with torch.no_grad():
            valid_logits = self.model.head(valid_x)
        result.novelty = novelty.fit_on_held_out(np.asarray(rows[plain]), labels[plain],
                                                 valid_x, valid_logits, self.config.seed)
        result.metrics["unknown_threshold"] = result.novelty["threshold"]
        if "test" in stored:
            result.test_novelty = rows_novelty(novelty.NoveltyScorer(result.novelty),
                                               self.model.head, stored["test"][0])
        if self.verbose:
            print(f"unknown verdict: threshold {result.novelty['threshold']:.2f} keeps "
                  f"{100 * novelty.KEEP:.0f}% of the valid photos  "
                  f"[{time.monotonic() - started:.1f}s]")

    def choose_views(self, train, valid):
        """How many stored augmented views the head trains on: all of them, or none when a head
        (a copy of the untrained one) on the plain views alone reaches a lower valid loss.
        Measured, the views changed nothing beyond noise on flowers5 and cost handwritten digits
        test accuracy (a flipped or cropped digit is another digit); the heads train in seconds,
        so both are tried."""
        stored = self.config.aug_views
        if not stored or self.config.always_augment:
            return stored
        losses = {}
        for views in (0, stored):
            _, result = self.train_head(copy.deepcopy(self.model.head), views, train, valid,
                                        verbose=False)
            losses[views] = min(h["valid_loss"] for h in result.history)
        chosen = min(losses, key=losses.get)  # a tie keeps the plain views
        if self.verbose:
            other = stored - chosen
            print(f"head inputs: {views_label(chosen)} (best valid loss {losses[chosen]:.3f}; "
                  f"{views_label(other)} {losses[other]:.3f})")
        return chosen

    def train_head(self, head, views, train, valid, verbose, signals=None, resume=None):
        """Fit the head on the plain view and the first `views` augmented views of each
        training image; returns the best epoch's head and the Result."""
        mode = HeadEpochs(self.config, head, views, train, valid, len(self.scan.classes),
                          self.device)
        result = run_epochs(mode, mode.epochs, self.config.patience, signals, resume, verbose)
        return mode.module, result


class HeadEpochs:
    """The head on stored features, as a mode of run_epochs."""
    state_key, probe_is_epoch_0 = "head", False

    def __init__(self, config, head, views, train, valid, num_classes, device):
        self.config, self.train, self.valid, self.device = config, train, valid, device
        self.rows = view_rows(len(train[1]), config.aug_views, views)
        # Extraction draws random numbers only when it runs (not when cached), and choosing
        # the views trains heads before this one: re-seed, so that the head trains the same
        # whatever came before.
        seed_everything(config.seed)
        self.module = head.to(device)
        self.criterion = make_criterion(config, train[1], num_classes, device)
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.steps_per_epoch = math.ceil(len(self.rows) / config.batch_size)
        self.epochs = config.epochs or head_epochs(self.steps_per_epoch)

    def train_epoch(self, epoch, signals):
        """One pass over the training rows in a fresh order; the mean loss."""
        order = torch.randperm(len(self.rows), generator=self.generator).numpy()
        rows, (train_x, train_y) = self.rows[order], self.train
        batch_size, total_loss = self.config.batch_size, 0.0
        total_steps = self.steps_per_epoch * self.epochs
        head = self.module.train()
        for i, start in enumerate(range(0, len(rows), batch_size)):
            idx = np.sort(rows[start:start + batch_size])  # sorted reads from the memory map
            x = torch.from_numpy(np.asarray(train_x[idx])).float().to(self.device)
            y = torch.from_numpy(np.asarray(train_y[idx])).long().to(self.device)
            for group in self.optimizer.param_groups:
                group["lr"] = cosine_lr(epoch * self.steps_per_epoch + i, total_steps,
                                        self.config.learning_rate, self.steps_per_epoch)
            loss = self.criterion(head(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.item() * len(idx)
        head.eval()
        return total_loss / len(rows)

    def evaluate(self):
        return evaluate_rows(self.module, *self.valid, self.device)

    def stop_requested(self, signals):
        return bool(signals.signum)


def head_epochs(steps_per_epoch):
    return max(HEAD_EPOCHS, math.ceil(HEAD_MIN_STEPS / steps_per_epoch))


def view_rows(images_rows, stored_views, views):
    """Indices of the stored training rows that hold the plain view and the first `views`
    augmented views of each image (rows are stored image by image: plain view, then views)."""
    per_image = 1 + stored_views
    return np.flatnonzero(np.arange(images_rows) % per_image <= views)


def views_label(views):
    return f"plain + {plural(views, 'augmented view')}" if views else "plain views"


def evaluate_rows(head, features, labels, device, chunk=1024, keep_probs=False):
    """Loss and accuracy of the head over stored features, read a chunk at a time so memory
    does not grow with the data; with keep_probs, also the probabilities (rows, classes)."""
    head.eval()
    total_loss, correct, probs = 0.0, 0, []
    with torch.no_grad():
        for start in range(0, len(labels), chunk):
            x = torch.from_numpy(features[start:start + chunk]).float().to(device)
            y = torch.from_numpy(np.asarray(labels[start:start + chunk])).long().to(device)
            logits = head(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            if keep_probs:
                probs.append(torch.softmax(logits, 1).cpu().numpy())
    loss, acc = total_loss / len(labels), correct / len(labels)
    return (loss, acc, np.concatenate(probs)) if keep_probs else (loss, acc)


def rows_novelty(scorer, head, rows, chunk=1024):
    """The novelty (rows,) of stored feature rows (one per photo) under head, a chunk at a
    time."""
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), chunk):
            x = torch.from_numpy(np.asarray(rows[start:start + chunk])).float()
            out.append(scorer(x, head(x)).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


class LateProgress:
    """A progress bar over a count of steps that shows itself only once they have taken
    more than `after` seconds (a fit of seconds prints nothing); on_step(total) per step."""

    def __init__(self, desc, after=3.0):
        self.desc, self.after, self.bar, self.done = desc, after, None, 0
        self.start = time.monotonic()

    def update(self, total):
        self.done += 1
        if self.bar is None and time.monotonic() - self.start > self.after:
            self.bar = Progress(total, self.desc)
            self.bar.start = self.start
        if self.bar is not None:
            self.bar.update(self.done - self.bar.done)

    def close(self):
        if self.bar is not None:
            self.bar.total = self.bar.done  # a path that stopped early did fewer steps
            self.bar.close()


def head_threads(features, num_classes):
    """The threads of the logistic head's fits: one for small products (as single_thread), the
    process's where features x classes pass linear_probe.MULTITHREAD_VALUES."""
    if features.numel() * num_classes < linear_probe.MULTITHREAD_VALUES:
        return single_thread()
    return contextlib.nullcontext()


@contextlib.contextmanager
def single_thread():
    """Head batches are tiny matrix products: one thread runs them 4x faster than two on a
    busy 2-core CPU (measured), where threads mostly wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
