"""Vision–language (CLIP-style) models: zero-shot classification through class prompts, image–text
retrieval, few-shot probes, per language.

A **model** of this task is a :class:`~protege.models.vlm.VisionLanguageModel`: ``encode_image``,
``encode_text`` (tokenisation inside), ``logit_scale()``, ``embed_dim`` and ``text_field`` (the text
field of a batch it reads: ``"text"``, the captions in the data's first language, or
``"text_<lang>"``). It is built by :func:`protege.models.vlm.build_vl_model` (``dual_encoder``,
``open_clip``, ``hf_clip``).

A **batch** is a dict (the default collation of :class:`CaptionedImages` items):

- ``"image"``: ``(N, C, H, W)`` float images (absent in text-only batches);
- ``"target"``: ``(N,)`` class index *within the batch's class set*;
- ``"classes"``: the name of that class set (``"seen"``, ``"unseen"``, ``"all"``; collated to a list);
- ``"text"`` and ``"text_<lang>"``: one caption per image, in the first language and in each of the
  data's languages (a template or an attribute prompt of the image's class, drawn per sample and
  language from the same seed: the same choice where the languages have as many prompts);
- ``"index"``: the sample's dataset index.

:meth:`VisionLanguageTask.forward` returns, for student and teacher alike:

- ``"image_embeds"`` ``(N, D)``: the raw image embeddings;
- ``"class_embeds"`` ``(C, D)``: L2-normalised class embeddings of the batch's class set: each
  class's prompts (templates filled with its name; with ``attributes: true`` also its attribute
  descriptions) encoded, normalised and averaged (CLIP's prompt ensembling), normalised again;
- ``"logits"`` ``(N, C)``: ``logit_scale · cos(image_embeds, class_embeds)``;
- ``"text_embeds"`` ``(N, D)``: the raw embeddings of the batch's captions in the model's language;
- in evaluation only, for every other language ``l`` of the data: ``"logits:l"`` and ``"text_embeds:l"``.

Terms read these keys by name (``clip_cls`` reads student ``image_embeds`` and teacher
``class_embeds``; ``vl_align`` the two ``logits``; ``feat_mse``/``img_contrast`` the two
``image_embeds``; ``clip_contrastive`` the student's ``[image_embeds, text_embeds]``).

**Class sets.** The data section names the seen classes (``options.seen``); the training and
validation splits hold only images of seen classes (labels renumbered within the seen set, so the
student never sees an unseen class nor its name during training or model selection), the test split
holds all classes. The evaluator then reports, from the test split's all-class logits: ``zs_seen``
(accuracy among seen-class images over the seen classes only), ``zs_unseen`` (the same for the unseen
classes: the open-vocabulary number), ``acc`` (generalised: all classes compete), the few-shot linear
probe on unseen classes (``fewshot_unseen@k``), and retrieval (``i2t_r1`` …).
"""

from __future__ import annotations

import random
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..data.splits import DataSplits
from ..errors import ProtegeError, closest
from ..metrics.fidelity import classification_report
from .base import Evaluator, Outputs, Task

#: data options this task reads itself (everything else goes to the image source)
VL_OPTIONS = (
    "seen",
    "languages",
    "prompts",
    "attributes",
    "caption_seed",
    "few_shot",
    "retrieval_size",
    "parallel",
)
#: the shots of the few-shot probe, and how many episodes each is averaged over
DEFAULT_SHOTS = (1, 5, 10)
FEW_SHOT_EPISODES = 5
#: distinct strings a frozen text tower's embeddings are kept for, per model
TEXT_MEMO_LIMIT = 100_000


# -- data ---------------------------------------------------------------------------------------


