"""Text corpora: built-in unlabelled and labelled texts, and the readers of users' text files.

A corpus is a list of :class:`TextRecord`: a text, where it came from, and its labels (probe name ->
class index; empty for unlabelled text). Tasks that read text (``embedding``, ``lm``) read it here.

**Built-in corpora** (:data:`BUILTIN_CORPORA`, :func:`builtin_corpus`), all offline:

``pydoc-topics``
    The Python reference's topic pages bundled with the standard library (``pydoc_data.topics``,
    ~465k characters): every blank-line separated paragraph, whitespace-normalised, 40..2000
    characters, heading underlines dropped; ~1,500 texts (Python 3.11), unlabelled.
``stdlib-docstrings``
    Docstrings of the standard library's own modules, classes and functions, read from the ``.py``
    sources under ``sysconfig.get_paths()["stdlib"]`` with :mod:`ast` (nothing is imported), test
    packages (``test/``, ``tests/``, ``idle_test/``, ``test_*.py``), ``site-packages`` and
    ``pydoc_data`` (the corpus above) skipped: the whole docstring when short, else its first
    paragraph, whitespace-normalised, 40..2000 characters, deduplicated, in (file, line) order and
    capped at :data:`STDLIB_DOCSTRING_LIMIT` texts (an evenly spaced subset); ~6,600 texts on
    Python 3.11, unlabelled. It depends on the Python version that runs it.
``hsk-en``
    The English translations of the ``hsk-sentences-audio`` package's 4,354 Mandarin example
    sentences (rows whose translation is the package's ``placeholder`` dropped, duplicates removed:
    ~4,200 texts), labelled ``hsk_topic`` (index of the sentence's topic in the sorted list of the 19
    topics) and ``hsk_level`` (HSK level - 1, 0..5).
``sdg``
    The 1,251 paragraphs of ``sdgclassification-benchmark`` (``benchmark.csv``: id, text, sdg, label),
    each paired with one UN Sustainable Development Goal and whether it is about it. Rows about their
    goal (``label`` True) carry ``{"sdg": goal - 1}`` (17 classes); the others carry no label and
    serve as unlabelled text. 1,247 distinct texts (a text paired twice keeps a labelled row: 615 labelled).

**Parts.** Each built-in corpus has a fixed 70 % ``train`` / 30 % ``test`` split (``seed`` 0 unless
asked otherwise), stratified by the corpus's first label (``hsk_topic``, ``sdg``; unlabelled ``sdg``
rows form one more stratum) and random for the unlabelled corpora: the same lists on every call and
machine (for the same package data and Python). The ``train`` part is what distillation may read;
the ``test`` part is held out: fidelity is measured on it, and a probe is fitted on the labelled
texts of ``train`` and scored on those of ``test``. ``all`` is both.

**User files** (:func:`read_texts`): a text file or a folder of them (one text per non-empty line,
blank-line separated paragraph or whole file), ``.jsonl`` files (a field of each object, optional
label fields) or a HuggingFace dataset saved with ``save_to_disk``. They have no parts: the task
splits them. :func:`load_corpora` mixes built-in names and paths.

The lower-level readers (:func:`files_under`, :func:`read_utf8`, :func:`text_documents`,
:func:`jsonl_records`, :func:`hf_records`) give raw records, e.g. the ``lm`` task's
prompt/completion or chat objects.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import functools
import gc
import importlib.resources
import io
import json
import os
import re
import sysconfig
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ProtegeError, closest
from ..files import jsonl_objects
from .sources import open_saved_dataset
from .splits import stratified_split

__all__ = [
    "BUILTIN_CORPORA",
    "PARTS",
    "STDLIB_DOCSTRING_LIMIT",
    "TEXT_UNITS",
    "TextRecord",
    "builtin_corpus",
    "dedupe",
    "files_under",
    "hf_records",
    "jsonl_records",
    "load_corpora",
    "read_texts",
    "read_utf8",
    "stdlib_docstrings",
    "text_documents",
]

#: the built-in corpora :func:`builtin_corpus` reads (module docstring)
BUILTIN_CORPORA = ("pydoc-topics", "stdlib-docstrings", "hsk-en", "sdg")
#: the parts of a built-in corpus
PARTS = ("all", "train", "test")
#: how :func:`read_texts` cuts a text file into texts
TEXT_UNITS = ("line", "paragraph", "file")
#: the most ``stdlib-docstrings`` texts kept (an evenly spaced subset beyond it)
STDLIB_DOCSTRING_LIMIT = 30_000
#: share of each built-in corpus held out as its ``test`` part
TEST_FRACTION = 0.3
#: length bounds (characters) of a built-in corpus's texts
MIN_CHARS, MAX_CHARS = 40, 2000
#: a docstring up to this long is kept whole, a longer one is cut to its first paragraph
SHORT_DOCSTRING = 300

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
_SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "pydoc_data"}
)
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
#: a reStructuredText heading's underline (``*****``, ``=====``...) in the pydoc topics
_UNDERLINE = re.compile(r"^[ \t]*([*=~^\-\"'`#+])\1{2,}[ \t]*$", re.MULTILINE)


@dataclass(frozen=True)
class TextRecord:
    """One text of a corpus.

    Attributes:
        text: the text.
        source: where it came from: ``"<corpus>:<id>"`` for a built-in corpus, ``"<file>:<line>"``
            (or the file, or ``"<dataset>[<split>]:<row>"``) for a user's file.
        labels: probe name -> class index (``{"hsk_topic": 3, "hsk_level": 0}``); empty for
            unlabelled text.
    """

    text: str
    source: str
    labels: dict[str, int] = field(default_factory=dict)


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _paragraphs(text: str) -> list[str]:
    return _BLANK_LINE.split(text.replace("\r\n", "\n"))


def dedupe(records: Iterable[TextRecord]) -> list[TextRecord]:
    """``records`` without exact duplicates of a text, the first of each kept (order kept)."""
    seen: set[str] = set()
    kept: list[TextRecord] = []
    for record in records:
        if record.text not in seen:
            seen.add(record.text)
            kept.append(record)
    return kept


# --------------------------------------------------------------------------- built-in corpora


def _pydoc_topics() -> list[TextRecord]:
    import pydoc_data.topics

    topics: Mapping[str, str] = pydoc_data.topics.topics
    records = []
    for name in sorted(topics):
        for k, paragraph in enumerate(_paragraphs(_UNDERLINE.sub("", topics[name]))):
            text = _normalise(paragraph)
            if MIN_CHARS <= len(text) <= MAX_CHARS:
                records.append(TextRecord(text, f"pydoc-topics:{name}#{k}"))
    return dedupe(records)


def _stdlib_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS and not d.startswith("."))
        files += [Path(folder) / n for n in sorted(names) if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``(line, docstring)`` of a module and of every class and function in it, nested or under
    ``if``/``try``/``with`` blocks (statements only: nothing inside expressions is a definition)."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield 1, doc
    stack: list[ast.stmt] = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, _DEFINITIONS):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield node.lineno, doc
        children: list[ast.stmt] = []
        for name in ("body", "orelse", "finalbody"):
            value = getattr(node, name, None)
            if isinstance(value, list):
                children += value
        for handler in getattr(node, "handlers", None) or ():
            children += handler.body
        for case in getattr(node, "cases", None) or ():
            children += case.body
        stack += reversed(children)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: parsing allocates millions of (acyclic) AST nodes, and
    each collection they trigger walks every object of the process (torch's, ...): 2x slower."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.lru_cache(maxsize=1)
def _all_stdlib_docstrings() -> tuple[TextRecord, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    records: list[TextRecord] = []
    with _gc_paused(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. invalid escape sequences in old modules
        for path in _stdlib_files(root):
            try:
                tree = ast.parse(path.read_bytes(), filename=str(path))
            except (SyntaxError, ValueError, OSError):
                continue
            rel = path.relative_to(root).as_posix()
            for line, doc in sorted(_docstrings(tree), key=lambda item: item[0]):
                whole = _normalise(doc)
                text = whole if len(whole) <= SHORT_DOCSTRING else _normalise(_paragraphs(doc)[0])
                if MIN_CHARS <= len(text) <= MAX_CHARS:
                    records.append(TextRecord(text, f"stdlib-docstrings:{rel}:{line}"))
    return tuple(dedupe(records))


def stdlib_docstrings(limit: int = STDLIB_DOCSTRING_LIMIT) -> list[TextRecord]:
    """The ``stdlib-docstrings`` corpus (module docstring), at most ``limit`` texts (evenly spaced
    over the (file, line) order when there are more). Parses ~700 files the first time (~2 s of
    CPU), then served from a per-process cache. A file the running Python cannot parse is skipped."""
    if limit < 1:
        raise ProtegeError(f"limit must be a whole number >= 1, got {limit!r}")
    records = _all_stdlib_docstrings()
    if len(records) <= limit:
        return list(records)
    return [records[i * len(records) // limit] for i in range(limit)]


def _hsk_en() -> list[TextRecord]:
    try:
        data = importlib.resources.files("hsk_sentences_audio") / "data" / "sentences.json"
        items = json.loads(data.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ProtegeError(
            f"the hsk-en corpus needs the hsk-sentences-audio package ({e}): pip install hsk-sentences-audio"
        ) from None
    topics = sorted({str(item["topic"]) for item in items})
    records = []
    for item in items:
        text = _normalise(str(item["translation"]["en"]))
        if not text or text == "placeholder":  # rows the package has not translated yet
            continue
        labels = {"hsk_topic": topics.index(str(item["topic"])), "hsk_level": int(item["hsk_level"]) - 1}
        records.append(TextRecord(text, f"hsk-en:{item['id']}", labels))
    return dedupe(records)


def _sdg() -> list[TextRecord]:
    try:
        data = importlib.resources.files("sdgclassification.benchmark.resources") / "benchmark.csv"
        rows = list(csv.DictReader(io.StringIO(data.read_text(encoding="utf-8"))))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise ProtegeError(
            f"the sdg corpus needs the sdgclassification-benchmark package ({e}): "
            "pip install sdgclassification-benchmark"
        ) from None
    by_text: dict[str, TextRecord] = {}
    for row in rows:
        text = _normalise(row["text"])
        labels = {"sdg": int(row["sdg"]) - 1} if row["label"].strip().lower() == "true" else {}
        if text and (text not in by_text or (labels and not by_text[text].labels)):
            by_text[text] = TextRecord(text, f"sdg:{row['id']}", labels)  # a labelled row wins
    return list(by_text.values())


_READERS = {"pydoc-topics": _pydoc_topics, "hsk-en": _hsk_en, "sdg": _sdg}


@functools.lru_cache(maxsize=16)
def _parts(name: str, seed: int) -> dict[str, tuple[TextRecord, ...]]:
    records = stdlib_docstrings() if name == "stdlib-docstrings" else _READERS[name]()
    strata = [next(iter(r.labels.values()), -1) for r in records]
    train, test = stratified_split(strata, TEST_FRACTION, seed)
    return {
        "all": tuple(records),
        "train": tuple(records[i] for i in train),
        "test": tuple(records[i] for i in test),
    }


def builtin_corpus(name: str, part: str = "all", *, seed: int = 0) -> list[TextRecord]:
    """The ``part`` (``all``, ``train`` or ``test``) of built-in corpus ``name`` (module docstring).

    The split is fixed by ``seed`` (0: the reference split; the same lists on every call). Records
    keep the corpus's order (``all``) or their order within it (``train``, ``test``)."""
    if name not in BUILTIN_CORPORA:
        near = closest(name, BUILTIN_CORPORA)
        hint = f" did you mean {near[0]!r}?" if near else ""
        raise ProtegeError(f"no built-in corpus {name!r}.{hint} Corpora: {', '.join(BUILTIN_CORPORA)}")
    if part not in PARTS:
        raise ProtegeError(f"a corpus part is all, train or test, not {part!r}")
    return list(_parts(name, int(seed))[part])


