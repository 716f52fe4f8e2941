"""Corpora (incl. the practice languages), tokenizers, token shards and the loader."""
