"""Generate with a fine-tuned run in the exact prompt format it was trained with (system prompt, question, chat
template or --response-template, max length: all from its run.json).

    uv run generate.py -c log/NAME --prompt "Which colour is the sky?"              # one answer on stdout
    uv run generate.py -c log/NAME --text "$(cat letter.txt)"                       # a document + the run's question
    uv run generate.py -c log/NAME --prompt "What does it show?" --image scan.png   # vision-language runs
    uv run generate.py -c log/NAME --data test.jsonl -o answers.jsonl -b 8          # a data file -> JSONL
    uv run generate.py -c log/NAME                                                  # interactive chat
    uv run generate.py -c merged/NAME --prompt "Hi" --temperature 0.7               # a merged export, sampled

-c takes log/NAME (its best/), log/NAME/best|latest|checkpoint-N, or a folder written by `export.py merge`.
--prompt is the user turn as typed; --text is a document that gets the run's first question (as a data sample
{"text": ...} would); both get the run's first system prompt. --data takes every layout train.py reads; answers are
optional there. Each output line is {"id", "prompt", "answer", "reference"}; rows come as batches finish (longest
prompts first), so match them by id. Greedy decoding unless --temperature > 0; generation stops at the end-of-turn
token the run was trained to emit.

Chat: multi-turn (the history is kept and re-sent in the chat template; the oldest turns are dropped when it
outgrows the run's max length), tokens stream as they are generated, an empty line, "exit" or Ctrl-D ends it.
Plain-format runs (--response-template) were trained single-turn, so each chat line is answered on its own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dataset import DataError, Formatter, Sample, load_prompts, pick_prompt
from finetune import sources
from finetune.errors import ModelError
from finetune.modeling import load_for_inference
from finetune.options import fail, range_error
from finetune.predict import DECODING, add_decoding_options, decoding_of, generation_budget, predict
from finetune.runs import find_run


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("-c", "--checkpoint", required=True, help="log/NAME (its best/), log/NAME/best|latest|checkpoint-N, or a "
      "merged export")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="one user message (default: interactive chat)")
    src.add_argument("--text", help="one document; the question and system prompt come from the run's prompts")
    src.add_argument("--data", help="a data file or folder (any layout train.py reads); answers optional")
    a("--image", help="an image for --prompt / --text / the first chat turn (vision-language runs)")
    a("--allow-outside-paths", action="store_true",
      help="--data: let image / sample file paths point outside its folder (off: a safety check)")
    a("--max-new-tokens", type=int, help="generation budget (default: 1.5 x the run's longest training answer + 16 "
      "tokens; 256 for a run without that record)")
    a("--temperature", type=float, default=0.0, help="sample at this temperature (default 0: greedy)")
    add_decoding_options(p)
    a("-b", "--batch-size", type=int, default=8, help="samples per batch for greedy --data (default 8)")
    a("-o", "--output", help="write JSONL here (default: stdout)")
    a("--prefill", help="text the reply starts with, appended to the prompt (default: the run's, e.g. a GRPO run's)")
    return p


def generate_one(model, fmt, sample, max_new_tokens=256, temperature=0.0, streamer=None, decoding=None) -> str:
    """One reply to a sample's conversation (the last turn is the user's): greedy or sampled, optionally streamed;
    `decoding`: predict.decoding_of's options (beams, repetition penalty, n-gram blocking) over plain greedy."""
    import torch

    tok = fmt.tokenizer
    dev = next(model.parameters()).device
    if sample.all_images and fmt.processor is not None:
        # the processor expands the images into their tokens, so it gets the prompt text; rendered from the segments
        # (no --max-len cut) so a chat about an image can go on
        from PIL import Image

        text = "".join(t for t, _ in fmt.segments(sample, pick_prompt(sample, fmt.prompts, None), sample.document))
        enc = fmt.processor(text=[text], images=[Image.open(p).convert("RGB") for p in sample.all_images],
                            return_tensors="pt").to(dev)
    else:
        encoded = fmt.encode(sample, with_answer=False)
        if encoded is None:
            raise DataError(sample.file, sample.id, None, f"the conversation is longer than max_len {fmt.max_len}")
        ids = torch.tensor([encoded["input_ids"]], device=dev)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # sampling keeps the model's own top_p / top_k defaults; greedy switches them off (no warnings)
    how = dict(do_sample=True, temperature=temperature) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, streamer=streamer, **how,
                             **{**DECODING, **(decoding or {})})
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def prompt_text(fmt, sample) -> str:
    """The prompt as the model sees it (special tokens shown), for the JSONL output."""
    enc = fmt.encode(sample, with_answer=False)
    if enc is None:
        return ""
    return enc.get("prompt_text") or fmt.tokenizer.decode(enc["input_ids"])