# --------------------------------------------------------------------------- users' files


def files_under(root: Path, suffix: str) -> list[Path]:
    """``[root]`` for a file, else the ``suffix`` files anywhere under folder ``root``, sorted; none
    is a :class:`ProtegeError`."""
    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())
    if not files:
        raise ProtegeError(f"no {suffix} file under {root}")
    return files


def read_utf8(path: Path) -> str:
    """The text of ``path`` (a UTF-8 byte-order mark dropped); a file that does not decode as
    UTF-8, or holds NUL bytes, is a :class:`ProtegeError` (a binary file given as text)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ProtegeError(
            f"{path} is not UTF-8 text (byte {e.start} cannot be decoded): give a text file, "
            "or convert it to UTF-8"
        ) from None
    except OSError as e:
        raise ProtegeError(f"cannot read {path}: {e.strerror or e}") from None
    if "\x00" in text:
        raise ProtegeError(f"{path} is not UTF-8 text (it holds NUL bytes: a binary file?)")
    return text


def text_documents(root: Path) -> list[dict[str, Any]]:
    """``{"text": whole file}`` for the ``.txt`` file ``root`` or each one under folder ``root``."""
    return [{"text": read_utf8(p)} for p in files_under(root, ".txt")]


def _jsonl_lines(root: Path) -> Iterator[tuple[Path, int, dict[str, Any]]]:
    for path in files_under(root, ".jsonl"):
        for n, record in jsonl_objects(path):
            yield path, n, record


def jsonl_records(root: Path) -> list[dict[str, Any]]:
    """Every JSON object of the ``.jsonl`` file ``root`` or of those under folder ``root``; none at
    all is a :class:`ProtegeError`."""
    records = [record for _, _, record in _jsonl_lines(root)]
    if not records:
        raise ProtegeError(f"{root} holds no JSON record")
    return records


def hf_records(root: Path, extra: str) -> dict[str, list[dict[str, Any]]]:
    """The rows of a HuggingFace dataset saved with ``save_to_disk`` at ``root``, per split
    (``train``, and ``val``/``test`` when it has them: :func:`protege.data.sources.open_saved_dataset`);
    ``extra`` names the pip extra that installs ``datasets``."""
    _, splits, _ = open_saved_dataset(root, extra)
    return {split: ds.to_list() for split, ds in splits.items()}


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _text_of(value: Any, field_name: str, where: str) -> str:
    if not isinstance(value, str):
        raise ProtegeError(f"{where}: {field_name!r} must be a string, not {type(value).__name__}")
    return value.strip()


def _units(path: Path, unit: str) -> Iterator[tuple[str, str]]:
    """``(text, source)`` of a text file cut into ``unit``s."""
    text = read_utf8(path)
    if unit == "file":
        yield text.strip(), str(path)
        return
    lines = text.splitlines()
    if unit == "line":
        for n, line in enumerate(lines, start=1):
            yield line.strip(), f"{path}:{n}"
        return
    start, block = 0, []
    for n, line in enumerate([*lines, ""], start=1):
        if line.strip():
            start = start or n
            block.append(line.strip())
        elif block:
            yield " ".join(block), f"{path}:{start}"
            start, block = 0, []


def _hf_rows(
    root: Path, text_field: str, label_fields: Sequence[str], split: str | None
) -> Iterator[tuple[str, dict[str, Any], str]]:
    _, splits, _ = open_saved_dataset(root, "protege[embedding]")
    if split is not None and split not in splits:
        raise ProtegeError(f"{root} has no split {split!r} (splits: {', '.join(splits)})")
    for name, ds in splits.items():
        if split is not None and name != split:
            continue
        for column in (text_field, *label_fields):
            if column not in ds.column_names:
                option = "text_field" if column == text_field else "label_fields"
                raise ProtegeError(
                    f"column {column!r} not in {root} (columns: {', '.join(ds.column_names)}); set {option}"
                )
        columns = {c: ds[c] for c in (text_field, *label_fields)}
        for i, value in enumerate(columns[text_field]):
            where = f"{root}[{name}] row {i}"
            labels = {f: columns[f][i] for f in label_fields}
            yield _text_of(value, text_field, where), labels, f"{root}[{name}]:{i}"


def _label_indices(
    raw: list[dict[str, Any]], label_fields: Sequence[str], path: Path
) -> list[dict[str, int]]:
    """Each field's values as class indices: whole numbers >= 0 as they are when all of them are,
    else their strings' positions in sorted order. A missing or null value is no label."""
    out: list[dict[str, int]] = [{} for _ in raw]
    for name in label_fields:
        values = [r[name] for r in raw if r.get(name) is not None]
        if not values:
            raise ProtegeError(f"no text of {path} has the label field {name!r}: check label_fields")
        plain = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
        index = {} if plain else {c: i for i, c in enumerate(sorted({str(v) for v in values}))}
        for labels, r in zip(out, raw):
            if r.get(name) is not None:
                labels[name] = int(r[name]) if plain else index[str(r[name])]
    return out


