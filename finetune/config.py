"""train.py's configuration: the options, typed and grouped by concern, frozen once parsed and checked.

    options = config.from_namespace(args)        after parsing, --config merging, validation and parse-time defaults
    options.training.lr, options.lr              by group (inputs, modeling, training, evaluation, output), or by
                                                 name (each name lives in exactly one group)
    options = options.derive(gradient_checkpointing=True, ...)
                                                 what the run decides once the data and the model's shape are known
                                                 (checkpointing, precision, unsloth, device fallbacks): a new frozen
                                                 object, in one place (train.prepare); by-name access sees it
    options.record()                             run.json: every option (derived values in place) plus "derived"

Nothing assigns to options after parsing: a decision is a derive() call, so run.json says which values the user
gave and which the run chose. The groups follow train.py --help.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields, replace


@dataclass(frozen=True)
class DataOptions:
    train_data: str | None = None
    validation_data: str | None = None
    columns: str | dict | None = None
    lm_text: bool = False
    validation_split: str | None = None
    train_samples: int | None = None
    mix: str | None = None
    data: str | None = None
    suffix: str | None = None
    classes: str | None = None
    prompts: str | None = None
    allow_outside_paths: bool = False
    max_len: int = 1024
    num_preprocess_workers: int | None = None
    response_template: str | None = None
    head: str | None = None


@dataclass(frozen=True)
class ModelOptions:
    model: str | None = None
    trainable: str | None = None
    lora_rank: int = 16
    lora_alpha: int | None = None
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    set_pad_token: str | None = None
    add_special_tokens: str | list | None = None
    mixed_precision: str = "auto"
    use_unsloth: bool | None = None
    gradient_checkpointing: bool | None = None
    split_model: bool = False
    trust_remote_code: bool = False


@dataclass(frozen=True)
class TrainingOptions:
    trainer: str = "sft"
    batch_size: int = 8
    grad_accum: int = 1
    total_batch_size: int | None = None
    max_batch_size_per_device: int | None = None
    auto_batch_size: bool = False
    epochs: float = 1
    max_steps: int = -1
    lr: float | None = None
    head_lr: float | None = None
    warmup: float = 0.05
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    seed: int = 42
    save_steps: int | None = None
    num_generations: int = 8
    max_completion_len: int = 256
    temperature: float = 1.0
    beta: float | None = None
    rewards: str = "correct"
    reward_weights: str | None = None
    prefill: str | None = None
    init_adapter: str | None = None
    vllm: bool = False
    dpo_loss: str = "sigmoid"


@dataclass(frozen=True)
class EvaluationOptions:
    eval_steps: int | None = None
    predict: str = "score"
    val_samples: int | None = None
    max_new_tokens: int | None = None
    metric: str | None = None
    early_stopping: int | None = None
    early_stopping_delta: float = 0.0


@dataclass(frozen=True)
class OutputOptions:
    name: str | None = None
    log_dir: str = "log"
    resume: bool = False
    report_to: list | str = "none"
    config: str | None = None


@dataclass(frozen=True)
class Derived:
    """What the run decides from the data, the model and the machine; None: not decided (the option stands)."""
    gradient_checkpointing: bool | None = None  # training.checkpointing_default
    mixed_precision: str | None = None          # precision.cpu_choice ('auto' resolved on a CPU)
    use_unsloth: bool | None = None             # installed + NVIDIA GPU, off with --add-special-tokens
    split_model: bool | None = None             # off without a GPU
    batch_size: int | None = None               # --auto-batch-size: the largest per-device batch that fits
    grad_accum: int | None = None               # ... and the accumulation that keeps --total-batch-size


# group attributes are named so that none is also an option's name (--data, -m/--model)
GROUPS = {"inputs": DataOptions, "modeling": ModelOptions, "training": TrainingOptions,
          "evaluation": EvaluationOptions, "output": OutputOptions}
OWNER = {f.name: group for group, cls in GROUPS.items() for f in fields(cls)}


@dataclass(frozen=True)
class Options:
    inputs: DataOptions
    modeling: ModelOptions
    training: TrainingOptions
    evaluation: EvaluationOptions
    output: OutputOptions
    derived: Derived = field(default_factory=Derived)
    notes: tuple = ()  # notes for the start-up report, said once the data is known to be good

    def __getattr__(self, name):
        """options.lr: the option by name, from the group that owns it; a derived value wins over the option."""
        if name.startswith("__") or name not in OWNER:
            raise AttributeError(name)
        value = getattr(self.derived, name, None)
        return value if value is not None else getattr(getattr(self, OWNER[name]), name)

    def derive(self, **values) -> Options:
        return replace(self, derived=replace(self.derived, **values))

    def record(self) -> dict:
        """Every option by name (derived values in place), plus "derived": what the run chose itself."""
        out = {name: getattr(self, name) for name in OWNER}
        out["derived"] = {k: v for k, v in asdict(self.derived).items() if v is not None}
        return out


def from_namespace(ns: argparse.Namespace, notes=()) -> Options:
    """The parsed and checked Namespace as frozen Options; a name no group owns is a programming error."""
    values = vars(ns)
    unknown = sorted(set(values) - set(OWNER))
    if unknown:
        raise TypeError(f"options without a group in finetune/config.py: {', '.join(unknown)}")
    groups = {g: cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
              for g, cls in GROUPS.items()}
    return Options(**groups, notes=tuple(notes))
