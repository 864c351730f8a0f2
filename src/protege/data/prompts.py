"""Class prompts: the text side of image–text distillation (class names, templates, descriptions).

A *class prompts* file gives, for every class of an image dataset and every language, the class's
name as a sentence uses it, CLIP-style templates (``"a photo of a {}."``) and a few short visual
*descriptions* of the class ("is a low-top shoe with laces"). A text encoder turns
:meth:`ClassPrompts.prompts` into one text embedding per class (zero-shot head, VLM-OOD's
language anchors); :meth:`ClassPrompts.captions` draws one caption per image for image–text
contrastive training or retrieval.

**Attribute prompts.** VLM-OOD (Li et al., "Distilling Large Vision-Language Model with
Out-of-Distribution Generalizability", ICCV 2023) enriches each class's prompt with a language
model's description of the class. The descriptions are joined to a prompt as in Menon & Vondrick
("Visual Classification via Description from Large Language Models", ICLR 2023):
``"a photo of a sneaker, which is a low-top shoe with laces."``. An English description that
starts with a verb (``is``, ``has``, ``comes`` …) follows ``which`` as is; any other (a noun
phrase: ``"a thick sole and a rounded toe"``) gets ``which has``. A Chinese one follows the
prompt after a comma (``"一张运动鞋的照片，有平平的橡胶鞋底。"``: the subject is left out, as
Chinese does); other languages: ``"{prompt}: {description}."``. Descriptions are joined to the
first template only (Menon & Vondrick's one sentence per descriptor), so a class has
``len(templates) + len(descriptions)`` prompts.

The file (JSON, ``.json``), version 1::

    {"format": "protege-class-prompts", "version": 1,
     "classes": ["T-shirt/top", "Trouser", ...],          # the dataset's class names, label order
     "languages": {
       "en": {"names": ["T-shirt or top", "pair of trousers", ...],   # one per class, same order
              "templates": ["a photo of a {}.", ...],                  # each holds one {}
              "descriptions": {"T-shirt/top": ["short sleeves and a round neckline", ...], ...}},
       "zh": {...}},
     "source": {"kind": "manual" | "generated", "model": "smollm2" | null, "settings": {...}}}

``descriptions`` is keyed by the entries of ``classes`` (in every language); every class needs at
least one description in every language. ``protege prompts`` writes such a file from a causal LM
(``protege.prompts``); one can also be written by hand. :func:`fashion_mnist_prompts` is the
built-in, hand-written file for Fashion-MNIST (English and Chinese: the Chinese names and
descriptions were written by hand, not machine-translated). English templates written with
``"a {}"`` read ``"an {}"`` before a name starting with a vowel (``"a photo of an ankle boot."``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ProtegeError, closest
from ..files import atomic_write_text
from .fashion_mnist import CLASS_NAMES

__all__ = [
    "DEFAULT_TEMPLATES",
    "FORMAT",
    "VERSION",
    "ClassPrompts",
    "LanguagePrompts",
    "attribute_prompt",
    "fashion_mnist_prompts",
    "fill_template",
    "load_prompts",
    "merge_prompts",
    "parse_prompts",
    "read_class_names",
    "save_prompts",
    "template_prompts",
]

FORMAT = "protege-class-prompts"
VERSION = 1
KINDS = ("manual", "generated")
#: templates for classes of no built-in set (any image dataset)
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": (
        "a photo of a {}.",
        "a black and white photo of a {}.",
        "a low resolution photo of a {}.",
        "a close-up photo of a {}.",
        "a centered photo of a {}.",
    ),
    "zh": (
        "一张{}的照片。",
        "一张{}的黑白照片。",
        "一张{}的低分辨率照片。",
        "一张{}的特写照片。",
        "一张{}的居中照片。",
    ),
}
FASHION_MNIST_FILE = "fashion_mnist_prompts.json"
#: English words a description may start with to follow "which" directly (else: "which has ...")
_VERBS = frozenset(
    "is are has have comes come looks look features feature shows show consists consist covers cover "
    "reaches reach sits sit ends end usually often typically may can resembles resemble"
    " contains contain".split()
)
_HOW_TO_FIX = "write them with `protege prompts` or edit the file"


def fill_template(template: str, name: str, language: str = "en") -> str:
    """``template`` with its ``{}`` replaced by ``name`` (English: ``"a {}"`` → ``"an {}"`` before a vowel)."""
    if language == "en" and name[:1].lower() in "aeiou":
        template = re.sub(r"\b([Aa]) \{\}", r"\1n {}", template)
    return template.replace("{}", name)


def attribute_prompt(prompt: str, description: str, language: str = "en") -> str:
    """A filled template joined with one description (module docstring: Menon & Vondrick's form)."""
    head = prompt.rstrip().rstrip(".!。！")
    text = description.strip().rstrip(".!。！;；,，")
    if language == "en":
        first = text.split(" ", 1)[0].lower()
        return f"{head}, which {text}." if first in _VERBS else f"{head}, which has {text}."
    if language in ("zh", "ja"):
        return f"{head}，{text}。"
    return f"{head}: {text}."


@dataclass(frozen=True)
class LanguagePrompts:
    """One language of a :class:`ClassPrompts`: names (class order), templates, descriptions by class."""

    names: tuple[str, ...]
    templates: tuple[str, ...]
    descriptions: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class ClassPrompts:
    """Class names, templates and descriptions per language (see the module docstring)."""

    classes: tuple[str, ...]
    languages: Mapping[str, LanguagePrompts]
    source: Mapping[str, Any] = field(
        default_factory=lambda: {"kind": "manual", "model": None, "settings": {}}
    )

    def _language(self, language: str) -> LanguagePrompts:
        if language not in self.languages:
            raise ProtegeError(
                f"the class prompts have no language {language!r} (they have: "
                f"{', '.join(sorted(self.languages))}); {_HOW_TO_FIX}"
            )
        return self.languages[language]

    def _index(self, c: int | str) -> int:
        if isinstance(c, str):
            if c not in self.classes:
                raise _unknown_class(c, self.classes)
            return self.classes.index(c)
        if not 0 <= int(c) < len(self.classes):
            raise ProtegeError(f"class label {c} is out of range: there are {len(self.classes)} classes")
        return int(c)

    def names(self, language: str) -> list[str]:
        """The class names of ``language``, in label order."""
        return list(self._language(language).names)

    def prompts(
        self, language: str, classes: Sequence[int | str] | None = None, attributes: bool = True
    ) -> list[list[str]]:
        """Per class (label order, or ``classes``: labels or class names), its prompts: every template
        filled with the class's name, then (``attributes``) the first template joined with each of
        the class's descriptions."""
        lang = self._language(language)
        wanted = range(len(self.classes)) if classes is None else [self._index(c) for c in classes]
        out: list[list[str]] = []
        for i in wanted:
            filled = [fill_template(t, lang.names[i], language) for t in lang.templates]
            if attributes:
                described = lang.descriptions.get(self.classes[i], ())
                filled += [attribute_prompt(filled[0], d, language) for d in described]
            out.append(filled)
        return out

    def captions(self, language: str, label: int | str, rng: Any) -> str:
        """One caption for an image of class ``label``, drawn uniformly from its prompts (templates
        and attribute prompts). ``rng``: a ``random.Random``, a ``numpy.random.Generator`` or a
        ``torch.Generator``."""
        options = self.prompts(language, [label])[0]
        return options[_draw(rng, len(options))]

    def to_json(self) -> dict[str, Any]:
        """The file's content (module docstring)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "classes": list(self.classes),
            "languages": {
                code: {
                    "names": list(lang.names),
                    "templates": list(lang.templates),
                    "descriptions": {
                        c: list(lang.descriptions[c]) for c in self.classes if c in lang.descriptions
                    },
                }
                for code, lang in self.languages.items()
            },
            "source": dict(self.source),
        }


def _draw(rng: Any, n: int) -> int:
    if hasattr(rng, "integers"):  # numpy Generator
        return int(rng.integers(n))
    if hasattr(rng, "randrange"):  # random.Random
        return int(rng.randrange(n))
    import torch

    if isinstance(rng, torch.Generator):
        return int(torch.randint(n, (1,), generator=rng).item())
    raise TypeError(
        f"rng must be a random.Random, numpy Generator or torch.Generator, got {type(rng).__name__}"
    )


def _unknown_class(name: str, classes: Sequence[str]) -> ProtegeError:
    near = closest(name, classes)
    hint = f"did you mean: {', '.join(near)}?" if near else f"the classes are: {', '.join(classes)}"
    return ProtegeError(f"unknown class {name!r}; {hint}")


def save_prompts(path: str | Path, prompts: ClassPrompts) -> Path:
    """Write ``prompts`` to ``path`` (JSON, UTF-8, written atomically: never half written)."""
    path = Path(path).expanduser()
    text = json.dumps(prompts.to_json(), ensure_ascii=False, indent=2) + "\n"
    atomic_write_text(path, text)
    return path


def _strings(value: Any, where: str, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ProtegeError(f"{where} must be a list of non-empty strings")
    if not value and not allow_empty:
        raise ProtegeError(f"{where} is empty")
    return tuple(v.strip() for v in value)


def parse_prompts(
    data: Any,
    where: str,
    class_names: Sequence[str] | None = None,
    languages: Sequence[str] | None = None,
    partial: bool = False,
) -> ClassPrompts:
    """Validate a prompts file's content (``where`` names it in errors); see :func:`load_prompts`."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ProtegeError(f"{where} is not a class prompts file (format {got!r}, expected {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ProtegeError(
            f"{where} has version {data.get('version')!r}; this protege reads version {VERSION}: "
            "write it again with `protege prompts`"
        )
    classes = _strings(data.get("classes"), f"{where}: classes")
    if len(set(classes)) != len(classes):
        twice = sorted({c for c in classes if classes.count(c) > 1})
        raise ProtegeError(f"{where}: classes lists {', '.join(map(repr, twice))} more than once")
    if class_names is not None:
        _check_classes(classes, tuple(class_names), where, partial)
    langs = data.get("languages")
    if not isinstance(langs, dict) or not langs:
        raise ProtegeError(
            f"{where}: languages must map a language code (en, zh, …) to its names and templates"
        )
    missing = [code for code in (languages or ()) if code not in langs]
    if missing:
        raise ProtegeError(
            f"{where} has no prompts in {', '.join(missing)} (it has: {', '.join(sorted(langs))}); "
            f"{_HOW_TO_FIX}"
        )
    parsed = {code: _language(langs[code], code, classes, where, partial) for code in langs}
    source = data.get("source", {"kind": "manual"})
    if not isinstance(source, dict) or source.get("kind") not in KINDS:
        raise ProtegeError(f"{where}: source.kind must be one of {', '.join(KINDS)}")
    return ClassPrompts(classes, parsed, source)