def read_texts(
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    unit: str = "line",
    label_fields: Sequence[str] = (),
    split: str | None = None,
    min_chars: int = 1,
) -> list[TextRecord]:
    """The texts of a user's file or folder, in file order.

    - a text file (``.txt`` or any other suffix but ``.jsonl``) or a folder: its ``.txt`` and
      ``.jsonl`` files (sorted paths, subfolders included). ``unit`` cuts a text file: ``line`` (each
      non-empty line), ``paragraph`` (blank-line separated blocks, their lines joined by a space) or
      ``file`` (the whole file). Texts are stripped of surrounding whitespace.
    - ``.jsonl``: the ``text_field`` of each object is one text; ``label_fields`` name fields whose
      values become labels (whole numbers >= 0 as they are, otherwise classes numbered in the sorted
      order of their strings; a missing or null value is no label).
    - a HuggingFace dataset folder saved with ``save_to_disk``: the ``text_field`` column of all its
      splits (``train``, ``val``, ``test``), or of ``split``; ``label_fields`` as for jsonl.

    Texts shorter than ``min_chars`` characters (after stripping) are dropped. A missing path, a file
    that is not UTF-8 text, a record without ``text_field`` (its line named), a text that is not a
    string and no text at all are :class:`ProtegeError`s saying what to do.
    """
    root = Path(path).expanduser()
    if unit not in TEXT_UNITS:
        raise ProtegeError(f"unit must be line, paragraph or file, not {unit!r}")
    if not root.exists():
        raise ProtegeError(f"text path not found: {root}")
    label_fields = [str(f) for f in label_fields]
    rows: list[tuple[str, dict[str, Any], str]] = []
    if _is_saved_dataset(root):
        rows += _hf_rows(root, text_field, label_fields, split)
    else:
        files = (
            [root]
            if root.is_file()
            else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        )
        if not files:
            raise ProtegeError(f"no .txt or .jsonl file under {root}: give text files or a saved HF dataset")
        for file in files:
            if file.suffix != ".jsonl":
                rows += [(text, {}, source) for text, source in _units(file, unit)]
                continue
            for _, n, record in _jsonl_lines(file):
                where = f"{file}:{n}"
                if text_field not in record:
                    raise ProtegeError(
                        f"{where}: the record has no {text_field!r} field (fields: "
                        f"{', '.join(map(repr, record)) or 'none'}); name the text field with text_field"
                    )
                text = _text_of(record[text_field], text_field, where)
                rows.append((text, {f: record.get(f) for f in label_fields}, where))
    rows = [row for row in rows if row[0] and len(row[0]) >= min_chars]
    if not rows:
        raise ProtegeError(f"{root} holds no text (empty, or every text shorter than {min_chars} characters)")
    labels = _label_indices([r[1] for r in rows], label_fields, root)
    return [TextRecord(text, source, lab) for (text, _, source), lab in zip(rows, labels)]


