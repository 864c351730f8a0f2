"""Reading and writing sentence-embedding models of either kind, by what a folder holds.

:func:`load_embedder` opens a saved static model (protege's, model2vec's or a sentence-transformers
``StaticEmbedding`` folder) with :func:`protege.models.static_embedding.load_static` and anything else
as a Transformer sentence encoder (:func:`protege.models.embedding.load_sentence_encoder`);
:func:`save_embedder` writes either in its own format. A module of its own: both model modules are
below it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .embedding import SentenceEmbedder, load_sentence_encoder, save_embedder
from .static_embedding import load_static

__all__ = ["is_static_folder", "load_embedder", "save_embedder"]


def is_static_folder(directory: Path) -> bool:
    """Whether ``directory`` holds a static model (model2vec's ``config.json``, or a
    sentence-transformers ``modules.json`` whose first module is a ``StaticEmbedding``)."""
    config, modules = directory / "config.json", directory / "modules.json"
    try:
        if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == "model2vec":
            return True
        if modules.is_file():
            first = json.loads(modules.read_text(encoding="utf-8"))[0]
            return "StaticEmbedding" in str(first.get("type", ""))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, IndexError, AttributeError, KeyError):
        return False
    return False


def load_embedder(directory: str | os.PathLike[str], max_length: int | None = None) -> SentenceEmbedder:
    """A saved sentence-embedding model: a static one (:func:`protege.models.static_embedding.load_static`:
    protege's, model2vec's or a sentence-transformers ``StaticEmbedding`` folder) or a Transformer one
    (:func:`load_sentence_encoder`)."""
    path = Path(directory).expanduser()
    if path.is_dir() and is_static_folder(path):
        return load_static(path)
    return load_sentence_encoder(path, max_length=max_length)
