"""A Hugging Face dataset placed in a local cache without the network, as `load_dataset("org/name")` leaves it.

    cache_hub_dataset(cache_dir, "org/tiny-task", {"train": rows, "test": rows})

builds the same folder a download writes (`<cache>/org___tiny-task/default/0.0.0/<hash>/` with dataset_info.json and
one Arrow file per split) through datasets' own parquet builder; `load_dataset("org/tiny-task")` then finds it when
HF_HUB_OFFLINE=1 and HF_DATASETS_CACHE=cache_dir.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def cache_hub_dataset(cache_dir, repo_id: str, splits: dict[str, list[dict]], features=None) -> Path:
    from datasets import Dataset
    from datasets.packaged_modules.parquet.parquet import Parquet

    with tempfile.TemporaryDirectory(prefix="hub-files-") as files:
        data_files = {}
        for split, rows in splits.items():
            data_files[split] = str(Path(files) / f"{split}.parquet")
            Dataset.from_list(rows, features=features).to_parquet(data_files[split])
        builder = Parquet(cache_dir=str(cache_dir), dataset_name=repo_id.split("/")[-1], repo_id=repo_id,
                          data_files=data_files, hash="0123456789abcdef")
        builder.download_and_prepare()
    # a Hub download's config folder is the config's name; the local-file builder appends a hash of the files
    built = Path(builder.cache_dir).parents[1]
    target = built.with_name("default")
    shutil.rmtree(target, ignore_errors=True)
    built.rename(target)
    return target
