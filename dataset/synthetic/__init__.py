"""Synthetic datasets in the real on-disk formats, small enough for unit tests (one writer module per source)."""
