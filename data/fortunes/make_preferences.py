"""DPO example pairs from the fortunes training split: chosen = the right category, rejected = a wrong one.

    uv run python data/fortunes/make_preferences.py      # writes data/fortunes/preferences.jsonl
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
CLASSES = HERE.joinpath("classes.txt").read_text().split()
rng = random.Random(0)
rows = [json.loads(line) for line in HERE.joinpath("train.jsonl").read_text().splitlines()][:96]
with open(HERE / "preferences.jsonl", "w") as f:
    for r in rows:
        wrong = rng.choice([c for c in CLASSES if c != r["answer"]])
        f.write(json.dumps({"id": r["id"], "prompt": "Which category does this fortune belong to: computers, food, "
                            "law or love? Answer with the category name only.\n\n" + r["text"],
                            "chosen": r["answer"], "rejected": wrong}, ensure_ascii=False) + "\n")
