"""The one epoch loop (run_epochs): history, the epoch line, early stopping, stop signals,
resume state and the best weights. Each mode supplies one epoch and its evaluation."""
import math
import random
import signal
import time

import torch
from torch import nn


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
        self.novelty = None  # the checkpoint's "novelty" entry (heads/novelty.py), if fitted
        self.test_novelty = None  # numpy (test images,), where novelty and a test split are


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
