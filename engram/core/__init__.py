"""Addressing: the compression tokenizer and the multi-head N-gram hash mapping (DESIGN.md §2)."""
