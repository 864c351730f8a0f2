"""Reasoning tasks with exact answers, offline: BBH-style generators, answer extraction and scoring.

BIG-Bench Hard (Suzgun et al., 2022) is not available offline, so these tasks are written in its
style, each a seeded generator of ``{question, rationale, answer}`` examples whose answer is
computed, not annotated:

``boolean_expressions``
    ``not ( True and False ) or False is`` → ``True``
``multistep_arithmetic``
    ``((-3 + 7) * (2 - 5)) =`` → ``-12``
``word_sorting``
    ``Sort the following words alphabetically: List: pear apple fig`` → ``apple fig pear``
``object_counting``
    ``I have a violin, two apples and a piano. How many musical instruments do I have?`` → ``2``
``date_arithmetic``
    ``Today is 02/27/2020. What is the date 3 days later in MM/DD/YYYY?`` → ``03/01/2020``

Every rationale ends with ``So the answer is X.``, the chain-of-thought convention of BBH's
prompts. :meth:`ReasoningTask.splits` carves a seed-example pool, a preference set and a held-out
test set that share no question text, deterministically from a seed. :meth:`ReasoningTask.
extract_answer` reads the answer out of free text ("the answer is X", "Answer: X", else the last
line) in the task's canonical form, :meth:`ReasoningTask.score` is exact match on it, and
:meth:`ReasoningTask.solve` computes the answer of a question *text* when it parses (the
verifier of teacher-written questions), ``None`` when it does not.
"""

from __future__ import annotations

import ast
import datetime
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from ..errors import ProtegeError, closest

__all__ = ["TASKS", "Example", "ReasoningTask", "TaskSplits", "format_question", "get_task"]


@dataclass(frozen=True)
class Example:
    """One question, its step-by-step rationale (ending in ``So the answer is X.``) and the answer."""

    question: str
    rationale: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class TaskSplits:
    """Disjoint (by question text) seed-example pool, preference set and held-out test set."""

    seed_pool: list[Example]
    preference: list[Example]
    test: list[Example]


@dataclass(frozen=True)
class ReasoningTask:
    """A task: its instruction, a seeded example generator, a solver of question texts and the
    canonical form of answers (module docstring)."""

    name: str
    instruction: str
    sample: Callable[[random.Random], Example]
    solver: Callable[[str], str | None]
    normalize: Callable[[str], str | None]

    def make(self, n: int, seed: int = 0) -> list[Example]:
        """``n`` examples with distinct questions, the same for the same ``seed``."""
        rng = random.Random(f"{self.name}:{seed}")
        seen: dict[str, Example] = {}
        for _ in range(200 * n + 1000):
            if len(seen) == n:
                break
            example = self.sample(rng)
            seen.setdefault(example.question, example)
        if len(seen) < n:
            raise ProtegeError(f"{self.name} has fewer than {n} distinct questions; ask for fewer")
        return list(seen.values())

    def splits(self, seed_pool: int = 8, preference: int = 40, test: int = 100, seed: int = 0) -> TaskSplits:
        """The seed pool, preference set and test set: one stream of distinct questions, cut in three."""
        examples = self.make(seed_pool + preference + test, seed)
        return TaskSplits(
            examples[:seed_pool],
            examples[seed_pool : seed_pool + preference],
            examples[seed_pool + preference :],
        )

    def solve(self, question: str) -> str | None:
        """The answer of ``question`` (canonical form) when it parses as this task's question, else None."""
        try:
            return self.solver(question)
        except (ValueError, ArithmeticError, KeyError, SyntaxError, RecursionError, OverflowError):
            return None

    def extract_answer(self, text: str) -> str | None:
        """The answer written in ``text`` in canonical form: the sentence after the last "answer is"
        (or "Answer:"), else the last non-empty line; ``None`` when none is found."""
        found = re.findall(r"answer\s+is\b[:\s]*([^\n]*)", text, re.IGNORECASE) or re.findall(
            r"answer\s*[:=]\s*([^\n]*)", text, re.IGNORECASE
        )
        if found:  # the answer is the sentence after it: "So the answer is 27. Then ..." gives 27
            return self.normalize(re.split(r"\.(?:\s|$)", found[-1])[0])
        lines = [line for line in text.splitlines() if line.strip()]
        return self.normalize(lines[-1]) if lines else None

    def score(self, text: str, answer: str) -> bool:
        """Exact match of the answer in ``text`` with ``answer`` (both in canonical form)."""
        got = self.extract_answer(text)
        return got is not None and got == self.normalize(answer)


