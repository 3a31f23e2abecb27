"""Training: the settings of a run (TrainConfig), the one epoch loop (run_epochs) and the two
modes that plug into it.

run_epochs owns what every epoch does alike: the per-epoch history, the epoch line, early
stopping, stop signals, the state that --resume continues from, and the best weights. A mode
supplies what differs: how to train one epoch and how to evaluate.
- FeatureTrainer (the default): a frozen backbone passes every image through once, its features
  are stored on disk (features.py), and the head is fitted on them: by default a logistic
  regression whose settings are chosen on held-out photos (linear_probe.py, no epochs); with
  --head adamw (hidden layers need it, and data sets too large for memory fall back to it)
  epochs of AdamW.
- FinetuneTrainer (--finetune): a linear probe first (a FeatureTrainer), then the backbone's
  last stages and the head train together on images augmented on the fly.
"""
import contextlib
import copy
import dataclasses
import math
import random
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import data_issues
import data_utils
import features
import linear_probe
import model_utils
from stopping import StopSignals

# The head's schedule over stored features: at least HEAD_EPOCHS epochs and HEAD_MIN_STEPS
# optimizer steps, so that a small data set is not left underfit (measured on handwritten
# digits, 1258 photos: 600 steps 84-86% test accuracy, 3000 steps 91-93%; on flowers5 the
# extra steps change nothing, early stopping ends the run). Steps cost milliseconds.
HEAD_EPOCHS = 30
HEAD_MIN_STEPS = 3000
HEAD_LR = 3e-3
FINETUNE_LR = 1e-3
FINETUNE_EPOCHS = 5


@dataclass
class TrainConfig:
    """The settings of a run, every default decided: train.py's options resolved once by
    from_options(); the trainers read nothing else. The defaults are the command line's."""
    data_dir: str = None
    demo: bool = False
    check: bool = False
    split: list = field(default_factory=lambda: [0.7, 0.1, 0.2])
    category_names: str = None
    workers: int = None  # None: features.default_workers
    cache_dir: str = None  # None: SAVE_DIR/cache
    exclude: str = None  # a file of paths left out of every split
    arch: str = model_utils.DEFAULT_ARCH
    hidden_units: list = field(default_factory=lambda: [0])
    dropout: float = 0.2
    weights: str = None
    image_size: int = None  # None: the backbone's own
    epochs: int = None  # None over stored features: head_epochs() decides
    learning_rate: float = HEAD_LR  # this mode's peak rate
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    batch_size: int = 64
    # "logistic" (linear_probe.py) or "adamw" (epochs; heads with hidden layers need it)
    head: str = "logistic"
    # None: the head's own default, none for the logistic head, 1 for adamw
    aug_views: int = None
    always_augment: bool = False
    finetune: bool = False
    patience: int = 10
    balance: bool = False
    resume: str = None
    seed: int = 0
    save_dir: str = "."
    gpu: str = None
    # The head's rate over stored features: --learning_rate, else HEAD_LR (also with
    # --finetune, for its linear probe).
    head_learning_rate: float = HEAD_LR

    @classmethod
    def from_options(cls, options):
        """The config of train.py's parsed options (checked by train.check_options): an
        option left out (None) takes the default here. Options of epoch training, typed
        without --head or --finetune, select the epoch head: they would change nothing in the
        logistic head."""
        given = {f.name: getattr(options, f.name) for f in dataclasses.fields(cls)
                 if getattr(options, f.name, None) is not None}
        config = cls(**given)
        rate = options.learning_rate
        head = options.head or ("adamw" if has_hidden_layers(options.hidden_units) or
                                epoch_options_choosing_the_head(options) else "logistic")
        return dataclasses.replace(
            config, head=head, head_learning_rate=rate or HEAD_LR,
            learning_rate=rate or (FINETUNE_LR if options.finetune else HEAD_LR),
            epochs=options.epochs or (FINETUNE_EPOCHS if options.finetune else None),
            aug_views=options.aug_views if options.aug_views is not None
            else 1 if head == "adamw"
            # --always_augment asks for augmented views, which are stored only on request
            else linear_probe.AUG_VIEWS if options.always_augment else None)

    def probe(self):
        """The settings of --finetune's linear probe: the AdamW head on stored plain views of
        the train split (the valid split stays held out for fine-tuning's early stopping).
        Fine-tuning starts from it: the logistic head's weights, fitted on standardised
        features, gave logits on augmented photos that wrecked the first fine-tuning steps
        (train loss 6.7 on digits, 10 photos a class)."""
        return dataclasses.replace(self, head="adamw", aug_views=0, epochs=None,
                                   finetune=False, learning_rate=self.head_learning_rate)

    def frozen(self):
        """The settings of the default mode, which --finetune falls back to where fine-tuning
        does not beat the default head's valid loss."""
        return dataclasses.replace(self, epochs=None, finetune=False,
                                   learning_rate=self.head_learning_rate)


