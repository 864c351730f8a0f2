"""Text corpora (protege.data.text): the built-in corpora against their packages' own data (sizes,
fixed stratified parts, labels of known rows), the standard library's docstrings read without
importing anything, and read_texts on text, jsonl and saved HF datasets, errors included."""

from __future__ import annotations

import csv
import importlib.resources
import inspect
import json
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from protege.data import text as T
from protege.data.text import (
    BUILTIN_CORPORA,
    TextRecord,
    builtin_corpus,
    dedupe,
    load_corpora,
    read_texts,
    stdlib_docstrings,
)
from protege.errors import ProtegeError

#: documented sizes (Python 3.11 and the pinned packages), loose enough for other Pythons
SIZES = {
    "pydoc-topics": (1000, 2500),
    "stdlib-docstrings": (3000, 30_000),
    "hsk-en": (4000, 4354),
    "sdg": (1240, 1251),
}
TEST_PACKAGES = {"test", "tests", "idle_test"}


def hsk_items() -> list[dict]:
    data = importlib.resources.files("hsk_sentences_audio") / "data" / "sentences.json"
    return json.loads(data.read_text(encoding="utf-8"))


def sdg_rows() -> list[dict]:
    data = importlib.resources.files("sdgclassification.benchmark.resources") / "benchmark.csv"
    with data.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------- built-in corpora


@pytest.mark.parametrize("name", BUILTIN_CORPORA)
def test_builtin_corpus_parts_are_fixed_disjoint_and_complete(name: str) -> None:
    every = builtin_corpus(name)
    train, test = builtin_corpus(name, "train"), builtin_corpus(name, "test")
    low, high = SIZES[name]
    assert low <= len(every) <= high
    assert all(isinstance(r.text, str) and r.text and r.text == " ".join(r.text.split()) for r in every)
    if name in ("pydoc-topics", "stdlib-docstrings"):
        assert all(40 <= len(r.text) <= 2000 and not r.labels for r in every)
    assert len({r.text for r in every}) == len(every)  # deduplicated
    assert {r.text for r in train}.isdisjoint(r.text for r in test)
    assert sorted(r.source for r in train + test) == sorted(r.source for r in every)
    assert abs(len(test) - 0.3 * len(every)) <= 1
    T._parts.cache_clear()  # recomputed, not served from the cache: still the same lists
    assert builtin_corpus(name, "train") == train and builtin_corpus(name, "test") == test
    other = builtin_corpus(name, "test", seed=1)
    assert len(other) == len(test) and other != test


def test_hsk_labels_match_the_package() -> None:
    items = hsk_items()
    topics = sorted({i["topic"] for i in items})
    every = builtin_corpus("hsk-en")
    hello = next(r for r in every if r.text == "Hello, teacher!")
    assert hello.labels == {"hsk_topic": topics.index("greetings"), "hsk_level": 0}
    assert hello.source == "hsk-en:hsk1-0001"
    by_id = {i["id"]: i for i in items}
    for r in every[::97]:
        item = by_id[r.source.split(":", 1)[1]]
        assert r.text == " ".join(item["translation"]["en"].split())
        assert r.labels == {"hsk_topic": topics.index(item["topic"]), "hsk_level": item["hsk_level"] - 1}
    assert "placeholder" not in {r.text for r in every}
    # stratified by topic: every topic in both parts, in proportion
    train = Counter(r.labels["hsk_topic"] for r in builtin_corpus("hsk-en", "train"))
    test = Counter(r.labels["hsk_topic"] for r in builtin_corpus("hsk-en", "test"))
    assert set(train) == set(test) == set(range(len(topics)))
    for k in test:
        assert abs(test[k] - 0.3 * (train[k] + test[k])) <= 1.5


def test_sdg_labels_only_on_rows_about_their_goal_and_stratified() -> None:
    rows = {r["id"]: r for r in sdg_rows()}
    every = builtin_corpus("sdg")
    for r in every:
        row = rows[r.source.split(":", 1)[1]]
        assert r.text == " ".join(row["text"].split())
        assert r.labels == ({"sdg": int(row["sdg"]) - 1} if row["label"] == "True" else {})
    labelled_texts = {" ".join(r["text"].split()) for r in rows.values() if r["label"] == "True"}
    assert {r.text for r in every if r.labels} == labelled_texts  # a text paired twice keeps its label
    train = Counter(r.labels.get("sdg", -1) for r in builtin_corpus("sdg", "train"))
    test = Counter(r.labels.get("sdg", -1) for r in builtin_corpus("sdg", "test"))
    assert set(train) == set(test) == set(range(-1, 17))  # each goal (and the unlabelled) in both parts
    for k in test:
        assert abs(test[k] - 0.3 * (train[k] + test[k])) <= 1.5


