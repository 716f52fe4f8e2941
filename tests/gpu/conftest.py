"""Fixtures of the GPU tier (`pytest -m gpu`): the CUDA device, with the process-wide CUDA
settings a test changes put back after it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch

NO_CUDA = "needs a CUDA device (torch.cuda.is_available() is False)"


@pytest.fixture
def cuda() -> Iterator[torch.device]:
    """The current CUDA device (skips without one).

    Building a training engine turns TF32 matmuls on for the whole process
    (lmlab.train.setup.configure_device) and some tests turn them off again, so the flags
    are restored afterwards; freed blocks go back to the driver, so that a test's memory
    is not left over for the next one.
    """
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    try:
        yield torch.device("cuda", torch.cuda.current_device())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        gc.collect()
        torch.cuda.empty_cache()
