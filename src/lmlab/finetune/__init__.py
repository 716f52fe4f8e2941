"""Fine-tuning a trained model (`lmlab finetune`), on top of the training loop.

    data.py    prompt/completion, chat and text records, preference pairs; chat templates,
               loss masks, padded batches with exact resume
    task.py    the fine-tuning Task for train/loop.py: the base model (lmlab.runs.source),
               LoRA adapters (lmlab.model.lora), masked SFT loss or DPO, adapter checkpoints
    dpo.py     the DPO loss, sequence log-probabilities, the reference model

LoRA itself lives in lmlab.model.lora, beside the models it adapts (loading a LoRA run for
eval or generate needs it below runs/); exporting adapters for PEFT lives in lmlab.export.
"""
