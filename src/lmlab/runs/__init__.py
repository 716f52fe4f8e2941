"""Everything a run leaves on disk and every command reads back.

    folder.py      run folders RUNS_DIR/NAME/RUN_ID, finding and naming runs
    checkpoint.py  atomic safetensors checkpoints, listing, pruning, safe loading
    load.py        a model and tokenizer back from a run or checkpoint (LoRA runs: base +
                   adapters)
    source.py      a base model to fine-tune: lmlab run, Hugging Face folder or Hub name
    metrics.py     the metrics log (metrics.jsonl) and its summary
    status.py      running / finished / interrupted / failed
    lock.py        one process trains in a run folder at a time
    catalog.py     summaries of runs for `lmlab runs` (list, show, compare, delete, clean)
    menu.py        the resume-or-new menu of `lmlab train` / `finetune` in a terminal
    device.py      devices, precisions, peak FLOP/s
    provenance.py  the lmlab commit a run or measurement came from

train/, eval/, generate/ (and fine-tuning and export) import this package; it imports
none of them.
"""