class CaptionedImages(Dataset):
    """The images of ``base`` whose class is in ``classes`` (original indices, in class-set order),
    each as a dict with its class index *within the set*, the set's name and one caption per language.

    The captions of the source's sample ``j`` are drawn from ``random.Random(caption_seed * 1_000_003
    + j)`` (the same seed in every language), its ``text_mix`` language from the seed ``+ 1``, its
    parallel pair is ``parallel[(j * 7919 + caption_seed) % len(parallel)]``: the same every epoch and
    every run (a resumed run sees the same batches)."""

    def __init__(
        self,
        base: Dataset,
        classes: Sequence[int],
        class_set: str,
        prompts: Any,
        languages: Sequence[str],
        caption_seed: int = 0,
        parallel: Sequence[Mapping[str, str]] = (),
    ) -> None:
        self.base = base
        self.parallel = list(parallel)
        self.classes = list(classes)
        self.class_set = class_set
        self.prompts = prompts
        self.languages = list(languages)
        self.caption_seed = caption_seed
        where = {c: i for i, c in enumerate(self.classes)}
        labels = _labels(base)
        self.items = [(i, where[int(y)]) for i, y in enumerate(labels) if int(y) in where]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j, y = self.items[i]
        image = self.base[j][0]
        label = self.classes[y]
        item: dict[str, Any] = {"image": image, "target": y, "classes": self.class_set, "index": i}
        for k, lang in enumerate(self.languages):
            rng = random.Random(self.caption_seed * 1_000_003 + j)
            caption = self.prompts.captions(lang, label, rng)
            item[f"text_{lang}"] = caption
            if k == 0:
                item["text"] = caption
        if len(self.languages) > 1:  # one language per sample, drawn from the sample's own seed
            mix = self.languages[
                random.Random(self.caption_seed * 1_000_003 + j + 1).randrange(len(self.languages))
            ]
            item["text_mix"] = item[f"text_{mix}"]
        if self.parallel:  # a sentence pair of the parallel corpus rides along with each image
            pair = self.parallel[(j * 7919 + self.caption_seed) % len(self.parallel)]
            for lang in self.languages:
                item[f"para_{lang}"] = pair[lang]
            item["para"] = pair[self.languages[0]]
            if len(self.languages) > 1:
                item["para_mix"] = pair[mix]
        return item


def _labels(dataset: Dataset) -> list[int]:
    """Every label of an ``(image, label)`` dataset, read without decoding images where possible."""
    for attr in ("labels", "targets", "y"):
        value = getattr(dataset, attr, None)
        if value is not None and len(value) == len(dataset):  # type: ignore[arg-type]
            return [int(v) for v in value]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


@dataclass
class VLDataSplits(DataSplits):
    """:class:`~protege.data.DataSplits` of :class:`CaptionedImages`, with the class prompts.

    ``class_names`` are the source's (all classes); ``class_sets`` maps ``"seen"``, ``"unseen"`` and
    ``"all"`` to original class indices; ``num_classes`` is the number of seen classes (what the
    training split's labels count)."""

    #: the task that reads these splits and builds their models (see ``protege.build.build_from``)
    task: ClassVar[str] = "vision_language"

    prompts: Any = None
    class_sets: dict[str, list[int]] = field(default_factory=dict)
    languages: list[str] = field(default_factory=lambda: ["en"])
    attributes: bool = False
    few_shot: tuple[int, ...] = DEFAULT_SHOTS
    retrieval_size: int = 1000


def _class_indices(value: Any, names: Sequence[str], what: str) -> list[int]:
    out = []
    for v in value:
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
            out.append(v)
        elif isinstance(v, str) and v in names:
            out.append(names.index(v))
        else:
            raise ProtegeError(
                f"data.options.{what}: {v!r} is not a class of the data; give class names or indices "
                f"0..{len(names) - 1} of: {', '.join(names)}"
            )
    if len(set(out)) != len(out):
        raise ProtegeError(f"data.options.{what} names a class twice: {list(value)}")
    return out


def check_prompts(prompts: Any, languages: Sequence[str], attributes: bool) -> None:
    """Every class has prompts in every language (and attribute descriptions when ``attributes``),
    else a :class:`~protege.errors.ProtegeError` naming the class and language that lack them."""
    for lang in languages:
        per_class = prompts.prompts(lang, attributes=attributes)
        bare = prompts.prompts(lang, attributes=False)
        for name, ps, plain in zip(prompts.classes, per_class, bare):
            if not ps:
                raise ProtegeError(
                    f"class {name!r} has no prompts in language {lang!r}: add templates/names for it "
                    "to the prompts file (protege prompts writes one)"
                )
            if attributes and len(ps) == len(plain):
                raise ProtegeError(
                    f"attributes: true, but class {name!r} has no attribute descriptions in language "
                    f"{lang!r}: run protege prompts for it, add them to the prompts file, or set "
                    "attributes: false"
                )