def has_hidden_layers(hidden_units):
    return any(units > 0 for units in hidden_units)


# The options that only training by epochs reads (the epoch head, --finetune); the logistic
# head is fitted without them.
EPOCH_OPTIONS = ("epochs", "learning_rate", "batch_size", "dropout", "weight_decay",
                 "label_smoothing", "patience")


def epoch_options(options):
    """The options of epoch training typed on the command line (parsed as None when not), as
    flags: ["--epochs", ...]."""
    return [f"--{name}" for name in EPOCH_OPTIONS if getattr(options, name) is not None]


def epoch_options_choosing_the_head(options):
    """The typed options of epoch training where they alone make the head train by epochs:
    no --head, --finetune (which reads them itself) or hidden layers; else []."""
    if options.head or options.finetune or has_hidden_layers(options.hidden_units):
        return []
    return epoch_options(options)


# ---------------------------------------------------------------------------------------------
# The epoch loop
# ---------------------------------------------------------------------------------------------
class Result:
    def __init__(self):
        self.history, self.metrics = [], {}
        self.epoch, self.best_epoch, self.best_loss, self.interrupted = 0, 0, math.inf, 0
        self.train_state = None
        self.test_probs = None  # numpy (test images, classes), in scan order
        self.data_issues = None  # data_issues.Findings, where the run looked for them


def run_epochs(mode, epochs, patience, signals=None, resume=None, verbose=True):
    """Train mode for epochs (from --resume's state, if given) and leave its module with the
    best epoch's weights; returns the Result, with the state to resume from.

    mode supplies: module (the weights early stopping keeps) and state_key, its name in the
    resume state; optimizer; generator (its random stream is saved); train_epoch(epoch,
    signals) -> mean loss, or None where a stop signal cut the epoch short; evaluate() -> valid
    (loss, accuracy); stop_requested(signals); probe_is_epoch_0: the weights before training
    are a result of their own, with the valid loss epoch_0_loss(), that later epochs must beat
    (not on resume: the resume state holds the epochs to beat)."""
    result, stopper, start = Result(), EarlyStopping(patience), 0
    if resume:
        mode.module.load_state_dict(resume[mode.state_key])
        mode.optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"], mode.generator)
        stopper = EarlyStopping(patience, resume["early_stopping"])
        result.history = list(resume["history"])
        start = result.epoch = resume["epoch"]
    elif mode.probe_is_epoch_0:
        stopper.update(0, mode.epoch_0_loss(), mode.module.state_dict())
    for epoch in range(start, epochs):
        t0 = time.monotonic()
        train_loss = mode.train_epoch(epoch, signals)
        if train_loss is None:  # an epoch cut short is not kept: resume repeats it
            result.interrupted = signals.exit_status or 128 + signal.SIGTERM
            break
        valid_loss, valid_acc = mode.evaluate()
        seconds = time.monotonic() - t0
        # The rate at the epoch's end; with --finetune the head's
        result.history.append(dict(epoch=epoch + 1, train_loss=train_loss,
                                   valid_loss=valid_loss, valid_acc=valid_acc,
                                   learning_rate=mode.optimizer.param_groups[-1]["lr"],
                                   seconds=seconds))
        if verbose:
            print(epoch_line(epoch + 1, epochs, train_loss, valid_loss, valid_acc, seconds),
                  flush=True)
        stop = stopper.update(epoch + 1, valid_loss, mode.module.state_dict())
        result.epoch = epoch + 1
        if stop:
            if verbose:
                print(f"early stop: valid loss has not improved for {patience} epochs; "
                      f"keeping epoch {stopper.best_epoch}")
            break
        if signals and epoch + 1 < epochs and mode.stop_requested(signals):
            result.interrupted = signals.exit_status or 128 + signal.SIGTERM
            break
    result.train_state = {mode.state_key: {k: v.clone() for k, v in
                                           mode.module.state_dict().items()},
                          "optimizer": mode.optimizer.state_dict(),
                          "rng": rng_state(mode.generator), "early_stopping": stopper.state(),
                          "history": result.history, "epoch": result.epoch}
    if stopper.best_weights is not None:
        mode.module.load_state_dict(stopper.best_weights)
    result.best_epoch, result.best_loss = stopper.best_epoch, stopper.best_loss
    return result


