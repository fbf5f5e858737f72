"""The library behind the four commands (train.py, eval.py, generate.py, export.py at the top of the repository).

Users run those scripts and edit dataset.py, prompts.json and rewards.py; the modules here are what the scripts are
built from, one job each:

    modes.py       the four training modes (SFT, classifier head, GRPO, DPO) behind one interface
    training.py    what we add to TRL's trainers: samplers, validation, saves, callbacks, the batch-size search
    runs.py        the run folder log/NAME/: layout, atomic writes, finding and resuming a run
    modeling.py    loading models (hub ids, folders, GGUF), LoRA / QLoRA / full, unsloth when it applies
    classifier.py  the sequence-classification head
    batching.py    collators, length-bucketed batches, the padding-free choice
    tokenise.py    tokenising through datasets.map, and its on-disk cache
    sources.py     Hub datasets, parquet / CSV / Arrow tables, column mapping, mixing, validation splits
    predict.py     scoring and generation, metrics (train.py's validation and eval.py share it)
    rl.py          GRPO and DPO through TRL
    monitor.py     the plan before loading, the console line, curves.png, reward health
    guards.py      Ctrl-C / SIGTERM saves, NaN stops, out-of-memory advice
    launch.py      torchrun / accelerate / one process, and the batch plan
    options.py     command-line checks made before anything loads
    parity.py      does an export answer as the run did
    llamacpp.py    GGUF through llama.cpp's converter, Ollama Modelfile
    trl_cpu.py     TRL's Triton log-prob kernel replaced on CPU

Modules import only the standard library at module level, so every script's --help stays instant.
"""
