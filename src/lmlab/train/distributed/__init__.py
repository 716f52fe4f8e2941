"""Everything multi-process lives here, applied from outside the model.

    runtime.py      process group set-up from torchrun's environment, small collectives
    parallelize.py  activation checkpointing -> torch.compile -> DDP / ZeRO-1 / FSDP2, in
                    that fixed order, and the optimizer that goes with the strategy
    state.py        full (unsharded) weights and optimizer state for checkpoints, so a run
                    saved with K processes resumes with any other number and strategy
    launch.py       `--nproc K`: start torchrun for the user and report a failed worker

The model files know nothing of this: the same GPT-2 and LLaMA modules run on a laptop
and on many GPUs.
"""