def load_corpora(
    names_or_paths: Sequence[str | os.PathLike[str] | Mapping[str, Any]],
    part: str,
    *,
    seed: int = 0,
    **read_options: Any,
) -> list[TextRecord]:
    """The ``part`` of several corpora, concatenated in the order given (duplicates kept: see
    :func:`dedupe`).

    Each entry is a built-in corpus name (its ``part``), a path (read by :func:`read_texts` with
    ``read_options``) or ``{"path": ..., "part": "train" | "test" | "all", ...read options}``. A user's
    file has no parts of its own: a plain path is training text, given for ``train`` and ``all`` and
    not for ``test`` (a task that needs held-out text splits it itself); mark a file of held-out
    text with ``"part": "test"``."""
    if part not in PARTS:
        raise ProtegeError(f"a corpus part is all, train or test, not {part!r}")
    records: list[TextRecord] = []
    for entry in names_or_paths:
        if isinstance(entry, str) and entry in BUILTIN_CORPORA:
            records += builtin_corpus(entry, part, seed=seed)
            continue
        options = dict(read_options)
        if isinstance(entry, Mapping):
            options.update({k: v for k, v in entry.items() if k not in ("path", "part")})
            if "path" not in entry:
                raise ProtegeError(f"a corpus given as a mapping needs a path: {dict(entry)!r}")
            where, given = entry["path"], str(entry.get("part", "train"))
            if given not in PARTS:
                raise ProtegeError(f"the part of {where} is all, train or test, not {given!r}")
        else:
            where, given = entry, "train"
        if part == "all" or given in ("all", part):
            path = Path(where).expanduser()
            if not path.exists() and isinstance(where, str):
                near = closest(where, BUILTIN_CORPORA)
                hint = f" (did you mean the built-in corpus {near[0]!r}?)" if near else ""
                raise ProtegeError(
                    f"{where!r} is neither a built-in corpus ({', '.join(BUILTIN_CORPORA)}) nor an "
                    f"existing file or folder{hint}"
                )
            records += read_texts(path, **options)
    return records