def format_question(task: ReasoningTask, question: str, demos: Sequence[Example] = ()) -> str:
    """The prompt a model answers: the task's instruction, worked ``demos`` (in-context examples),
    then ``Q: question`` and ``A:`` to continue."""
    shots = "".join(f"Q: {d.question}\nA: {d.rationale}\n\n" for d in demos)
    return f"{task.instruction}\n\n{shots}Q: {question}\nA:"


# --------------------------------------------------------------------------- boolean expressions


def _bool_sample(rng: random.Random) -> Example:
    steps: list[str] = []

    def build(depth: int) -> tuple[str, bool, bool]:  # text, value, is_atom
        if depth == 0 or (depth < 2 and rng.random() < 0.3):  # the whole expression is never an atom
            value = rng.random() < 0.5
            if rng.random() < 0.3:
                text = f"not {value}"
                steps.append(f"{text} = {not value}")
                return text, not value, True
            return str(value), value, True
        left, lv, la = build(depth - 1)
        right, rv, ra = build(depth - 1)
        op = rng.choice(["and", "or"])
        value = (lv and rv) if op == "and" else (lv or rv)
        left = left if la else f"( {left} )"
        right = right if ra else f"( {right} )"
        text = f"{left} {op} {right}"
        steps.append(f"{lv} {op} {rv} = {value}")
        return text, value, False

    text, value, _ = build(2)
    rationale = "Evaluate the innermost parts first. " + ". ".join(steps) + f". So the answer is {value}."
    return Example(f"{text} is", rationale, str(value))


def _bool_solve(question: str) -> str | None:
    text = question.strip().removesuffix("is").strip()
    tokens = re.findall(r"\(|\)|\w+", text)
    if not tokens or any(t not in {"True", "False", "not", "and", "or", "(", ")"} for t in tokens):
        return None
    at = 0

    def peek() -> str | None:
        return tokens[at] if at < len(tokens) else None

    def take() -> str:
        nonlocal at
        if at >= len(tokens):
            raise ValueError("unexpected end")
        at += 1
        return tokens[at - 1]

    def disjunction() -> bool:
        value = conjunction()
        while peek() == "or":
            take()
            value = conjunction() or value
        return value

    def conjunction() -> bool:
        value = negation()
        while peek() == "and":
            take()
            value = negation() and value
        return value

    def negation() -> bool:
        if peek() == "not":
            take()
            return not negation()
        token = take()
        if token == "(":
            value = disjunction()
            if take() != ")":
                raise ValueError("unbalanced")
            return value
        if token in ("True", "False"):
            return token == "True"
        raise ValueError(token)

    value = disjunction()
    if at != len(tokens):
        raise ValueError("trailing tokens")
    return str(value)


def _bool_normalize(text: str) -> str | None:
    found = re.findall(r"\b(true|false)\b", text, re.IGNORECASE)
    return found[-1].capitalize() if found else None


# --------------------------------------------------------------------------- multistep arithmetic


def _arith_sample(rng: random.Random) -> Example:
    ops = ["+", "-", "*"]
    a, b, c, d = (rng.randint(-9, 9) for _ in range(4))
    o1, o2, o3 = (rng.choice(ops) for _ in range(3))
    x, y = _apply(a, o1, b), _apply(c, o2, d)
    z = _apply(x, o3, y)
    question = f"(({a} {o1} {b}) {o3} ({c} {o2} {d})) ="
    rationale = (
        f"First, {a} {o1} {b} = {x}. Then, {c} {o2} {d} = {y}. "
        f"Finally, {x} {o3} {y} = {z}. So the answer is {z}."
    )
    return Example(question, rationale, str(z))


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _arith_solve(question: str) -> str | None:
    text = question.strip().removesuffix("=").strip()
    if not text or not re.fullmatch(r"[\d\s()+\-*]+", text):
        return None
    return str(_arith_eval(ast.parse(text, mode="eval").body))