def _check_classes(classes: tuple[str, ...], expected: tuple[str, ...], where: str, partial: bool) -> None:
    unknown = [c for c in classes if c not in expected]
    if unknown:
        raise ProtegeError(
            f"{where} has prompts for {unknown[0]!r}, which is not a class of the data "
            f"({', '.join(closest(unknown[0], expected)) or ', '.join(expected)}?)"
        )
    if partial:
        return
    missing = [c for c in expected if c not in classes]
    if missing:
        raise ProtegeError(
            f"{where} has no prompts for class{'es' if len(missing) > 1 else ''} "
            f"{', '.join(map(repr, missing))}; {_HOW_TO_FIX}"
        )
    if classes != expected:
        i = next(i for i, (a, b) in enumerate(zip(classes, expected)) if a != b)
        raise ProtegeError(
            f"{where} lists the classes in another order than the data: label {i} is {classes[i]!r} in the "
            f"file and {expected[i]!r} in the data; list them in label order"
        )


def _language(data: Any, code: str, classes: tuple[str, ...], where: str, partial: bool) -> LanguagePrompts:
    at = f"{where}: languages.{code}"
    if not isinstance(data, dict):
        raise ProtegeError(f"{at} must be an object with names, templates and descriptions")
    unknown = sorted(set(data) - {"names", "templates", "descriptions"})
    if unknown:
        raise ProtegeError(
            f"{at} has unknown key(s) {', '.join(unknown)}; keys: names, templates, descriptions"
        )
    names: tuple[str, ...] = ()
    if "names" in data or not partial:
        names = _strings(data.get("names"), f"{at}.names")
        if len(names) != len(classes):
            absent = classes[len(names) :]
            extra = f": no name for {', '.join(map(repr, absent))}" if absent else ""
            raise ProtegeError(
                f"{at}.names has {len(names)} name(s) for {len(classes)} classes{extra}; give one per class, "
                "in the order of classes"
            )
    templates: tuple[str, ...] = ()
    if "templates" in data or not partial:
        templates = _strings(data.get("templates"), f"{at}.templates")
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ProtegeError(
                f"{at}.templates: {bad[0]!r} must hold exactly one {{}} (where the class name goes)"
            )
    described = data.get("descriptions", {} if partial else None)
    if not isinstance(described, dict):
        raise ProtegeError(f"{at}.descriptions must map each class to a list of descriptions")
    for key in described:
        if key not in classes:
            raise ProtegeError(f"{at}.descriptions: {_unknown_class(key, classes)}")
    descriptions = {
        c: _strings(described[c], f"{at}.descriptions[{c!r}]", allow_empty=True)
        for c in classes
        if c in described
    }
    descriptions = {c: d for c, d in descriptions.items() if d}  # an empty list: no descriptions
    if not partial:
        missing = [c for c in classes if c not in descriptions]
        if missing:
            raise ProtegeError(
                f"{at} has no descriptions for class{'es' if len(missing) > 1 else ''} "
                f"{', '.join(map(repr, missing))}; {_HOW_TO_FIX}"
            )
    return LanguagePrompts(names, templates, descriptions)