def test_stdlib_docstrings_are_read_without_importing_and_skip_tests() -> None:
    first = stdlib_docstrings()
    T._all_stdlib_docstrings.cache_clear()
    start = time.perf_counter()
    again = stdlib_docstrings()
    assert time.perf_counter() - start < 10
    assert again == first  # deterministic
    assert "this" not in sys.modules and "antigravity" not in sys.modules  # parsed, never imported
    keys = [(r.source.split(":")[1], int(r.source.split(":")[2])) for r in again]
    assert keys == sorted(keys)  # (file, line) order
    files = [f for f, _ in keys]
    assert not any(
        TEST_PACKAGES & set(f.split("/")[:-1]) or f.split("/")[-1].startswith("test_") for f in files
    )
    assert not any(f.startswith(("site-packages/", "pydoc_data/")) for f in files)
    assert all(isinstance(r.text, str) and 40 <= len(r.text) <= 2000 and not r.labels for r in again)
    # against the docstrings Python itself holds: first paragraph of a long one, whole short one
    import json as json_module
    from difflib import SequenceMatcher

    texts = {r.text for r in again}
    dumps = inspect.getdoc(json_module.dumps)
    assert dumps and len(dumps) > T.SHORT_DOCSTRING
    assert " ".join(dumps.split("\n\n")[0].split()) in texts
    matcher = " ".join((inspect.getdoc(SequenceMatcher.find_longest_match) or "").split("\n\n")[0].split())
    assert matcher in texts
    assert stdlib_docstrings(limit=100) == [first[i * len(first) // 100] for i in range(100)]


def test_builtin_corpus_errors() -> None:
    with pytest.raises(ProtegeError, match="did you mean 'hsk-en'"):
        builtin_corpus("hsk")
    with pytest.raises(ProtegeError, match="all, train or test"):
        builtin_corpus("sdg", "val")


# --------------------------------------------------------------------------- users' files


def test_read_texts_units_of_text_files(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("first line\n\n  second line  \nthird\n\n\n\nlast one\n", encoding="utf-8")
    lines = read_texts(f)
    assert [r.text for r in lines] == ["first line", "second line", "third", "last one"]
    assert [r.source for r in lines] == [f"{f}:1", f"{f}:3", f"{f}:4", f"{f}:8"]
    assert all(r.labels == {} for r in lines)
    paragraphs = read_texts(f, unit="paragraph")
    assert [(r.text, r.source) for r in paragraphs] == [
        ("first line", f"{f}:1"),
        ("second line third", f"{f}:3"),
        ("last one", f"{f}:8"),
    ]
    assert [r.text for r in read_texts(f, unit="file")] == [f.read_text().strip()]
    assert [r.text for r in read_texts(f, min_chars=6)] == ["first line", "second line", "last one"]
    # a folder: its .txt and .jsonl files in sorted order, subfolders included; others ignored
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("\ufeffin a subfolder\n", encoding="utf-8")  # BOM dropped
    (tmp_path / "c.jsonl").write_text('{"text": "from jsonl"}\n')
    (tmp_path / "notes.md").write_text("ignored\n")
    folder = read_texts(tmp_path, unit="file")
    assert [r.text for r in folder] == [f.read_text().strip(), "from jsonl", "in a subfolder"]
    with pytest.raises(ProtegeError, match="unit must be line, paragraph or file"):
        read_texts(f, unit="sentence")


def test_read_texts_jsonl_with_labels(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    rows = [
        {"body": "a cat sat", "topic": "pets", "level": 2},
        {"body": "stocks fell", "topic": "markets", "level": 0},
        {"body": "no topic here", "level": 1},
        {"body": "dogs bark", "topic": "pets", "level": None},
    ]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    got = read_texts(f, text_field="body", label_fields=["topic", "level"])
    assert [r.text for r in got] == [r["body"] for r in rows]
    assert [r.labels for r in got] == [
        {"topic": 1, "level": 2},  # classes numbered in sorted order: markets 0, pets 1
        {"topic": 0, "level": 0},
        {"level": 1},
        {"topic": 1},
    ]
    assert [r.source for r in got] == [f"{f}:{n}" for n in (1, 2, 3, 4)]
    with pytest.raises(ProtegeError, match="label field 'grade'"):
        read_texts(f, text_field="body", label_fields=["grade"])


def test_read_texts_saved_hf_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    label = datasets.ClassLabel(names=["no", "yes"])
    features = datasets.Features({"sentence": datasets.Value("string"), "label": label})
    train = datasets.Dataset.from_dict(
        {"sentence": ["one", "two", "three"], "label": [0, 1, 1]}, features=features
    )
    test = datasets.Dataset.from_dict({"sentence": ["four"], "label": [0]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "ds"))
    got = read_texts(tmp_path / "ds", text_field="sentence", label_fields=["label"])
    assert [(r.text, r.labels) for r in got] == [
        ("one", {"label": 0}),
        ("two", {"label": 1}),
        ("three", {"label": 1}),
        ("four", {"label": 0}),
    ]
    assert got[3].source == f"{tmp_path / 'ds'}[test]:0"
    assert [r.text for r in read_texts(tmp_path / "ds", text_field="sentence", split="test")] == ["four"]
    train.save_to_disk(str(tmp_path / "plain"))  # a plain Dataset
    assert [r.text for r in read_texts(tmp_path / "plain", text_field="sentence")] == ["one", "two", "three"]
    with pytest.raises(ProtegeError, match="column 'text' not in .*sentence.*text_field"):
        read_texts(tmp_path / "ds")
    with pytest.raises(ProtegeError, match="no split 'val'"):
        read_texts(tmp_path / "ds", text_field="sentence", split="val")


def test_read_texts_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(ProtegeError, match="not found"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ProtegeError, match="empty.txt holds no text"):
        read_texts(tmp_path / "empty.txt")
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ProtegeError, match="blob.txt is not UTF-8 text"):
        read_texts(tmp_path / "blob.txt")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00\x00def")  # valid UTF-8, but binary
    with pytest.raises(ProtegeError, match="not UTF-8 text.*NUL"):
        read_texts(tmp_path / "nul.txt")
    (tmp_path / "blob.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n')
    with pytest.raises(ProtegeError, match="blob.jsonl is not UTF-8 text"):
        read_texts(tmp_path / "blob.jsonl")
    (tmp_path / "m.jsonl").write_text('{"text": "ok"}\n{"content": "no text field"}\n')
    with pytest.raises(
        ProtegeError, match=r"m.jsonl:2: the record has no 'text' field.*'content'.*text_field"
    ):
        read_texts(tmp_path / "m.jsonl")
    (tmp_path / "n.jsonl").write_text('{"text": ["not", "a", "string"]}\n')
    with pytest.raises(ProtegeError, match=r"n.jsonl:1: 'text' must be a string, not list"):
        read_texts(tmp_path / "n.jsonl")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.csv").write_text("a,b\n")
    with pytest.raises(ProtegeError, match="no .txt or .jsonl file under"):
        read_texts(tmp_path / "folder")


def test_load_corpora_mixes_builtin_names_and_files(tmp_path: Path) -> None:
    mine = tmp_path / "mine.txt"
    mine.write_text("a text of my own\nanother one\n")
    held = tmp_path / "held.txt"
    held.write_text("held out text\n")
    entries = ["sdg", str(mine), {"path": str(held), "part": "test"}]
    train = load_corpora(entries, "train")
    test = load_corpora(entries, "test")
    assert train == builtin_corpus("sdg", "train") + read_texts(mine)
    assert test == builtin_corpus("sdg", "test") + read_texts(held)
    assert load_corpora(entries, "all") == builtin_corpus("sdg") + read_texts(mine) + read_texts(held)
    assert (
        load_corpora([{"path": str(mine), "unit": "file"}], "train")[0].text
        == "a text of my own\nanother one"
    )
    with pytest.raises(ProtegeError, match="did you mean the built-in corpus 'sdg'"):
        load_corpora(["sdgs"], "train")
    with pytest.raises(ProtegeError, match="all, train or test"):
        load_corpora(["sdg"], "val")


def test_dedupe_keeps_the_first_of_each_text() -> None:
    records = [TextRecord("a", "x:1", {"p": 1}), TextRecord("b", "x:2"), TextRecord("a", "x:3", {"p": 0})]
    assert dedupe(records) == [records[0], records[1]]