def _arith_eval(node: ast.AST) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _arith_eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
        left, right = _arith_eval(node.left), _arith_eval(node.right)
        if abs(left) > 10**9 or abs(right) > 10**9:
            raise OverflowError("too large")
        return (
            left + right
            if isinstance(node.op, ast.Add)
            else left - right
            if isinstance(node.op, ast.Sub)
            else left * right
        )
    raise ValueError("not integer arithmetic")


def _int_normalize(text: str) -> str | None:
    found = re.findall(r"-?\d[\d,]*", text)
    if not found:
        return None
    return str(int(found[-1].replace(",", "")))


# --------------------------------------------------------------------------- word sorting

_WORDS = (
    "apple banana cherry dolphin eagle falcon garden harbor island jacket kettle lemon marble needle "
    "orange pencil quartz river saddle tiger umbrella violet window yellow zebra anchor bridge candle "
    "desert engine forest guitar hammer insect jungle kitten ladder mirror nickel oyster parrot rocket "
    "silver tunnel valley walnut basket copper dragon feather glacier helmet lantern meadow puzzle "
    "shadow thunder velvet wizard bottle castle donkey flower ginger honey iris jelly lizard mango"
).split()


def _sort_sample(rng: random.Random) -> Example:
    words = rng.sample(_WORDS, rng.randint(3, 6))
    ordered = sorted(words)
    firsts = ", ".join(f"{w} ({w[0]})" for w in words)
    rationale = (
        f"The words and their first letters: {firsts}. In alphabetical order: {' '.join(ordered)}. "
        f"So the answer is {' '.join(ordered)}."
    )
    return Example(
        f"Sort the following words alphabetically: List: {' '.join(words)}", rationale, " ".join(ordered)
    )


def _sort_solve(question: str) -> str | None:
    match = re.search(r"List:\s*(.+)$", question.strip(), re.DOTALL)
    if not match:
        return None
    words = re.findall(r"[a-z]+", match.group(1).lower())
    return " ".join(sorted(words)) if len(words) >= 2 else None


def _sort_normalize(text: str) -> str | None:
    words = re.findall(r"[a-z]+", text.lower())
    return " ".join(words) if words else None


# --------------------------------------------------------------------------- object counting

_CATEGORIES: dict[str, dict[str, str]] = {
    "fruits": {
        "apple": "apples",
        "banana": "bananas",
        "peach": "peaches",
        "plum": "plums",
        "grape": "grapes",
    },
    "vegetables": {"carrot": "carrots", "onion": "onions", "potato": "potatoes", "cabbage": "cabbages"},
    "animals": {"cat": "cats", "dog": "dogs", "rabbit": "rabbits", "goat": "goats", "fish": "fish"},
    "musical instruments": {"piano": "pianos", "violin": "violins", "drum": "drums", "flute": "flutes"},
}
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
_NUMBER_WORDS = {1: "a", 2: "two", 3: "three", 4: "four", 5: "five"}
_NOUNS = {
    form: (category, singular)
    for category, nouns in _CATEGORIES.items()
    for singular, plural in nouns.items()
    for form in (singular, plural)
}


def _count_sample(rng: random.Random) -> Example:
    asked = rng.choice(list(_CATEGORIES))
    others = [c for c in _CATEGORIES if c != asked]
    chosen = rng.sample(list(_CATEGORIES[asked]), rng.randint(1, 3))
    chosen += [rng.choice(list(_CATEGORIES[c])) for c in rng.sample(others, rng.randint(1, 2))]
    rng.shuffle(chosen)
    items, counted, total = [], [], 0
    for noun in chosen:
        n = rng.randint(1, 4)
        category = _NOUNS[noun][0]
        word = _NUMBER_WORDS[n] if n > 1 else ("an" if noun[0] in "aeiou" else "a")
        phrase = f"{word} {_CATEGORIES[category][noun] if n > 1 else noun}"
        items.append(phrase)
        if category == asked:
            counted.append(f"{phrase} ({n})")
            total += n
    listed = ", ".join(items[:-1]) + f" and {items[-1]}"
    question = f"I have {listed}. How many {asked} do I have?"
    rationale = (
        f"The {asked} are: {', '.join(counted)}. Adding them up gives {total}. So the answer is {total}."
    )
    return Example(question, rationale, str(total))