def load_prompts(
    path: str | Path,
    class_names: Sequence[str] | None = None,
    languages: Sequence[str] | None = None,
    partial: bool = False,
) -> ClassPrompts:
    """Read and validate a class prompts file.

    ``class_names``: the data's classes, in label order; the file must list exactly these.
    ``languages``: those the file must have. ``partial``: a file covering only some classes (a
    subset of ``class_names``) and leaving names, templates or descriptions out (a manual
    override for ``protege prompts --manual``).

    Raises:
        ProtegeError: naming what is missing or wrong (the class, the language, the key) and how to
            fix it: ``protege prompts`` or an edit of the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ProtegeError(f"class prompts file not found: {path}; write one with `protege prompts`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtegeError(f"{path} is not valid JSON ({e}); a class prompts file is JSON") from None
    return parse_prompts(data, str(path), class_names, languages, partial)


def merge_prompts(base: ClassPrompts, override: ClassPrompts) -> ClassPrompts:
    """``base`` with ``override`` (a partial file: :func:`load_prompts` with ``partial=True``) winning
    per class: in each language of ``override``, the name and the descriptions of every class it
    covers, and its templates when it has any. ``override``'s classes must be among ``base``'s."""
    languages: dict[str, LanguagePrompts] = {}
    for code in dict.fromkeys([*base.languages, *override.languages]):
        old = base.languages.get(code, LanguagePrompts((), (), {}))
        new = override.languages.get(code)
        if new is None:
            languages[code] = old
            continue
        given = dict(zip(override.classes, new.names))
        known = dict(zip(base.classes, old.names))
        names = tuple(given.get(c, known.get(c, "")) for c in base.classes)
        descriptions = {c: new.descriptions.get(c, old.descriptions.get(c, ())) for c in base.classes}
        languages[code] = LanguagePrompts(
            names,  # "" where neither has a name: parse_prompts/the caller reports the class
            new.templates or old.templates,
            {c: d for c, d in descriptions.items() if d},
        )
    return ClassPrompts(base.classes, languages, base.source)


def fashion_mnist_prompts() -> ClassPrompts:
    """The built-in, hand-written class prompts of Fashion-MNIST, in English and Chinese."""
    text = (resources.files(__package__) / FASHION_MNIST_FILE).read_text(encoding="utf-8")
    return parse_prompts(json.loads(text), f"protege's {FASHION_MNIST_FILE}", CLASS_NAMES, ("en", "zh"))


def template_prompts(class_names: Sequence[str], language: str = "en") -> ClassPrompts:
    """Class prompts of any dataset from its class names alone: ``language``'s default templates
    filled with the names, no descriptions (``attributes: true`` then asks for a prompts file)."""
    if language not in DEFAULT_TEMPLATES:
        raise ProtegeError(
            f"no default templates for language {language!r} (have: {', '.join(DEFAULT_TEMPLATES)}): "
            "give a class prompts file (protege prompts writes one)"
        )
    names = tuple(str(n) for n in class_names)
    lang = LanguagePrompts(names, tuple(DEFAULT_TEMPLATES[language]), {})
    return ClassPrompts(names, {language: lang}, {"kind": "manual", "model": None, "settings": {}})


def read_class_names(spec: str | Path | Sequence[str]) -> tuple[str, ...]:
    """Class names from ``"fashion-mnist"`` (its 10 classes), a ``.txt`` file (one per line), a
    ``.json`` file (a list of names, or a class prompts file: its classes) or a list of names."""
    if not isinstance(spec, (str, Path)):
        names = tuple(str(n).strip() for n in spec)
    elif str(spec) == "fashion-mnist":
        return CLASS_NAMES
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ProtegeError(
                f"class list {str(spec)!r} is neither fashion-mnist nor a file; give fashion-mnist, a .txt "
                "file (one class per line) or a .json file"
            )
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ProtegeError(f"{path} is not valid JSON ({e.msg})") from None
            if isinstance(data, dict):
                return parse_prompts(data, str(path), partial=True).classes
            if not isinstance(data, list) or not all(isinstance(n, str) for n in data):
                raise ProtegeError(f"{path} must hold a list of class names or a class prompts file")
            names = tuple(n.strip() for n in data)
        else:
            names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names or not all(names):
        raise ProtegeError(f"the class list {spec if isinstance(spec, (str, Path)) else ''} names no class")
    if len(set(names)) != len(names):
        raise ProtegeError(
            f"the class list names {sorted({n for n in names if names.count(n) > 1})} more than once"
        )
    return names
