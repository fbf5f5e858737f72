"""Build the small "which fortune category?" classification dataset in data/fortunes/.

The texts come from Debian's ``fortunes`` package (fortune-mod, BSD licence; see LICENSE here).
To regenerate train.jsonl / validation.jsonl / test.jsonl from scratch:

    mkdir -p /tmp/fort && cd /tmp/fort && apt-get download fortunes fortunes-min \\
        && for f in *.deb; do dpkg -x $f x; done
    cd /path/to/repo
    uv run python data/fortunes/make_fortunes.py /tmp/fort/x/usr/share/games/fortunes

Four categories (computers, food, law, love); fortunes of 20..300 characters after cleaning;
duplicates dropped (a text found in two categories is dropped from both); per category 80 train,
15 validation and 25 test samples picked with a fixed seed, so the output is deterministic.
Each line: {"id": "<category>-<n>", "text": "<fortune>", "answer": "<category>"}.
"""

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

CATEGORIES = ["computers", "food", "law", "love"]
SPLITS = {"train": 80, "validation": 15, "test": 25}  # per category
MIN_CHARS, MAX_CHARS = 20, 300
SEED = 0
OUT_DIR = Path(__file__).resolve().parent


def decode(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    # A few entries are UTF-8 encoded twice or more ("donÃ¢ÂÂt"): undo that while it round-trips.
    while True:
        try:
            fixed = text.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return text
        if fixed == text:
            return text
        text = fixed


def clean(fortune: str) -> str | None:
    """Tidy one fortune; None if it is unusable (terminal tricks, binary junk)."""
    # Overstrike underlining from the teletype days: "_\bI" or "___\b\b\bnot" -> "I", "not".
    while re.search(r"[^\x08\n]\x08", fortune):
        fortune = re.sub(r"[^\x08\n]\x08", "", fortune)
    lines = [" ".join(line.split()) for line in fortune.split("\n")]  # tabs/indents -> one space
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()  # at most one blank line in a row
    if re.search(r"[\x00-\x09\x0b-\x1f\x7f]", text):  # bells, escapes, leftover backspaces
        return None
    return text


def read_category(directory: Path, name: str) -> list[str]:
    text = decode((directory / name).read_bytes())
    fortunes = re.split(r"^%[ \t]*$", text.replace("\r\n", "\n"), flags=re.MULTILINE)
    kept = (clean(f) for f in fortunes)
    return [t for t in kept if t and MIN_CHARS <= len(t) <= MAX_CHARS]


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    directory = Path(sys.argv[1])
    per_cat = {c: list(dict.fromkeys(read_category(directory, c))) for c in CATEGORIES}
    seen = Counter(t for texts in per_cat.values() for t in texts)
    rng = random.Random(SEED)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for cat in CATEGORIES:
        texts = sorted(t for t in per_cat[cat] if seen[t] == 1)
        rng.shuffle(texts)
        need = sum(SPLITS.values())
        if len(texts) < need:
            sys.exit(f"{cat}: only {len(texts)} usable fortunes, need {need}")
        start = 0
        for split, n in SPLITS.items():
            for i in range(start, start + n):
                splits[split].append({"id": f"{cat}-{i}", "text": texts[i], "answer": cat})
            start += n
    for split, rows in splits.items():
        rows.sort(key=lambda r: r["id"])
        random.Random(SEED).shuffle(rows)  # mix the classes, same order every run
        with open(OUT_DIR / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{split}: {len(rows)} rows, {dict(Counter(r['answer'] for r in rows))}")


if __name__ == "__main__":
    main()
