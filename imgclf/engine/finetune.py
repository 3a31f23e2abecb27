"""--finetune: a linear probe first, then the backbone's last stages and the head train
together on images augmented on the fly."""
import contextlib
import math
import time

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from ..heads import novelty
from ..models import classifier, hardware
from ..utils.progress import Progress
from ..utils.stopping import StopSignals
from . import features
from .epoch_loop import cosine_lr, make_criterion, run_epochs, seed_everything
from .feature_trainer import FeatureTrainer


# ---------------------------------------------------------------------------------------------
# --finetune
# ---------------------------------------------------------------------------------------------
class FinetuneTrainer:
    """Linear probe first (the head on stored plain features, seconds), then the backbone's last
    stages and the head train together on augmented images. Starting from a trained head keeps
    the first fine-tuning steps from wrecking the pretrained features. A mode of run_epochs."""

    # Share of the backbone's weights, counted from the output end, that fine-tuning trains.
    TRAINABLE_FRACTION = 0.5
    # The backbone's learning rate over the head's: a tenth underfits (docs/design.md,
    # "Figures behind the constants").
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
        if not result.interrupted:
            if job.is_main:  # one pass over the photos, on rank 0 while the others wait
                self.fit_novelty(result)
            job.wait_for_main("rank 0's unknown verdict")
        self.model = model.cpu().to(memory_format=torch.contiguous_format)
        return result

    def fit_novelty(self, result):
        """The unknown verdict of the fine-tuned model: the stored features are the pretrained
        backbone's, so the bank takes one more pass of the fine-tuned one over the train photos
        (novelty.BANK_MAX of them at most), the references and threshold one over the valid
        split (which it was early-stopped on, not trained on: novelty.fit_on_held_out), and
        the report's count one over the test split. Inference passes: a fraction of one
        fine-tuning epoch's forward and backward passes (docs/open_set.md)."""
        started = time.monotonic()
        train = self.scan.samples["train"]
        labels = np.array([label for _, label in train])
        chosen = novelty.bank_photos(labels, novelty.BANK_MAX, self.config.seed)
        bank, _ = self.features_and_logits([train[i] for i in chosen])
        valid, valid_logits = self.features_and_logits(self.scan.samples["valid"])
        result.novelty = novelty.fit_on_held_out(bank, labels[chosen], valid, valid_logits,
                                                 self.config.seed)
        result.metrics["unknown_threshold"] = result.novelty["threshold"]
        if "test" in self.scan.samples:
            test, test_logits = self.features_and_logits(self.scan.samples["test"])
            result.test_novelty = novelty.NoveltyScorer(result.novelty)(test,
                                                                        test_logits).numpy()
        print(f"unknown verdict: the fine-tuned backbone's features of {len(chosen)} train "
              f"photos in its bank; threshold {result.novelty['threshold']:.2f} keeps "
              f"{100 * novelty.KEEP:.0f}% of the valid photos  "
              f"[{time.monotonic() - started:.1f}s]")

    def features_and_logits(self, samples):
        """(features (photos, dim), logits (photos, classes)) of samples as the fine-tuned
        model predicts them (novelty.features_and_logits), in this process alone."""
        loader = features.make_loader(features.EvalDataset(samples, self.preprocess),
                                      hardware.inference_batch_size(self.device),
                                      self.config.workers, self.job)
        forward = hardware.fast_forward(novelty.FeaturesAndLogits(self.module), self.device)
        out = torch.cat([forward(x) for x, _ in loader])
        classes = len(self.scan.classes)
        return out[:, :-classes], out[:, -classes:]

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
        self.dtype = hardware.autocast_dtype(self.device)
        self.micro_batch = (hardware.CPU_INFERENCE_BATCH if self.device.type == "cpu"
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
        progress = Progress(self.share, f"epoch {epoch + 1} training",
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
        probe.verbose = probe.finds_data_issues = probe.fits_open_set = False
        probe.splits = ("train", "valid")  # the fine-tuned network is the one tested
        probe.fit()
        self.job.wait_for_main("rank 0's linear probe")  # [distributed] the head, on rank 0

    def evaluate_split(self, split, keep=False):
        """Loss and accuracy over a split (and, with keep in one process, the logits); under
        torchrun each rank takes a share (no padding) and the sums are added up."""
        samples = self.scan.samples[split]
        share = [samples[i] for i in self.job.shard(len(samples))]
        loader = features.make_loader(features.EvalDataset(share, self.preprocess),
                                      hardware.inference_batch_size(self.device),
                                      self.config.workers, self.job)
        forward = hardware.fast_forward(self.module, self.device)
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
    classifier.freeze(backbone)
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
