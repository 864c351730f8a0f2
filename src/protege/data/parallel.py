"""Parallel sentences (the same sentence in several languages): data for a multilingual text student.

A multilingual student learns to embed a sentence in any language where the teacher embeds its
English version (Reimers & Gurevych, "Making Monolingual Sentence Embeddings Multilingual using
Knowledge Distillation", 2020). :func:`load_parallel_corpus` gives train/val lists of records,
each a ``{language: text}`` dict, from:

- ``"hsk"``: the HSK sentence pairs of the ``hsk-sentences-audio`` package (4,354 Chinese
  sentences for learners, HSK levels 1–6, each with an English translation; data CC-BY-SA-4.0):
  ``pip install hsk-sentences-audio``. Languages ``zh`` and ``en``.
- a ``.jsonl`` file, one record per line: ``{"en": "...", "zh": "...", ...}`` (other keys are
  ignored; every requested language must be a non-empty string).

Records repeated exactly are kept once (HSK has 2 such pairs: 4,352 distinct pairs remain).
Records that share a sentence in any language (HSK has ~100 English sentences with two Chinese
versions) stay on the same side of the split, so no validation sentence is seen in training.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ..errors import ProtegeError
from ..files import jsonl_objects

__all__ = ["HSK_LANGUAGES", "load_parallel_corpus", "read_parallel_jsonl", "read_hsk", "split_parallel"]

HSK_LANGUAGES = ("zh", "en")
Record = dict[str, str]


def read_hsk(languages: Sequence[str] = HSK_LANGUAGES) -> list[Record]:
    """Every HSK item of ``hsk-sentences-audio`` as ``{"zh": chinese, "en": translation}`` (file order)."""
    unknown = [lang for lang in languages if lang not in HSK_LANGUAGES]
    if unknown:
        raise ProtegeError(
            f"the hsk corpus has {' and '.join(HSK_LANGUAGES)} only, not {', '.join(unknown)}; "
            "give a .jsonl file of your own for other languages"
        )
    try:
        root = resources.files("hsk_sentences_audio")
    except ModuleNotFoundError:
        raise ProtegeError(
            "the hsk corpus comes with the hsk-sentences-audio package: pip install hsk-sentences-audio"
        ) from None
    items = json.loads((root / "data" / "sentences.json").read_text(encoding="utf-8"))
    records = []
    for item in items:
        texts = {"zh": item.get("chinese"), "en": (item.get("translation") or {}).get("en")}
        if all(isinstance(texts[lang], str) and texts[lang].strip() for lang in languages):
            records.append({lang: str(texts[lang]).strip() for lang in languages})
    return records


def read_parallel_jsonl(path: str | Path, languages: Sequence[str]) -> list[Record]:
    """The records of a ``.jsonl`` file, one ``{language: text}`` object per line (blank lines skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ProtegeError(f"parallel corpus not found: {path} (give hsk or a .jsonl file)")
    records = []
    for n, record in jsonl_objects(path):
        missing = [
            lang for lang in languages if not (isinstance(record.get(lang), str) and record[lang].strip())
        ]
        if missing:
            raise ProtegeError(
                f"{path}:{n} has no {' or '.join(repr(m) for m in missing)} text (each line needs a non-empty "
                f"string for every language: {', '.join(languages)})"
            )
        records.append({lang: record[lang].strip() for lang in languages})
    if not records:
        raise ProtegeError(f"{path} holds no record")
    return records


def split_parallel(
    records: Sequence[Record], val_fraction: float = 0.1, split_seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Distinct records, split into train and val: records sharing a text (in any language) are kept
    together; about ``val_fraction`` of them (at least one group when > 0) go to val."""
    if not 0 <= val_fraction < 1:
        raise ProtegeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    distinct = list({tuple(sorted(r.items())): r for r in records}.values())
    parent = list(range(len(distinct)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, record in enumerate(distinct):
        for item in record.items():
            j = first.setdefault(item, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(distinct)):
        groups.setdefault(root(i), []).append(i)
    order = list(groups.values())
    random.Random(split_seed).shuffle(order)
    want = round(val_fraction * len(distinct))
    if val_fraction > 0:
        want = max(want, 1)
    val: set[int] = set()
    for group in order:
        if len(val) >= want:
            break
        val.update(group)
    train = [distinct[i] for i in range(len(distinct)) if i not in val]
    return train, [distinct[i] for i in sorted(val)]


def load_parallel_corpus(
    source: str | Path = "hsk",
    languages: Sequence[str] = HSK_LANGUAGES,
    split_seed: int = 0,
    val_fraction: float = 0.1,
) -> tuple[list[Record], list[Record]]:
    """Train and val records (``{language: text}`` dicts) of ``"hsk"`` or a ``.jsonl`` file (module
    docstring)."""
    languages = tuple(languages)
    if len(languages) < 2 or len(set(languages)) != len(languages):
        raise ProtegeError(f"a parallel corpus needs two or more distinct languages, got {list(languages)}")
    if str(source) == "hsk":
        records = read_hsk(languages)
    elif Path(source).suffix.lower() == ".jsonl":
        records = read_parallel_jsonl(source, languages)
    else:
        raise ProtegeError(
            f"parallel corpus {str(source)!r}: give hsk or a .jsonl file of {{language: text}} lines"
        )
    return split_parallel(records, val_fraction, split_seed)
