"""lmlab: train language models end to end, from a folder of text to an evaluated model."""

__version__ = "0.1.0"