def load_vl_data(data: Mapping[str, Any]) -> VLDataSplits:
    """The run's ``data:`` section read for the vision–language task (see the module docstring)."""
    from ..data import load_data
    from ..data.prompts import fashion_mnist_prompts, load_prompts, template_prompts

    options = dict(data.get("options") or {})
    own = {k: options.pop(k) for k in VL_OPTIONS if k in options}
    base = load_data(
        str(data.get("source", "fashion-mnist")),
        root=data.get("root"),
        transforms=str(data.get("transforms", "auto")),
        val_fraction=float(data.get("val_fraction", 0.1)),
        test_fraction=float(data.get("test_fraction", 0.2)),
        seed=int(data.get("split_seed", 0)),
        download=bool(data.get("download", False)),
        **options,
    )
    names = list(base.class_names)
    languages = [str(lang) for lang in own.get("languages", ["en"])]
    if not languages or len(set(languages)) != len(languages):
        raise ProtegeError(f"data.options.languages must list distinct languages, got {languages}")
    source = own.get("prompts")
    if source is None and base.source == "fashion-mnist":
        prompts = fashion_mnist_prompts()
    elif source is None:
        prompts = template_prompts(names)  # English templates filled with the source's class names
    else:
        prompts = load_prompts(Path(str(source)).expanduser(), class_names=names)
    check_prompts(prompts, languages, attributes=bool(own.get("attributes", False)))
    seen = _class_indices(own.get("seen", list(range(len(names)))), names, "seen")
    unseen = [i for i in range(len(names)) if i not in seen]
    sets = {"seen": seen, "unseen": unseen, "all": list(range(len(names)))}
    seed = int(own.get("caption_seed", 0))

    corpus: dict[str, list[dict[str, str]]] = {"train": [], "eval": []}
    if own.get("parallel"):
        from ..data.parallel import load_parallel_corpus

        if len(languages) < 2:
            raise ProtegeError("data.options.parallel needs two or more languages (data.options.languages)")
        train_pairs, val_pairs = load_parallel_corpus(str(own["parallel"]), languages, split_seed=seed)
        corpus = {"train": list(train_pairs), "eval": list(val_pairs)}

    def wrap(ds: Dataset | None, which: str, part: str) -> CaptionedImages | None:
        if ds is None:
            return None
        return CaptionedImages(ds, sets[which], which, prompts, languages, seed, corpus[part])

    shots = tuple(int(k) for k in own.get("few_shot", DEFAULT_SHOTS))
    return VLDataSplits(
        train=wrap(base.train, "seen", "train"),  # type: ignore[arg-type]
        val=wrap(base.val, "seen", "eval"),  # type: ignore[arg-type]
        test=wrap(base.test, "all", "eval"),
        num_classes=len(seen),
        in_chans=base.in_chans,
        input_size=base.input_size,
        class_names=names,
        source=base.source,
        options={**base.options, "vision_language": {**own, "languages": languages}},
        mean=base.mean,
        std=base.std,
        prompts=prompts,
        class_sets=sets,
        languages=languages,
        attributes=bool(own.get("attributes", False)),
        few_shot=shots,
        retrieval_size=int(own.get("retrieval_size", 1000)),
    )


# -- the task -----------------------------------------------------------------------------------


def _language(model: nn.Module, languages: Sequence[str]) -> str:
    """The language of the text field ``model`` reads (``text``: the data's first language)."""
    text_field = str(getattr(model, "text_field", "text"))
    if text_field == "text" or (text_field == "text_mix" and len(languages) > 1):
        return languages[0]  # mixed captions: the class prompts of the first language
    lang = text_field.removeprefix("text_")
    if text_field == lang or lang not in languages:
        fields = ["text", *(f"text_{x}" for x in languages), *(["text_mix"] if len(languages) > 1 else [])]
        raise ProtegeError(
            f"a model reads text field {text_field!r}, but the batches carry {', '.join(fields)}: set its "
            "text_field to one of them, or add the language to data.options.languages"
        )
    return lang