def _count_solve(question: str) -> str | None:
    match = re.fullmatch(r"I have (.+)\. How many ([a-z ]+) do I have\?", question.strip())
    if not match or match.group(2) not in _CATEGORIES:
        return None
    total = 0
    for phrase in re.split(r",\s*(?:and\s+)?|\s+and\s+", match.group(1)):
        parts = phrase.strip().split(maxsplit=1)
        if len(parts) != 2 or parts[0] not in _NUMBERS or parts[1] not in _NOUNS:
            return None
        if _NOUNS[parts[1]][0] == match.group(2):
            total += _NUMBERS[parts[0]]
    return str(total)


# --------------------------------------------------------------------------- date arithmetic


def _date_sample(rng: random.Random) -> Example:
    today = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randint(0, 365 * 30))
    days = rng.randint(1, 40)
    later = rng.random() < 0.5
    result = today + datetime.timedelta(days=days if later else -days)
    when = "later" if later else "earlier"
    question = f"Today is {today:%m/%d/%Y}. What is the date {days} days {when} in MM/DD/YYYY?"
    rationale = (
        f"Today is {today:%m/%d/%Y}. Going {days} days {'forward' if later else 'back'} gives "
        f"{result:%m/%d/%Y}. So the answer is {result:%m/%d/%Y}."
    )
    return Example(question, rationale, f"{result:%m/%d/%Y}")


def _date_solve(question: str) -> str | None:
    match = re.search(
        r"Today is (\d{1,2})/(\d{1,2})/(\d{4})\. What is the date (\d+) days? (later|earlier)", question
    )
    if not match:
        return None
    month, day, year, days = (int(match.group(i)) for i in range(1, 5))
    today = datetime.date(year, month, day)
    result = today + datetime.timedelta(days=days if match.group(5) == "later" else -days)
    return f"{result:%m/%d/%Y}"


def _date_normalize(text: str) -> str | None:
    found = re.findall(r"(\d{1,2})/(\d{1,2})/(\d{4})", text)
    if not found:
        return None
    month, day, year = (int(v) for v in found[-1])
    return f"{month:02d}/{day:02d}/{year:04d}"


TASKS: dict[str, ReasoningTask] = {
    task.name: task
    for task in (
        ReasoningTask(
            "boolean_expressions",
            "Evaluate the result of a random Boolean expression. Answer True or False.",
            _bool_sample,
            _bool_solve,
            _bool_normalize,
        ),
        ReasoningTask(
            "multistep_arithmetic",
            "Solve the multi-step arithmetic problem. Answer with an integer.",
            _arith_sample,
            _arith_solve,
            _int_normalize,
        ),
        ReasoningTask(
            "word_sorting",
            "Sort a list of words alphabetically. Answer with the sorted words separated by spaces.",
            _sort_sample,
            _sort_solve,
            _sort_normalize,
        ),
        ReasoningTask(
            "object_counting",
            "Count the objects of the asked kind. Answer with an integer.",
            _count_sample,
            _count_solve,
            _int_normalize,
        ),
        ReasoningTask(
            "date_arithmetic",
            "Compute the date. Answer in MM/DD/YYYY.",
            _date_sample,
            _date_solve,
            _date_normalize,
        ),
    )
}


def get_task(name: str) -> ReasoningTask:
    """The task called ``name``; an unknown name is a :class:`ProtegeError` listing the near ones."""
    if name not in TASKS:
        near = closest(name, TASKS)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ProtegeError(f"unknown reasoning task {name!r}{hint} Tasks: {', '.join(TASKS)}")
    return TASKS[name]
