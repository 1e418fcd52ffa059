"""A tiny CLIP tokenizer written to a folder (letters and word ends, no merges): what the tiny diffusers pipelines
of the tests need, with nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer


def tiny_clip_tokenizer(folder: Path, max_length: int = 8) -> tuple[CLIPTokenizer, int]:
    """(the tokenizer, its vocabulary size)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length), len(vocab)
