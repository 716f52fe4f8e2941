"""Model families (one file each), presets and Hugging Face conversion. Single-device code only."""
