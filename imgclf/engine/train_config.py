"""The settings of a run, resolved once (TrainConfig), and which options the epoch head reads."""
import dataclasses
from dataclasses import dataclass, field

from ..heads import linear_probe
from ..models import backbones

# The epoch head's schedule: at least HEAD_EPOCHS epochs and HEAD_MIN_STEPS optimizer steps, so
# that a small data set is not left underfit (docs/design.md, "Figures behind the constants").
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
    arch: str = backbones.DEFAULT_ARCH
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