def epoch_line(epoch, epochs, train_loss, valid_loss, valid_acc, seconds):
    return (f"epoch {epoch}/{epochs}  train loss {train_loss:.3f}  valid loss {valid_loss:.3f}  "
            f"valid acc {100 * valid_acc:.1f}%  {seconds:.1f}s")


class EarlyStopping:
    """Keeps the best epoch (lowest valid loss) and says when patience has run out."""

    def __init__(self, patience, state=None):
        self.patience = patience
        self.best_loss, self.best_epoch, self.bad_epochs, self.best_weights = math.inf, 0, 0, None
        if state:
            self.__dict__.update(state)

    def update(self, epoch, valid_loss, weights):
        if valid_loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = valid_loss, epoch, 0
            self.best_weights = {k: v.detach().clone() for k, v in weights.items()}
        else:
            self.bad_epochs += 1
        return bool(self.patience) and self.bad_epochs >= self.patience

    def state(self):
        return dict(best_loss=self.best_loss, best_epoch=self.best_epoch,
                    bad_epochs=self.bad_epochs, best_weights=self.best_weights)


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state(generator):
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "generator": generator.get_state()}


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    generator.set_state(state["generator"])


def cosine_lr(step, total_steps, peak, warmup_steps):
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_criterion(config, labels, num_classes, device):
    """The loss: label smoothing, and with --balance weights of inverse class frequency."""
    weight = class_weights(labels, num_classes).to(device) if config.balance else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)


def class_weights(labels, num_classes):
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).float().clamp(min=1)
    return counts.sum() / (num_classes * counts)


# ---------------------------------------------------------------------------------------------
# Default mode: frozen backbone, stored features
# ---------------------------------------------------------------------------------------------
class FeatureTrainer:
    verbose = True
    finds_data_issues = True  # data_issues.py, from the stored features, once the head is fitted
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
            with head_threads(stored["train"][0], len(self.scan.classes)):  # k more fits
                result.data_issues = data_issues.find_issues(
                    stored, self.scan, head, self.config.seed, fit_features=self.joined,
                    device=self.device)
        self.joined = None  # the run's largest array, not needed past here
        if "test" in stored:
            logits = head.logits(stored["test"][0])
            correct = logits.argmax(1).numpy() == stored["test"][1]
            result.metrics["test_acc"] = float(correct.mean())
            result.test_probs = torch.softmax(logits, 1).numpy()
        self.install(head)
        return result

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
        return model_utils.freeze(self.model.backbone).eval()

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
        if rows is None:  # another rank's: rank 0 holds the joined file
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
        backbone = model_utils.freeze(self.model.backbone).eval()
        stored = {split: features.cached_features(
                      backbone, split, self.config.aug_views if split == "train" else 0,
                      self.config, self.scan, self.preprocess, self.job, self.cache_dir)
                  for split in self.scan.samples if split in self.splits}
        if not self.job.is_main:
            # The head trains in seconds: on rank 0 alone, measured faster than DDP (README,
            # "Scaling up"); the other ranks' work ends with their share of features.
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
        return result

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
    return f"plain + {views} augmented view{'s' if views > 1 else ''}" if views else "plain views"


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


