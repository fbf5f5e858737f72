"""The run folder, log/NAME/, and the one module that writes, finds and repairs it: train, eval, generate, export
and the library name its files through here and write them with its functions.

    log/NAME/run.json            the resolved configuration (run_config): eval.py, generate.py and export.py reuse it
    log/NAME/checkpoint-N/       the Trainer's resumable checkpoints (model, optimiser, scheduler, RNG, data position)
    log/NAME/best/, latest/      weights + tokenizer/processor + run.json with the checkpoint's step and metric,
                                 each replaced atomically (save_atomic)
    log/NAME/train_log.jsonl     every logged dict (append_log); completions.jsonl for GRPO (append_completions)
    log/NAME/curves.png          the curves (monitor.py draws them; write_file replaces the file atomically)
    incomplete-checkpoint-N/     a checkpoint cut off while saving (set aside by resumable_checkpoint)
    diverged-checkpoint-N/       the weights a NaN loss came from (set aside by set_aside_diverged)
    EXPORT/finetune_run.json     an export's copy of run.json with its provenance (write_export_config,
                                 export_config)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from finetune import launch, precision, sources
from finetune.errors import ModelError
from finetune.options import SECRET_OPTIONS, fail

RUN_CONFIG = "run.json"
TRAIN_LOG = "train_log.jsonl"
COMPLETIONS = "completions.jsonl"
CURVES = "curves.png"
EXPORT_CONFIG = "finetune_run.json"


def run_dir(args) -> Path:
    """log/NAME for this run, checked: a new name, or --resume of an existing run."""
    out = Path(args.log_dir) / args.name
    # rank 0 alone checks: it may already have written run.json when another rank gets here
    if launch.is_main_process() and out.exists() and any(out.iterdir()) and not args.resume:
        fail(f"{out}: a run of that name exists; pass --resume to continue it or choose another --name")
    if args.resume and not (out / RUN_CONFIG).is_file():
        fail(f"{out}: nothing to resume (no run.json)")
    return out


def run_config(args, classes, tokens, vision, n_train, n_val, train=(), tokenizer=None, derived=None) -> dict:
    """Everything eval.py needs to score a checkpoint without being told the training options again, with what
    loading the data decided (`derived`: data_sources, validation_split_ids).
    longest_answer_tokens (the longest training answer, end-of-turn included) sets eval.py's and generate.py's
    default generation budget and train.py's validation budget (decoding.generation_budget)."""
    options = args.record() if hasattr(args, "record") else vars(args)  # config.Options, or a plain Namespace
    cfg = {k: v for k, v in options.items() if k not in SECRET_OPTIONS}
    cfg.update(classes=classes, vision=vision, tokens=tokens, task="classification" if classes else "generation",
               train_samples=n_train, validation_samples=n_val, format="plain" if args.response_template else "chat",
               **(derived or {}))
    cfg["precision"] = precision.resolve(args.mixed_precision)  # resolved (auto -> no / bf16 / fp16)
    cfg["weights_dtype"] = precision.weights_dtype(args.trainable, args.mixed_precision)  # export.py merges in it
    answers = [a for a in (getattr(s, "answer", None) for s in train) if a]  # DPO / GRPO samples may have none
    if answers and tokenizer is not None:
        cfg["longest_answer_tokens"] = 1 + max(map(len, tokenizer(answers, add_special_tokens=False)["input_ids"]))
    for k in ("train_data", "validation_data", "data", "prompts"):
        if cfg.get(k):
            # Hub ids stay ids; local paths become absolute
            cfg[k] = sources.resolved(cfg[k]) if k.endswith("_data") else str(Path(cfg[k]).resolve())
    if args.classes:
        cfg["classes_file"] = str(Path(args.classes).resolve())
    if getattr(args, "init_adapter", None):  # eval / generate / export apply this run's adapter on top of it
        cfg["init_adapter"] = str(Path(args.init_adapter).resolve())
    return cfg


def write_config(folder: Path, cfg: dict):
    """folder/run.json, replaced atomically (eval.py may read it while training runs)."""
    write_file(Path(folder) / RUN_CONFIG, lambda tmp: tmp.write_text(json.dumps(cfg, indent=2)))


def update_plan(out: Path, key: str, value):
    """One entry added to run.json's plan (the ETA measured over the first steps). A missing or unreadable run.json
    is left alone: what was measured still shows on the console."""
    try:
        cfg = json.loads((Path(out) / RUN_CONFIG).read_text())
    except (OSError, ValueError):
        return
    cfg.setdefault("plan", {})[key] = value
    write_config(out, cfg)


def stored_split_ids(args) -> list | None:
    """--resume: the held-out validation ids the run stored (sources.prepare validates on the very same ones)."""
    run = Path(args.log_dir) / (args.name or "") / RUN_CONFIG
    if not (args.resume and args.name and run.is_file()):
        return None
    return _read_json(run).get("validation_split_ids")


def write_file(dest: Path, write):
    """write(tmp) writes a file that then replaces dest in one rename: a reader never sees half of it."""
    tmp = dest.with_name(dest.name + ".tmp" + dest.suffix)  # the suffix kept: matplotlib picks the format by it
    write(tmp)
    os.replace(tmp, dest)