class VisionLanguageTask(Task):
    """CLIP-style models (see the module docstring). ``bind(data)`` gives the task its class prompts."""

    name = "vision_language"
    primary_metric = "acc"
    output_keys = frozenset({"logits", "image_embeds", "text_embeds", "class_embeds", "para_embeds"})
    native_format = "safetensors"

    def __init__(self) -> None:
        self.data: VLDataSplits | None = None
        # per model (weakly: a model that is gone takes its entries with it), for frozen text paths
        self._frozen_cache: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str, str], torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )
        self._text_memo: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], torch.Tensor]] = (
            weakref.WeakKeyDictionary()
        )

    # -- binding to the data
    def bind(self, data: Any) -> None:
        if isinstance(data, VLDataSplits):
            self.data = data
            self._frozen_cache.clear()
            self._text_memo.clear()

    def _data(self) -> VLDataSplits:
        if self.data is None:
            raise ProtegeError(
                "the vision_language task has no class prompts: build it with its data "
                "(protege.tasks.build_task('vision_language', data)); a run does this"
            )
        return self.data

    def load_data(self, data, teachers, students):  # type: ignore[no-untyped-def]
        splits = load_vl_data(data)
        self.bind(splits)
        return splits

    def build_model(
        self, name: str, weights: str | None, kwargs: Mapping[str, Any], data: Any
    ) -> nn.Module | None:
        from ..models.vlm import VL_MODELS, build_vl_model

        if name not in VL_MODELS and not closest(name, VL_MODELS):
            raise ProtegeError(
                f"task vision_language needs a vision-language model ({', '.join(VL_MODELS)}), not "
                f"{name!r}; to use an image model as the image tower: model: dual_encoder, kwargs: "
                f"{{embed_dim: 128, image: {{model: {name}}}, text: {{kind: transformer}}}}"
            )
        return build_vl_model(name, weights, kwargs, in_chans=int(getattr(data, "in_chans", 3)))

    # -- batches
    def split(self, batch: Any) -> tuple[Any, torch.Tensor | None]:
        if not isinstance(batch, Mapping):
            raise ProtegeError(
                "a vision_language batch is a dict with 'image', 'target', 'classes' and 'text' "
                f"(CaptionedImages items, collated); got {type(batch).__name__}"
            )
        return batch, batch.get("target")

    def model_input(self, inputs: Any) -> Any:
        return inputs["image"]  # the model's forward is its image path

    def meta(self, batch: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if isinstance(batch, Mapping) and "index" in batch:
            out["index"] = batch["index"]
        return out

    def batch_size(self, inputs: Any) -> int:
        for key in ("image", "target"):
            if key in inputs:
                return len(inputs[key])
        return len(inputs["text"])

    def class_embeds(self, model: nn.Module, class_set: str, language: str) -> torch.Tensor:
        """``(C, D)`` normalised prompt-ensembled embeddings of ``class_set``'s classes."""
        data = self._data()
        frozen = bool(getattr(model, "text_frozen", False))
        device = _device(model)
        key = (class_set, language, str(device))
        cache = self._frozen_cache.setdefault(model, {})
        if frozen and key in cache:
            return cache[key]
        classes = data.class_sets[class_set]
        per_class = data.prompts.prompts(language, classes=classes, attributes=data.attributes)
        flat = [p for ps in per_class for p in ps]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            emb = F.normalize(model.encode_text(flat).float(), dim=-1)
            sizes = [len(ps) for ps in per_class]
            means = torch.stack([chunk.mean(0) for chunk in emb.split(sizes)])
            out = F.normalize(means, dim=-1)
        if frozen:
            cache[key] = out.detach()
        return out

    def encode_texts(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        """``model.encode_text(texts)``; a frozen text path's embeddings are kept per distinct string
        (captions repeat: a frozen 22M-parameter encoder then runs once per caption, not per batch)."""
        if not getattr(model, "text_frozen", False):
            return model.encode_text(texts)
        memo = self._text_memo.setdefault(model, {})
        device = str(_device(model))
        todo = list(dict.fromkeys(t for t in texts if (t, device) not in memo))
        if len(memo) + len(todo) > TEXT_MEMO_LIMIT:  # unbounded text (a corpus): keep no more
            memo.clear()
            with torch.no_grad():
                return model.encode_text(texts).detach()
        if todo:
            with torch.no_grad():
                memo.update({(t, device): e for t, e in zip(todo, model.encode_text(todo).detach())})
        return torch.stack([memo[(t, device)] for t in texts])

    def forward(self, model: nn.Module, inputs: Any) -> Outputs:
        data = self._data()
        lang = _language(model, data.languages)
        sets = inputs.get("classes")
        class_set = str(sets[0] if isinstance(sets, (list, tuple)) else (sets or "seen"))
        if class_set not in data.class_sets:
            raise ProtegeError(f"batch class set {class_set!r} is not one of {', '.join(data.class_sets)}")
        out: Outputs = {}
        images = inputs.get("image")
        field_ = str(getattr(model, "text_field", "text"))
        texts = inputs.get(field_)
        para = inputs.get(field_.replace("text", "para", 1))
        if para is not None:  # the parallel corpus's sentences in the model's language
            out["para_embeds"] = self.encode_texts(model, list(para))
        if images is not None:
            out["image_embeds"] = model.encode_image(images)
        cls = self.class_embeds(model, class_set, lang)
        out["class_embeds"] = cls
        if images is not None:
            img = F.normalize(out["image_embeds"].float(), dim=-1)
            out["logits"] = model.logit_scale().float() * img @ cls.t()
        if texts is not None:
            out["text_embeds"] = self.encode_texts(model, list(texts))
        if not model.training:  # evaluation (and frozen teachers): every language, its own captions
            for other in data.languages:
                if images is not None:
                    other_cls = cls if other == lang else self.class_embeds(model, class_set, other)
                    out[f"logits:{other}"] = model.logit_scale().float() * img @ other_cls.t()
                captions = inputs.get(f"text_{other}")
                if captions is not None:
                    out[f"text_embeds:{other}"] = (
                        out["text_embeds"]
                        if field_ == f"text_{other}"
                        else self.encode_texts(model, list(captions))
                    )
        if "logits" not in out:  # text-only batches: a placeholder so generic code finds logits
            out["logits"] = out.get("text_embeds", torch.zeros(0))
        return out

    def eval_outputs(self) -> tuple[str, ...]:
        """The output keys :func:`protege.engine.evaluate` hands the evaluator."""
        data = self._data()
        keys = ["logits", "image_embeds", "text_embeds"]
        for lang in data.languages:
            keys += [f"logits:{lang}", f"text_embeds:{lang}"]
        return tuple(keys)

    def evaluator(self, with_teacher: bool) -> Evaluator:
        return VisionLanguageEvaluator(self._data(), with_teacher)

    def export(
        self, model: nn.Module, data: Any, directory: Path, spec: Mapping[str, Any] | None = None
    ) -> bool:
        from ..models.vlm import save_vl_model

        if spec is None:
            return False
        save_vl_model(model, directory, spec)
        return True


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


# -- evaluation ---------------------------------------------------------------------------------


class VisionLanguageEvaluator(Evaluator):
    """Zero-shot accuracy (seen / unseen / all classes, per language), the few-shot probe on unseen
    classes, image↔text retrieval, and fidelity to the teacher (see the module docstring).

    Which class set a split holds is read from the width of its logits: the test split's logits
    cover all classes, the validation split's the seen ones."""

    def __init__(self, data: VLDataSplits, with_teacher: bool) -> None:
        self.data = data
        self.with_teacher = with_teacher
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.teacher: list[torch.Tensor] = []
        self.target: list[torch.Tensor] = []

    def update(self, student: Outputs, target: torch.Tensor | None, teacher: Outputs | None) -> None:
        if target is None:
            raise ProtegeError("evaluation needs labelled data: the evaluation batches carry no labels")
        for key, value in student.items():
            if isinstance(value, torch.Tensor) and value.ndim == 2 and len(value) == len(target):
                self.rows.setdefault(key, []).append(value.detach().float().cpu())
        self.target.append(target.detach().cpu())
        if self.with_teacher and teacher is not None:
            self.teacher.append(teacher["logits"].detach().float().cpu())

    def compute(self) -> dict[str, float]:
        y = torch.cat(self.target)
        rows = {k: torch.cat(v) for k, v in self.rows.items()}
        teacher = torch.cat(self.teacher) if self.teacher else None
        langs = self.data.languages
        logits = rows.get(
            f"logits:{langs[0]}", rows["logits"]
        )  # the first language's, whatever the model reads
        report = classification_report(logits, y, teacher)
        sets = self.data.class_sets
        full = logits.shape[1] == len(sets["all"]) and bool(sets["unseen"])
        for i, lang in enumerate(langs):
            suffix = "" if i == 0 else f":{lang}"
            lg = rows.get(f"logits:{lang}", rows["logits"] if i == 0 else None)
            if lg is None:
                continue
            if suffix:
                report["acc" + suffix] = _acc(lg, y)
            if full:
                report["zs_seen" + suffix] = _restricted_acc(lg, y, sets["seen"])
                report["zs_unseen" + suffix] = _restricted_acc(lg, y, sets["unseen"])
            texts = rows.get(f"text_embeds:{lang}", rows.get("text_embeds") if i == 0 else None)
            if texts is not None and "image_embeds" in rows:
                report.update(
                    {
                        k + suffix: v
                        for k, v in retrieval(
                            rows["image_embeds"], texts, y, self.data.retrieval_size
                        ).items()
                    }
                )
        if full and teacher is not None:
            report["teacher_zs_seen"] = _restricted_acc(teacher, y, sets["seen"])
            report["teacher_zs_unseen"] = _restricted_acc(teacher, y, sets["unseen"])
        if full and "image_embeds" in rows:
            unseen = torch.isin(y, torch.tensor(sets["unseen"]))
            for k in self.data.few_shot:
                acc = few_shot_probe(rows["image_embeds"][unseen], y[unseen], k)
                if acc is not None:
                    report[f"fewshot_unseen@{k}"] = acc
        return report


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean()) if len(y) else float("nan")


def _restricted_acc(logits: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> float:
    """Accuracy among the samples of ``classes`` with only those classes' columns competing."""
    cols = torch.tensor(list(classes))
    keep = torch.isin(y, cols)
    if not keep.any():
        return float("nan")
    pred = cols[logits[keep][:, cols].argmax(-1)]
    return float((pred == y[keep]).float().mean())


def retrieval(
    image: torch.Tensor, text: torch.Tensor, y: torch.Tensor, limit: int = 1000, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Image→text and text→image recall@k over the first ``limit`` pairs, cosine similarity.

    A retrieved item is relevant when it belongs to the query's class (captions of class-level
    datasets repeat, so "its own caption" is not identifiable among equal strings): ``i2t_r1`` is the
    share of images whose most similar caption describes their class."""
    n = min(limit, len(y))
    if n < 2:
        return {}
    im = F.normalize(image[:n], dim=-1)
    tx = F.normalize(text[:n], dim=-1)
    sim = im @ tx.t()
    same = y[:n, None] == y[None, :n]
    out = {}
    for k in ks:
        kk = min(k, n)
        top_i2t = sim.topk(kk, dim=1).indices
        top_t2i = sim.t().topk(kk, dim=1).indices
        out[f"i2t_r{k}"] = float(same.gather(1, top_i2t).any(1).float().mean())
        out[f"t2i_r{k}"] = float(same.t().gather(1, top_t2i).any(1).float().mean())
    return out


def few_shot_probe(
    features: torch.Tensor, y: torch.Tensor, k: int, episodes: int = FEW_SHOT_EPISODES, seed: int = 0
) -> float | None:
    """Mean accuracy of a logistic-regression probe on L2-normalised ``features`` trained on ``k``
    samples per class and tested on the rest, over ``episodes`` seeded draws (``None`` when some
    class has ≤ ``k`` samples or there are < 2 classes)."""
    from sklearn.linear_model import LogisticRegression

    classes = sorted(set(y.tolist()))
    if len(classes) < 2 or any(int((y == c).sum()) <= k for c in classes):
        return None
    x = F.normalize(features, dim=-1).numpy()
    labels = y.numpy()
    accs = []
    for e in range(episodes):
        g = torch.Generator().manual_seed(seed * 7919 + e)
        support = []
        for c in classes:
            idx = torch.nonzero(y == c).flatten()
            support += idx[torch.randperm(len(idx), generator=g)[:k]].tolist()
        mask = torch.zeros(len(y), dtype=torch.bool)
        mask[support] = True
        clf = LogisticRegression(C=10.0, max_iter=1000)
        clf.fit(x[mask.numpy()], labels[mask.numpy()])
        accs.append(float((clf.predict(x[~mask.numpy()]) == labels[~mask.numpy()]).mean()))
    return sum(accs) / len(accs)