class LateProgress:
    """A progress bar over a count of steps that shows itself only once they have taken
    more than `after` seconds (a fit of seconds prints nothing); on_step(total) per step."""

    def __init__(self, desc, after=3.0):
        self.desc, self.after, self.bar, self.done = desc, after, None, 0
        self.start = time.monotonic()

    def update(self, total):
        self.done += 1
        if self.bar is None and time.monotonic() - self.start > self.after:
            self.bar = data_utils.Progress(total, self.desc)
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


# ---------------------------------------------------------------------------------------------
# --finetune
# ---------------------------------------------------------------------------------------------
class FinetuneTrainer:
    """Linear probe first (the head on stored plain features, seconds), then the backbone's last
    stages and the head train together on augmented images. Starting from a trained head keeps
    the first fine-tuning steps from wrecking the pretrained features. A mode of run_epochs."""

    # Share of the backbone's weights, counted from the output end, that fine-tuning trains.
    TRAINABLE_FRACTION = 0.5
    # The backbone's learning rate over the head's. Measured on flowers5 (seed 0): at 0.1 the
    # train loss stayed above the valid loss (0.80 vs 0.68 after 5 epochs: underfitting);
    # at 1 the valid loss fell to 0.61 and test accuracy rose from 77.0% to 81.0%.
    BACKBONE_LR_SCALE = 1.0
    # The pretrained backbone is epoch 0: fine-tuning is kept only where it beats the default
    # mode's head on it (on handwritten digits, flips and crops on the fly made it worse).
    state_key, probe_is_epoch_0 = "model", True

    def __init__(self, config, scan, model, preprocess, job, cache_dir=None, resume=None):
        self.config, self.scan, self.model, self.preprocess = config, scan, model, preprocess
        self.job, self.device, self.cache_dir, self.resume = job, job.device, cache_dir, resume
        self.bar = None

    def fit(self):
        config, job = self.config, self.job
        if not self.resume:
            self.linear_probe()
            self.bar = self.default_head_valid_loss() if config.head == "logistic" else None
            print("fine-tune step 2: the backbone's last stages and the head, on augmented "
                  "images")
        if job.world_size > 1:
            seed_everything(config.seed + job.rank)  # [distributed] dropout differs by rank
        self.prepare()
        with StopSignals() as signals:
            result = run_epochs(self, config.epochs, config.patience, signals, self.resume)
        model = self.module
        if result.best_epoch == 0 and not result.interrupted:
            print(f"fine-tuning did not lower the valid loss below {self.bar_name()} "
                  f"({result.best_loss:.3f}, "
                  f"both fitted on the train split); keeping the pretrained backbone, with the "
                  f"default mode's head on it")
            return self.frozen_result(result)
        if not result.interrupted:
            self.choose_flip_averaging()
        _, result.metrics["valid_acc"] = self.evaluate_split("valid")
        if "test" in self.scan.samples:
            _, result.metrics["test_acc"], logits = self.evaluate_split("test", keep=True)
            if logits is not None:
                result.test_probs = torch.softmax(logits, 1).numpy()
        self.model = model.cpu().to(memory_format=torch.contiguous_format)
        return result

    def frozen_result(self, tuned):
        """The default mode's result on the pretrained backbone (to which early stopping went
        back), with the fine-tuning epochs that did not beat it in its history."""
        self.model = self.module.cpu().to(memory_format=torch.contiguous_format)
        frozen = FeatureTrainer(self.config.frozen(), self.scan, self.model, self.preprocess,
                                self.job, self.cache_dir)
        result = frozen.fit()
        if result is not None:
            result.history, result.epoch = tuned.history, tuned.epoch
            result.train_state = tuned.train_state
        return result

    def choose_flip_averaging(self):
        """Average each photo's logits with its mirror image's where that lowers the valid
        loss (it does for flowers; a mirrored digit is another digit)."""
        plain, _ = self.evaluate_split("valid")
        self.module.flip_tta = True
        mirrored, _ = self.evaluate_split("valid")
        self.module.flip_tta = mirrored < plain
        print(f"predicting {'with' if self.module.flip_tta else 'without'} the mirror image "
              f"averaged in (valid loss {mirrored:.3f} with, {plain:.3f} without)")

    def prepare(self):
        """The model, optimizer, data and schedule of the fine-tuning epochs."""
        config, job = self.config, self.job
        model = self.module = self.model.to(self.device).to(memory_format=torch.channels_last)
        trainable = unfreeze_tail(model.backbone, self.TRAINABLE_FRACTION)
        self.optimizer = torch.optim.AdamW(
            [{"params": trainable, "lr_scale": self.BACKBONE_LR_SCALE},
             {"params": list(model.head.parameters()), "lr_scale": 1.0}],
            lr=config.learning_rate, weight_decay=config.weight_decay)
        samples = self.scan.samples["train"]
        self.train_set = features.AugmentedDataset(samples, self.preprocess, config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.criterion = make_criterion(config, [y for _, y in samples], len(self.scan.classes),
                                        self.device)
        # [distributed] --batch_size is the global batch: each of N processes takes 1/N of it
        self.sampler = job.train_sampler(self.train_set, config.seed)
        self.batch_size = max(1, config.batch_size // job.world_size)
        self.share = len(self.sampler) if self.sampler is not None else len(self.train_set)
        self.steps_per_epoch = math.ceil(self.share / self.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self.net = job.wrap(model)  # DDP: rank 0's weights to all, gradients averaged
        self.dtype = model_utils.autocast_dtype(self.device)
        self.micro_batch = (model_utils.CPU_INFERENCE_BATCH if self.device.type == "cpu"
                            else self.batch_size)

    def train_epoch(self, epoch, signals):
        """One pass over this process's share of the training images; the mean loss over all
        processes, or None where a stop signal cut it short."""
        job, lr_peak = self.job, self.config.learning_rate
        self.train_set.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)  # a new shuffle each epoch
        loader = features.make_loader(self.train_set, self.batch_size, self.config.workers, job,
                                      shuffle=True, generator=self.generator,
                                      sampler=self.sampler)
        self.net.train()
        freeze_batchnorm(self.module)
        total, seen, stopping = 0.0, 0, False
        # [distributed] the sampler's padding repeats are trained on, not counted
        real_left = job.real_count(len(self.train_set))
        progress = data_utils.Progress(self.share, f"epoch {epoch + 1} training",
                                       stream=job.progress_stream)
        for i, (x, y) in enumerate(loader):
            lr = cosine_lr(epoch * self.steps_per_epoch + i, self.total_steps, lr_peak,
                           self.steps_per_epoch // 2)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            x = x.to(self.device).contiguous(memory_format=torch.channels_last)
            y = y.to(self.device)
            logits = train_step(self.net, self.optimizer, self.criterion, x, y, self.dtype,
                                self.micro_batch, job)
            real = min(len(y), real_left)
            if real:
                loss = self.criterion(logits[:real], y[:real]).item()
                total, seen = total + loss * real, seen + real
            real_left -= real
            progress.update(len(y))
            if self.stop_requested(signals):
                stopping = True
                break
        progress.close()
        total, seen = job.sum([total, seen])  # [distributed] over all real samples
        if stopping and seen < len(self.train_set):
            return None
        return total / seen

    def stop_requested(self, signals):
        return self.job.any(signals.signum)  # [distributed] all ranks stop at the same step

    def evaluate(self):
        return self.evaluate_split("valid")

    def bar_name(self):
        """Whose valid loss fine-tuning had to beat (a resumed run's bar was set before)."""
        if self.config.head == "logistic" and (self.bar is not None or self.resume):
            return "the default mode's head's"
        return "the linear probe's"

    def epoch_0_loss(self):
        """The valid loss to beat: the default mode's head's (with --head adamw, the linear
        probe's)."""
        return self.evaluate()[0] if self.bar is None else self.bar

    def default_head_valid_loss(self):
        """The valid loss of the default mode's head on the pretrained backbone, fitted on the
        train split alone as fine-tuning is: what fine-tuning must beat. Its features are
        the ones the default mode's head is fitted on where fine-tuning does not beat it.
        None where that head would not fit in memory: the epoch head, which the default mode
        then trains, is the linear probe's, whose valid loss is the bar."""
        frozen = FeatureTrainer(self.config.frozen(), self.scan, self.model, self.preprocess,
                                self.job, self.cache_dir)
        frozen.splits = ("train", "valid")
        if not frozen.logistic_fits_in_memory():
            return None
        loss = frozen.valid_loss_of_train_fit()
        self.job.wait_for_main("rank 0's default head")  # [distributed] fitted on rank 0
        loss = self.job.agree(loss)
        print(f"fine-tune: the default mode's head, fitted on the train split, has valid loss "
              f"{loss:.3f}; fine-tuning must beat it")
        return loss

    def linear_probe(self):
        """Fit the head on stored features of the plain images."""
        print("fine-tune step 1: the head on stored features")
        probe = FeatureTrainer(self.config.probe(), self.scan, self.model, self.preprocess,
                               self.job, self.cache_dir)
        probe.verbose = probe.finds_data_issues = False
        probe.splits = ("train", "valid")  # the fine-tuned network is the one tested
        probe.fit()
        self.job.wait_for_main("rank 0's linear probe")  # [distributed] the head, on rank 0

    def evaluate_split(self, split, keep=False):
        """Loss and accuracy over a split (and, with keep in one process, the logits); under
        torchrun each rank takes a share (no padding) and the sums are added up."""
        samples = self.scan.samples[split]
        share = [samples[i] for i in self.job.shard(len(samples))]
        loader = features.make_loader(features.EvalDataset(share, self.preprocess),
                                      model_utils.inference_batch_size(self.device),
                                      self.config.workers, self.job)
        forward = model_utils.fast_forward(self.module, self.device)
        loss_sum, correct, kept = 0.0, 0, []
        for x, y in loader:
            logits = forward(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            kept.append(logits)
        loss_sum, correct = self.job.sum([loss_sum, correct])
        loss, acc = loss_sum / len(samples), correct / len(samples)
        if not keep:
            return loss, acc
        return loss, acc, torch.cat(kept) if self.job.world_size == 1 else None


def train_step(net, optimizer, criterion, x, y, dtype, micro_batch, job=None):
    """One optimizer step on the batch (x, y), computed in micro-batches whose gradients add
    up to the batch's: on a CPU, batches of 16 keep activations in cache (measured 1.3-1.45x
    faster than 64 on 2 cores). Batch norm is frozen, so no layer sees the difference.
    Under torchrun (job) gradients are exchanged once, after the last micro-batch.
    Returns the batch's logits (detached)."""
    weight = criterion.weight
    # The batch's mean loss, as criterion computes it: a weighted mean with class weights.
    denominator = weight[y].sum() if weight is not None else len(y)
    summed = nn.CrossEntropyLoss(weight=weight, label_smoothing=criterion.label_smoothing,
                                 reduction="sum")
    chunks = list(zip(x.split(micro_batch), y.split(micro_batch)))
    optimizer.zero_grad(set_to_none=True)
    logits = []
    for i, (xs, ys) in enumerate(chunks):
        last = i == len(chunks) - 1
        with contextlib.nullcontext() if last or job is None else job.no_sync(net):
            with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
                out = net(xs).float()
                loss = summed(out, ys) / denominator
            loss.backward()
        logits.append(out.detach())
    optimizer.step()
    return torch.cat(logits)


def unfreeze_tail(backbone, fraction):
    """Train the last `fraction` of the backbone's weights (by count), i.e. its last stages:
    they hold the most task-specific features, and the early layers stay frozen and cheap (no
    gradients flow through them)."""
    model_utils.freeze(backbone)
    params = list(backbone.parameters())
    budget, chosen = fraction * sum(p.numel() for p in params), []
    for p in reversed(params):
        if budget <= 0:
            break
        p.requires_grad_(True)
        chosen.append(p)
        budget -= p.numel()
    return chosen


def freeze_batchnorm(model):
    """Keep batch-norm statistics as pretrained: small fine-tuning batches estimate them badly."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
