"""GGUF without a GPU: llama.cpp's own converter (convert_hf_to_gguf.py) on a merged model, plus an Ollama Modelfile.

The converter is llama.cpp's Python script with its `conversion` package and its `gguf-py`, taken at a pinned
version from the llama-cpp-python source distribution on PyPI (LLAMA_CPP_PYTHON below, checked against its
sha256). It is fetched once into the cache ($FINETUNE_CACHE, else $XDG_CACHE_HOME/finetune, else
~/.cache/finetune; see tokenise.cache_root), never vendored into this repository and never compiled: only the
Python scripts are extracted. FINETUNE_LLAMACPP_DIR=FOLDER uses the converter in FOLDER instead (a llama.cpp
checkout, say), and fetches the pinned one into it when it has none. They need gguf, numpy, sentencepiece, torch and transformers, which the base install
has; the converter puts its own gguf-py first on sys.path, so the converter and the gguf code it writes with come
from the same llama.cpp commit whatever `gguf` package is installed.

Types: f32, f16, bf16 and q8_0 (what the converter writes by itself; k-quants such as q4_k_m need the compiled
llama-quantize: run it on the f16 file, or export on a GPU with unsloth).

After conversion the stop tokens are written explicitly with gguf-py's gguf_new_metadata.py: EOS and EOT (end of
turn) = the run's end-of-turn token, pad = the run's pad token. The converter keeps the chat template
(tokenizer.chat_template) from the merged tokenizer. The Modelfile beside the GGUF gives Ollama the same prompt
format (rendered from the chat template, see modelfile), the run's system prompt and the stop token.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

from finetune.errors import ModelError
from finetune.tokenise import cache_root

LLAMA_CPP_PYTHON = ("0.3.36", "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")
PYPI = os.environ.get("FINETUNE_PYPI_JSON", "https://pypi.org/pypi")  # PyPI's JSON API (or a mirror of it)
QUANTS = ("f32", "f16", "bf16", "q8_0")
WANTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # under vendor/llama.cpp/ in the sdist


def converter_dir() -> Path:
    """The folder holding convert_hf_to_gguf.py, conversion/ and gguf-py/, fetched on first use."""
    version, sha = LLAMA_CPP_PYTHON
    if os.environ.get("FINETUNE_LLAMACPP_DIR"):
        folder = Path(os.environ["FINETUNE_LLAMACPP_DIR"]).expanduser()
    else:
        root = cache_root() or Path(tempfile.gettempdir()) / "finetune"  # FINETUNE_CACHE=off: a temp folder
        folder = root / "llama.cpp" / f"llama-cpp-python-{version}"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".fetch-"))
    try:
        sdist = tmp / "sdist.tar.gz"
        _download(version, sha, sdist)
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if (m.isfile() or m.isdir()) and m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(WANTED)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp / "out", members=members, filter="data")
        try:
            (tmp / "out").rename(folder)  # atomic: another process may have won the race, which is fine
        except OSError as e:
            if not (folder / "convert_hf_to_gguf.py").is_file():
                raise ModelError(f"{folder}: cannot put llama.cpp's converter there ({e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _download(version: str, sha: str, dest: Path):
    """The sdist's URL from PyPI's JSON API, then the file, checked against the pinned sha256."""
    try:
        api = f"{PYPI}/llama-cpp-python/json"  # the project's page (some mirrors lack the per-version one)
        with urllib.request.urlopen(api, timeout=60) as r:
            files = json.load(r)["releases"][version]
        url = next(urljoin(api, f["url"]) for f in files if f["packagetype"] == "sdist")
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=600) as r, open(dest, "wb") as f:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
    except (OSError, ValueError, KeyError, StopIteration) as e:
        raise ModelError(f"cannot fetch llama.cpp's converter (llama-cpp-python {version} from {PYPI}): {e}; "
                         "needs PyPI once, then it is cached") from None
    if digest.hexdigest() != sha:
        raise ModelError(f"llama-cpp-python {version} sdist: sha256 {digest.hexdigest()} is not the pinned {sha}")


def convert(merged: Path, outfile: Path, quant: str, tokenizer, say=print) -> Path:
    """merged HF folder -> outfile (.gguf) of type `quant`, with EOS / EOT / pad set from the tokenizer."""
    conv = converter_dir()
    _plain_byte_level(merged / "tokenizer.json")
    raw = outfile.with_name(outfile.stem + ".raw.gguf")
    say(f"gguf: converting with llama.cpp's convert_hf_to_gguf.py (llama-cpp-python {LLAMA_CPP_PYTHON[0]}) to "
        f"{quant}")
    _run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(merged), "--outfile", str(raw),
          "--outtype", quant], "convert_hf_to_gguf.py")
    ids = {"eos": tokenizer.eos_token_id, "eot": tokenizer.eos_token_id, "padding": tokenizer.pad_token_id}
    args = [a for name, i in ids.items() if i is not None for a in ("--special-token-by-id", name, str(i))]
    _run([sys.executable, str(conv / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"), str(raw),
          str(outfile), "--force", *args], "gguf_new_metadata.py")
    raw.unlink()
    return outfile


def _plain_byte_level(path: Path):
    """A byte-level BPE tokenizer marked byte_fallback (transformers' GGUF loader writes SmolLM2's so) is written
    without the mark: with a ByteLevel pre-tokenizer every byte has its own token, so the fallback never fires and
    the tokenizer encodes the same; but llama.cpp's converter reads the mark as a SentencePiece-style vocabulary
    (tokenizer.ggml.model "llama", no merges) instead of the GPT-2 BPE it is ("gpt2", pre "smollm" for SmolLM2)."""
    if not path.is_file():
        return
    tok = json.loads(path.read_text(encoding="utf-8"))
    model, pre = tok.get("model") or {}, json.dumps(tok.get("pre_tokenizer"))
    if model.get("type") == "BPE" and model.get("byte_fallback") and '"ByteLevel"' in pre:
        model["byte_fallback"] = False
        path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


def _run(cmd: list[str], what: str):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        lines = [line for line in (r.stderr or r.stdout).strip().splitlines() if line.strip()]
        raise ModelError(f"llama.cpp {what} failed: {lines[-1] if lines else f'exit status {r.returncode}'}")


def modelfile(gguf_name: str, tokenizer, cfg: dict) -> str:
    """An Ollama Modelfile: the GGUF, the prompt format of training (Ollama's Go template, rendered from the chat
    template so it holds the same text around the system prompt, the question and the reply), the run's system
    prompt and the end-of-turn stop."""
    eot = tokenizer.eos_token
    lines = [f"FROM ./{gguf_name}", ""]
    template = _go_template(tokenizer, cfg, eot)
    if template:
        lines += [f'TEMPLATE """{template}"""', ""]
    system = ((_read_prompts(cfg).get("system") or [None])[0])
    if system:
        lines += [f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{eot}"', "PARAMETER temperature 0", ""]
    return "\n".join(lines)


def _go_template(tokenizer, cfg, eot) -> str | None:
    """Ollama's template language is Go's, not Jinja: render the chat template around markers and cut the text at
    them (why by hand: no library translates Jinja templates to Go templates)."""
    if cfg.get("response_template"):  # the plain completion format: "<document>\n\n<template> <answer><eos>"
        return "{{ .Prompt }}\n\n" + cfg["response_template"] + " {{ .Response }}" + eot
    if not getattr(tokenizer, "chat_template", None):
        return None
    sys_m, user_m, reply_m = "\x01SYSTEM\x01", "\x01USER\x01", "\x01REPLY\x01"

    def render(messages, prompt=True):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    reply = render([{"role": "user", "content": user_m}, {"role": "assistant", "content": reply_m}], False)
    after_reply = reply.split(reply_m)[-1] if reply.count(reply_m) == 1 else eot  # "<|im_end|>\n" in ChatML
    plain = render([{"role": "user", "content": user_m}])
    with_sys = render([{"role": "system", "content": sys_m}, {"role": "user", "content": user_m}])
    if with_sys.count(sys_m) != 1 or plain.count(user_m) != 1:
        return None
    before_sys, rest = with_sys.split(sys_m)
    between, after_user = rest.split(user_m)
    no_sys_prefix, after_user_plain = plain.split(user_m)
    if after_user != after_user_plain or "{{" in with_sys + plain:
        return None
    return (f"{{{{ if .System }}}}{before_sys}{{{{ .System }}}}{between}{{{{ else }}}}{no_sys_prefix}{{{{ end }}}}"
            f"{{{{ .Prompt }}}}{after_user}{{{{ .Response }}}}{after_reply}")


def _read_prompts(cfg) -> dict:
    try:
        return json.loads(Path(cfg["prompts"]).read_text()) if cfg.get("prompts") else {}
    except (OSError, ValueError):
        return {}
