"""Loss, perplexity, bits per byte, and text metrics."""
