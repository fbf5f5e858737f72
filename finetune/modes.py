"""The four training modes behind one interface: train.py calls the same methods, in order, whatever the mode.

    mode = modes.for_args(args)        SFT, Classifier (--classifier), GRPO or DPO (--trainer)
    mode.load_data(s, stored_ids)      samples, validation samples and classes into the Setup `s` (stored_ids: the
                                       validation split of the run being resumed, runs.stored_split_ids)
    mode.encode(s)                     token ids (s.train_ds, s.val_ds) and the mode's own checks
    mode.load_model(s)                 the model ready for its trainer (PEFT-wrapped unless --trainable full)
    mode.make_trainer(s, model, common, out)   TRL's / transformers' trainer with our additions (finetune/training.py)
    mode.metrics(s)                    the validation metrics it measures, its default first (--metric picks one)
    mode.metric(s)                     the validation metric best/ and --early-stopping go by ("eval_" + name)

Adding a mode is one class here; clashes between options are checked once, before any of this (finetune/options.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dataset import RVL_CDIP_CLASSES, DataError, classes_of, load_classes, load_prompts, load_rvl_cdip, to_classes
from finetune import batching, classifier, rl, sources, tokenise, training
from finetune.errors import ModelError
from finetune.modeling import load_for_training

TRAINERS = ("sft", "grpo", "dpo", "kto")  # train.py's --trainer (and `dataset.py check`'s)


@dataclass
class Setup:
    """Everything prepared before the model loads: data, classes, tokenizer, prompt format, encoded datasets."""
    args: object
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    classes: list | None = None
    prompts: dict | None = None
    vision: bool = False
    tokenizer: object = None
    processor: object = None
    tokens: dict | None = None
    fmt: object = None          # the training prompt format (a prompt drawn per sample)
    val_fmt: object = None      # validation: always the first prompt
    train_ds: object = None
    val_ds: object = None
    extras: dict = field(default_factory=dict)  # what one mode keeps for its trainer (GRPO's reward functions,
    # (funcs, weights), which train.py hands over from rewards.py: the library never imports it)
    derived: dict = field(default_factory=dict)  # what loading decided that run.json records (data_sources, ...)


class SFT:
    """Supervised fine-tuning with the loss on the answer only (TRL's SFTTrainer)."""
    name = "sft"
    require_answer = True  # GRPO checks the references against its rewards instead (rl.check_rewards)

    def load_data(self, s: Setup, stored_ids=None):
        """Validated samples and classes: everything checked before a model is loaded."""
        a = s.args
        s.prompts = load_prompts(a.prompts)
        classes = load_classes(a.classes) if a.classes else None
        # the plain format's response template stands in for a question, and a classifier head needs none
        need_q = a.response_template is None and a.head != "classifier"
        if a.data:
            classes = classes or RVL_CDIP_CLASSES
            s.train = load_rvl_cdip(a.data, "train", classes, a.suffix, s.prompts, need_q, a.allow_outside_paths)
            has_val = any(p.name.startswith("validation_") for p in Path(a.data).iterdir())
            s.val = load_rvl_cdip(a.data, "validation", classes, a.suffix, s.prompts, need_q,
                                  a.allow_outside_paths) if has_val else []
        else:
            s.train = sources.load_samples(a.train_data, s.prompts, self.require_answer, need_q,
                                           allow_outside=a.allow_outside_paths, columns=a.columns, lm=a.lm_text)
            s.val = sources.load_samples(a.validation_data, s.prompts, self.require_answer, need_q,
                                         allow_outside=a.allow_outside_paths, columns=a.columns, lm=a.lm_text) \
                if a.validation_data else []
        # --mix, --validation-split, --train-samples
        s.train, s.val, used = sources.prepare(a, s.train, s.val, stored_ids)
        s.derived.update(used)
        spelled = False  # every training answer already its class's name (classes_of's one pass found it)
        if not classes:
            classes, spelled = classes_of(s.train)
        s.classes = classes
        if s.classes:  # the one matching rule: every reference answer becomes its class name, here, once
            s.train, s.val = s.train if spelled else to_classes(s.train, s.classes), to_classes(s.val, s.classes)

    def encode(self, s: Setup):
        workers = s.args.num_preprocess_workers or tokenise.default_workers()
        s.train_ds = tokenise.encode_cached(s.fmt, s.train, True, workers)
        s.val_ds = tokenise.encode_cached(s.val_fmt, s.val, False, workers) if s.val else None

    def load_model(self, s: Setup):
        return load_for_training(s.args, s.vision, s.tokenizer)

    def make_trainer(self, s: Setup, model, common: dict, out: Path):
        from trl import SFTConfig, SFTTrainer
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        collator = batching.VisionCollator(s.processor, s.tokenizer.pad_token_id) if s.vision else \
            DataCollatorForLanguageModeling(pad_token_id=s.tokenizer.pad_token_id)
        keep = ["input_ids", "labels", "length"] + (["segments", "images"] if s.vision else [])
        flat = batching.padding_free(model, s.vision)  # CUDA + flash-attention only; CPU pads (finetune/batching.py)
        trainer = training.make_trainer_class(SFTTrainer, s.args.gradient_checkpointing)(
            model=model, args=SFTConfig(**common, max_length=None, padding_free=flat,
                                        dataset_kwargs={"skip_prepare_dataset": True}),
            train_dataset=s.train_ds.select_columns(keep),
            eval_dataset=s.val_ds.select_columns(keep) if s.val_ds is not None else None,
            processing_class=s.processor or s.tokenizer, data_collator=None if flat else collator)
        if s.classes and s.val:
            trainer.validation = training.closed_set_validation(model, s.val_fmt, s.val, s.classes, s.args)
        elif s.val:
            trainer.validation = training.free_text_validation(model, s.val_fmt, s.val, s.args)
        return trainer

    def metrics(self, s: Setup) -> list[str]:
        return ["accuracy", "macro_f1", "loss"] if s.classes else ["chrf", "exact_match", "loss"]

    def metric(self, s: Setup) -> str:
        """--metric if this mode measures it, else the mode's default; a ValueError names the ones it has."""
        have, want = self.metrics(s), getattr(s.args, "metric", None)
        if want and want not in have:
            raise ValueError(f"--metric {want}: {self.name} validation on this data measures {', '.join(have)}")
        return "eval_" + (want or have[0])


class Classifier(SFT):
    """A sequence-classification head on the LLM (transformers' Trainer): finetune/classifier.py."""
    name = "classifier"

    def encode(self, s: Setup):
        if not s.classes or s.vision:
            raise ModelError("--classifier supports text models only" if s.vision else "--classifier needs a "
                             "closed set of classes (--classes FILE, or short answers that repeat)")
        s.train_ds = classifier.encode(s.fmt, s.train, s.classes, train=True)
        s.val_ds = classifier.encode(s.val_fmt, s.val, s.classes) if s.val else None

    def load_model(self, s: Setup):
        names = classifier.class_token_ids(s.fmt, s.classes)  # the head starts from what the names mean
        return classifier.load_for_training(s.args, s.classes, s.tokenizer, names)

    def make_trainer(self, s: Setup, model, common: dict, out: Path):
        from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

        trainer = training.make_trainer_class(Trainer)(
            model=model, args=TrainingArguments(**common), train_dataset=s.train_ds, eval_dataset=s.val_ds,
            processing_class=s.tokenizer, data_collator=DataCollatorWithPadding(s.tokenizer),
            compute_metrics=classifier.compute_metrics(s.classes))
        trainer.head_lr = s.args.head_lr
        return trainer


class GRPO(SFT):
    """GRPO with verifiable rewards (TRL's GRPOTrainer): finetune/rl.py, rewards.py. With validation data, each
    validation generates one greedy completion per validation prompt and scores it (rl.grpo_validation)."""
    name = "grpo"
    require_answer = False  # only the rewards that compare with a reference need one (rl.check_rewards)

    def load_data(self, s: Setup, stored_ids=None):
        super().load_data(s, stored_ids)
        if not any(x.all_images for x in s.train + s.val):  # text prompts: the rewards are checked at once
            self.check_rewards(s, chat=False)

    def check_rewards(self, s: Setup, chat: bool):
        funcs, _ = s.extras["rewards"]
        rl.check_rewards(funcs, s.train, s.args.prefill, "--train-data", chat=chat)
        rl.check_rewards(funcs, s.val, s.args.prefill,
                         "--validation-split" if s.args.validation_split else "--validation-data", chat=chat)

    def encode(self, s: Setup):
        a = s.args
        s.extras["chat"] = chat = rl.conversational(s.fmt, s.train + s.val)
        if any(x.all_images for x in s.train + s.val):  # left from load_data: with images, the completions' form
            self.check_rewards(s, chat)                 # (chat or text) follows from the model, known here
        bare = next((x for x in s.train if not x.all_images), None)
        if chat and bare is not None and any(x.all_images for x in s.train):
            raise DataError(bare.file, bare.id, "image", "GRPO on images needs one in every training sample: "
                            "TRL's GRPOTrainer cannot batch prompts with and without images")
        if chat and a.response_template is not None:
            raise ModelError("--response-template: GRPO on samples with images renders the prompts with the chat "
                             "template (TRL takes images only in chat prompts); leave it out")
        s.fmt.prefill = s.val_fmt.prefill = a.prefill
        s.train_ds = rl.grpo_dataset(s.fmt, s.train, a.prefill, chat)
        s.val_ds = rl.grpo_dataset(s.val_fmt, s.val, a.prefill, chat) if s.val else None
        if a.batch_size % a.num_generations:
            raise ModelError(f"-b {a.batch_size} must be a multiple of --num-generations {a.num_generations} "
                             "(GRPO compares each prompt's completions as a group)")
        if a.vllm and not rl.vllm_available():
            raise ModelError("--vllm needs an NVIDIA GPU and vllm installed (uv pip install vllm)")

    def make_trainer(self, s: Setup, model, common: dict, out: Path):
        from trl import GRPOTrainer

        funcs, weights = s.extras["rewards"]
        cls = rl.grpo_trainer_class(training.make_trainer_class(GRPOTrainer, s.args.gradient_checkpointing))
        chat = s.extras["chat"]  # TRL renders chat prompts and their images with the processor
        trainer = cls(model=model, reward_funcs=rl.logged_rewards(funcs, out),
                      args=rl.grpo_config(s.args, common, weights), train_dataset=s.train_ds,
                      eval_dataset=s.val_ds, processing_class=s.processor if chat else s.tokenizer)
        if s.val:
            trainer.validation = rl.grpo_validation(model, s.val_fmt, s.val, s.classes, funcs, weights, s.args,
                                                    s.prompts, chat)
        return trainer

    def metrics(self, s: Setup) -> list[str]:
        if not s.val:
            return ["loss"]  # nothing validates: the reward in the training log is the measure
        return ["accuracy", "reward", "format"] if s.classes else ["reward", "format"]


class DPO(SFT):
    """DPO on preference pairs (TRL's DPOTrainer): finetune/rl.py."""
    name = "dpo"
    unpaired = False                 # KTO reads unpaired preferences
    trainer, config, rows = "DPOTrainer", staticmethod(rl.dpo_config), staticmethod(rl.dpo_dataset)

    def load_data(self, s: Setup, stored_ids=None):
        a = s.args
        sources.check_preference_options(a)
        s.prompts = load_prompts(a.prompts)
        s.train = sources.load_preferences(a.train_data, s.prompts, a.allow_outside_paths, a.columns, self.unpaired)
        s.val = sources.load_preferences(a.validation_data, s.prompts, a.allow_outside_paths, a.columns,
                                         self.unpaired) if a.validation_data else []

    def encode(self, s: Setup):
        s.train_ds = self.rows(s.fmt, s.train)
        s.val_ds = self.rows(s.val_fmt, s.val) if s.val else None

    def make_trainer(self, s: Setup, model, common: dict, out: Path):
        import trl

        cls = rl.preference_trainer_class(training.make_trainer_class(getattr(trl, self.trainer),
                                                                      s.args.gradient_checkpointing))
        return cls(model=model, args=self.config(s.args, common), train_dataset=s.train_ds, eval_dataset=s.val_ds,
                   processing_class=s.tokenizer)

    def metrics(self, s: Setup) -> list[str]:
        return ["loss"]


class KTO(DPO):
    """KTO on unpaired preferences, a reply and whether it is desirable (TRL's KTOTrainer): finetune/rl.py. Model
    loading, resume, curves and export are DPO's."""
    name = "kto"
    unpaired = True
    trainer, config, rows = "KTOTrainer", staticmethod(rl.kto_config), staticmethod(rl.kto_dataset)

    def encode(self, s: Setup):
        if s.args.batch_size < 2:
            raise ModelError("--trainer kto needs -b 2 or more: its KL estimate pairs each completion with another "
                             "prompt of the same batch")
        super().encode(s)


def for_args(args):
    """The mode the options ask for (their clashes were checked in options.train_option_error)."""
    if args.head == "classifier":
        return Classifier()
    return {"sft": SFT, "grpo": GRPO, "dpo": DPO, "kto": KTO}[args.trainer]()