def append_jsonl(path: Path, records):
    with open(path, "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def append_log(out: Path, record: dict):
    """One logged dict to log/NAME/train_log.jsonl."""
    append_jsonl(Path(out) / TRAIN_LOG, [record])


def append_completions(out: Path, records):
    """GRPO's scored completions to log/NAME/completions.jsonl."""
    append_jsonl(Path(out) / COMPLETIONS, records)


def write_export_config(folder: Path, cfg: dict):
    """An export's finetune_run.json: the run's configuration and where the export came from."""
    (Path(folder) / EXPORT_CONFIG).write_text(json.dumps(cfg, indent=2))


def export_config(path) -> dict | None:
    """The finetune_run.json of an export (a folder, or a file such as model.gguf inside one), else None."""
    p = Path(path).expanduser()
    f = (p if p.is_dir() else p.parent) / EXPORT_CONFIG
    return _read_json(f) if f.is_file() else None


def save_atomic(dest: Path, write):
    """write(tmp) fills a temporary folder that then replaces dest: a crash never leaves a half-written dest."""
    tmp, old = dest.with_name(dest.name + ".tmp"), recovered(dest).with_name(dest.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def recovered(dest: Path) -> Path:
    """dest, put back when a kill came between save_atomic's two renames (dest gone, its old copy still whole)."""
    old = dest.with_name(dest.name + ".old")
    if old.is_dir() and not dest.exists():
        old.rename(dest)
    return dest


def resume_point(args, out: Path, rank0: bool) -> str | None:
    """--resume: the newest complete checkpoint (model, optimiser, scheduler, RNG and data position), or a fresh
    start with a warning when the run was killed before its first checkpoint."""
    if not args.resume:
        return None
    found = resumable_checkpoint(out, rename=rank0)
    if found is None:
        print(f"warning: {out} has no complete checkpoint yet; training from step 0", file=sys.stderr)
    else:
        print(f"resuming from {found}")
    return found


def resumable_checkpoint(out, rename: bool = True) -> str | None:
    """The newest *complete* checkpoint-N in `out`. The Trainer writes a checkpoint in place and its
    trainer_state.json last, so a run killed while saving leaves a folder without it (or with a cut one), which
    transformers' get_last_checkpoint would still pick. Such folders are renamed incomplete-checkpoint-N (by one
    rank)."""
    steps = sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*")
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    for _, folder in reversed(steps):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            return str(folder)
        except (OSError, ValueError):
            print(f"warning: {folder} was cut off while saving (killed?); skipping it", file=sys.stderr)
            if rename:
                folder.rename(folder.with_name("incomplete-" + folder.name))
    return None


def set_aside_diverged(out, step: int) -> str | None:
    """The loss at step k is computed with the weights saved at step k-1: if that checkpoint exists it holds the
    weights that diverged. It becomes diverged-checkpoint-N (not deleted: it is the user's data), so --resume
    picks an earlier one."""
    from transformers.trainer_utils import get_last_checkpoint

    bad = out / f"checkpoint-{step - 1}"
    if bad.is_dir():
        bad.rename(bad.with_name("diverged-" + bad.name))  # out of the Trainer's checkpoint-* rotation too
    found = get_last_checkpoint(str(out)) if out.exists() else None
    return found


def find_run(path) -> tuple[dict, Path]:
    """(run config, weights folder) for log/NAME (its best/, else latest/), log/NAME/best|latest|checkpoint-N, or
    a merged export (export.py merge: a full model with finetune_run.json). eval, export and generate share it."""
    p = recovered(Path(path))
    if not p.is_dir():
        raise ModelError(f"{path}: no such folder")
    if (p / EXPORT_CONFIG).is_file():  # a merged export: a full model with its run's configuration
        return _read_json(p / EXPORT_CONFIG), p
    if (p / RUN_CONFIG).is_file() and not _has_weights(p):  # the run folder itself: its best/, else latest/
        sub = next((p / s for s in ("best", "latest") if recovered(p / s).is_dir()), None)
        if sub is None:
            raise ModelError(f"{path}: the run has no best/ or latest/ folder (did training save anything?)")
        p = sub
    cfg_file = p / RUN_CONFIG if (p / RUN_CONFIG).is_file() else p.parent / RUN_CONFIG
    if not cfg_file.is_file():
        raise ModelError(f"{path}: not a run of train.py (no run.json here or in the parent folder)")
    if not _has_weights(p):
        raise ModelError(f"{p}: no adapter (adapter_config.json) and no model weights (config.json) in it")
    return _read_json(cfg_file), p


def _read_json(f: Path) -> dict:
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{f}: cannot read ({e})") from None


def _has_weights(p: Path) -> bool:
    return is_adapter(p) or (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def is_adapter(p: Path) -> bool:
    return (p / "adapter_config.json").is_file() and any(p.glob("adapter_model.*"))


def run_name(weights: Path) -> str:
    """The run a weights folder belongs to: log/NAME/best -> NAME; a merged export -> its folder name."""
    weights = Path(weights).resolve()
    inside = weights.name in ("best", "latest") or weights.name.startswith("checkpoint-")
    return weights.parent.name if inside else weights.name