def answer_all(model, fmt, samples, args, emit):
    """emit(row) for every sample: batched greedy decoding through predict.predict, or one by one when sampling."""
    prompts = {s.id: prompt_text(fmt, s) for s in samples}
    refs = {s.id: s.answer for s in samples}

    def rows(results):
        for r in results:
            emit({"id": r["id"], "prompt": prompts[r["id"]], "answer": r["raw"], "reference": refs[r["id"]]})

    from tqdm import tqdm

    with tqdm(total=len(samples), unit="sample", file=sys.stderr, disable=len(samples) < 2 or None) as bar:
        if args.temperature > 0:
            for s in samples:
                rows([{"id": s.id, "raw": generate_one(model, fmt, s, args.max_new_tokens, args.temperature,
                                                       decoding=args.decoding)}])
                bar.update(1)
        else:
            predict(model, fmt, samples, None, "generate", args.batch_size, args.max_new_tokens, on_batch=rows,
                    progress=bar.update, decoding=args.decoding)


def chat(model, fmt, args, image=None, read=None):
    """Interactive multi-turn chat on stdin/stdout; tokens are printed as they come."""
    from transformers import TextStreamer

    read = read or input  # looked up now, not at import: tests replace builtins.input
    plain = fmt.response_template is not None
    history: list[tuple[str, str]] = []
    print("chat: an empty line, 'exit' or Ctrl-D ends it", file=sys.stderr)
    while True:
        try:
            text = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not text.strip() or text.strip().lower() in ("exit", "quit"):
            return
        if plain:
            history = []  # trained single-turn: every line stands alone
        decoding = args.decoding
        while True:
            sample = Sample(id="chat", file="chat", turns=history + [("user", text)], image=image, needs_prompt=True)
            try:
                print("model> ", end="", flush=True)
                streamer = TextStreamer(fmt.tokenizer, skip_prompt=True, skip_special_tokens=True)
                answer = generate_one(model, fmt, sample, args.max_new_tokens, args.temperature, streamer,
                                      decoding)
                break
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
                print()
                answer = None
                break
            except DataError as e:
                if not history:
                    print(f"\nerror: {e}", file=sys.stderr)
                    answer = None
                    break
                history = history[2:]  # too long for the run's max length: forget the oldest exchange
        if answer is not None:
            history += [("user", text), ("assistant", answer)]


def main(argv=None):
    """Checks everything (the run, the image, the data) before the model loads, then answers or chats."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    bad = range_error(args)  # before anything is loaded (decoding options included)
    if bad:
        fail(bad)

    try:
        cfg, weights = find_run(args.checkpoint)
        prompts = load_prompts(cfg.get("prompts"))
        image = checked_image(args, cfg)
        samples = what_to_answer(args, cfg, prompts, image)
        model, tokenizer, processor = load_for_inference(cfg, str(weights))
    except (DataError, ModelError) as e:
        fail(str(e))
    args.max_new_tokens = args.max_new_tokens or generation_budget(cfg, None)
    args.decoding = decoding_of(args, cfg.get("classes"))  # a repetition penalty for free-text runs only
    fmt = Formatter(tokenizer, processor, cfg.get("response_template"), cfg.get("max_len") or 1024, prompts,
                    prefill=args.prefill if args.prefill is not None else cfg.get("prefill"))
    if samples is None:
        chat(model, fmt, args, image)
    else:
        write_answers(model, fmt, samples, args)


def checked_image(args, cfg) -> str | None:
    """--image as an absolute path, for a vision run."""
    if not args.image:
        return None
    image = Path(args.image).expanduser().resolve()
    if not image.is_file():
        fail(f"{args.image}: no such image file")
    if not cfg.get("vision"):
        fail(f"--image: {cfg['model']} is a text-only model")
    if args.data:
        fail("--image goes with --prompt, --text or the chat; data samples name their own images")
    return str(image)


def what_to_answer(args, cfg, prompts, image):
    """The samples of --data, or the one of --prompt / --text; None: the interactive chat."""
    if args.data:
        return sources.load_samples(args.data, prompts, require_answer=False,
                                    require_question=not cfg.get("response_template"),
                                    allow_outside=args.allow_outside_paths, columns=cfg.get("columns"))
    if args.prompt is None and args.text is None:
        return None
    if not (args.prompt or args.text or "").strip():
        fail("--prompt/--text: empty")
    turns = [("user", args.prompt if args.prompt is not None else "")]
    return [Sample(id="prompt" if args.prompt is not None else "text", file="command line", turns=turns, image=image,
                   document=args.text, needs_prompt=True)]


def write_answers(model, fmt, samples, args):
    """One prompt without -o: the answer alone on stdout; else one JSON line per sample, to -o or stdout."""
    try:
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        out = open(args.output, "w") if args.output else None
    except OSError as e:
        fail(f"{args.output}: cannot write ({e.strerror})")

    def emit(row):
        if out is None and args.data is None:
            print(row["answer"])
        else:
            print(json.dumps(row, ensure_ascii=False), file=out or sys.stdout, flush=True)

    try:
        answer_all(model, fmt, samples, args, emit)
    except DataError as e:
        fail(str(e))
    finally:
        if out:
            out.close()
    if args.output:
        print(f"wrote {len(samples)} rows to {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
