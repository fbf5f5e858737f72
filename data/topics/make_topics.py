"""Build the second classification task, "which topic?", in the RVL-CDIP OCR layout (data/topics/).

Five of Debian's fortune files (fortune-mod, BSD licence; see ../fortunes/LICENSE) are the classes: education,
medicine, politics, science and sports. The texts are cleaned exactly as in ../fortunes/make_fortunes.py (the
same helpers); a text found in two of the files is dropped. To regenerate:

    mkdir -p /tmp/fort && cd /tmp/fort && apt-get download fortunes && for f in *.deb; do dpkg -x $f x; done
    cd /path/to/repo
    uv run python data/topics/make_topics.py /tmp/fort/x/usr/share/games/fortunes

Layout: train_NNNN_<class index>_aws.json / validation_... / test_..., each {"ocr": "<text>"}, the class index
into classes.txt; per class 30 train, 6 validation and 16 test files, picked with a fixed seed.
"""
import json
import random
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fortunes"))
from make_fortunes import read_category  # noqa: E402  (the same cleaning as the fortunes task)

CLASSES = ["education", "medicine", "politics", "science", "sports"]
SPLITS = {"train": 30, "validation": 6, "test": 16}  # per class (medicine has 52 usable texts)
SEED = 0
OUT_DIR = Path(__file__).resolve().parent


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    per_cat = {c: list(dict.fromkeys(read_category(Path(sys.argv[1]), c))) for c in CLASSES}
    seen = Counter(t for texts in per_cat.values() for t in texts)
    rng = random.Random(SEED)
    rows = {s: [] for s in SPLITS}
    for idx, cat in enumerate(CLASSES):
        texts = sorted(t for t in per_cat[cat] if seen[t] == 1)
        rng.shuffle(texts)
        if len(texts) < sum(SPLITS.values()):
            sys.exit(f"{cat}: only {len(texts)} usable fortunes, need {sum(SPLITS.values())}")
        start = 0
        for split, n in SPLITS.items():
            rows[split] += [(idx, t) for t in texts[start:start + n]]
            start += n
    for f in OUT_DIR.glob("*_aws.json"):
        f.unlink()
    for split, items in rows.items():
        random.Random(SEED).shuffle(items)
        for n, (idx, text) in enumerate(items):
            (OUT_DIR / f"{split}_{n:04d}_{idx}_aws.json").write_text(json.dumps({"ocr": text}, ensure_ascii=False))
        print(f"{split}: {len(items)} files")
    (OUT_DIR / "classes.txt").write_text("\n".join(CLASSES) + "\n")


if __name__ == "__main__":
    main()
