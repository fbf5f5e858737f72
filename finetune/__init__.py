"""The library behind the four commands (train.py, eval.py, generate.py, export.py at the top of the repository).

Layers (tests/test_layers.py keeps them so):
    entry scripts   train.py, eval.py, generate.py, export.py; rewards.py (the user's GRPO rewards: train.py loads
                    them and hands the functions to the library)
    finetune/       the modules below; they import dataset.py and each other, never an entry script
    dataset.py      the data layouts, validation, the prompt format and the loss mask; imports no project module

One job each; a concern has one owner:
    config.py      train.py's options as frozen dataclasses grouped by concern, and what the run derives from them
    modes.py       the training modes (SFT, classifier head, GRPO, DPO, KTO) behind one interface
    training.py    what we add to TRL's trainers: samplers, validation, saves, callbacks, the batch-size search
    runs.py        the run folder log/NAME/ (owner): every file in it named and written here, finding and resuming
    precision.py   every dtype decision (owner): training, weights, inference and export
    predict.py     scoring and generation over a data set, metrics (validation and eval.py share it)
    decoding.py    generation (owner): decoding defaults and flags, the budget rule, every model.generate call
    modeling.py    loading models (hub ids, folders, GGUF: its tokenizer and config converted once, cached), LoRA /
                   QLoRA / full, unsloth when it applies
    classifier.py  the sequence-classification head
    batching.py    collators, length-bucketed batches, the padding-free choice, inference batches by length
    tokenise.py    tokenising through datasets.map, and its on-disk cache
    sources.py     reading any source: Hub datasets, tables, JSON in other formats, column mapping, mixing, splits
    rl.py          GRPO (with its validation and reward checks), DPO and KTO through TRL
    datacheck.py   `dataset.py check`: what a run will train on (SFT, GRPO, DPO or KTO data), its report
    tokencheck.py  the check's token lengths as each trainer tokenises, and samples rendered as trained
    leakage.py     duplicates, leakage and noise (exact and MinHash near-duplicates), train.py's leakage line
    monitor.py     the plan before loading, the console line, curves.png, reward health, library noise silenced
    timeplan.py    the plan's time once the model has loaded, and the default bound of free-text validation
    progress.py    the progress line of every long phase (validation, eval, tokenising, loading the model)
    guards.py      Ctrl-C / SIGTERM saves, NaN stops, out-of-memory advice
    launch.py      torchrun / accelerate / one process, the device, and the batch plan
    options.py     command-line checks made before anything loads
    errors.py      ModelError: the one-line error of everything above the data (bad data: dataset.DataError)
    parity.py      does an export answer as the run did
    llamacpp.py    GGUF through llama.cpp's converter, Ollama Modelfile
    trl_cpu.py     TRL's Triton log-prob kernel replaced on CPU

Modules import only the standard library and each other at module level (torch, transformers, TRL, PEFT and
datasets inside the functions that use them), so every script's --help stays instant.
"""
