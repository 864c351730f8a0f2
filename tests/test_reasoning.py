"""BBH-style reasoning tasks (protege.data.reasoning): solvers and extractors against hand-computed
answers, generators that agree with independent references, disjoint deterministic splits."""

from __future__ import annotations

import datetime
import re

import pytest

from protege.data.reasoning import TASKS, Example, format_question, get_task
from protege.errors import ProtegeError


@pytest.mark.parametrize(
    ("task", "question", "answer"),
    [
        ("boolean_expressions", "not ( True and False ) or False is", "True"),
        ("boolean_expressions", "True and not True is", "False"),
        ("boolean_expressions", "not not ( False or True ) and False is", "False"),
        ("multistep_arithmetic", "((-3 + 7) * (2 - 5)) =", "-12"),
        ("multistep_arithmetic", "((2 * 3) - (4 + -1)) =", "3"),
        ("word_sorting", "Sort the following words alphabetically: List: pear apple fig", "apple fig pear"),
        (
            "object_counting",
            "I have a violin, two apples and a piano. How many musical instruments do I have?",
            "2",
        ),
        ("object_counting", "I have three fish, a cat and two carrots. How many animals do I have?", "4"),
        ("date_arithmetic", "Today is 02/27/2020. What is the date 3 days later in MM/DD/YYYY?", "03/01/2020"),
        ("date_arithmetic", "Today is 01/05/2021. What is the date 10 days earlier in MM/DD/YYYY?", "12/26/2020"),
    ],
)
def test_solvers_against_hand_computed_answers(task: str, question: str, answer: str) -> None:
    assert TASKS[task].solve(question) == answer


@pytest.mark.parametrize(
    ("task", "question"),
    [
        ("boolean_expressions", "True and ( False is"),
        ("boolean_expressions", "maybe or True is"),
        ("multistep_arithmetic", "__import__('os').getcwd() ="),
        ("multistep_arithmetic", "((1 / 2) + 3) ="),
        ("word_sorting", "Sort these: pear apple"),
        ("object_counting", "I have a spaceship and two apples. How many fruits do I have?"),
        ("object_counting", "How many animals do I have?"),
        ("date_arithmetic", "Today is 02/30/2020. What is the date 3 days later in MM/DD/YYYY?"),
        ("date_arithmetic", "What day is it?"),
    ],
)
def test_unparseable_questions_have_no_answer(task: str, question: str) -> None:
    assert TASKS[task].solve(question) is None


def test_answer_extraction_and_exact_match() -> None:
    arith, boolean = TASKS["multistep_arithmetic"], TASKS["boolean_expressions"]
    sort, date = TASKS["word_sorting"], TASKS["date_arithmetic"]
    assert arith.extract_answer("First 4, then -3. So the answer is -12.") == "-12"
    assert arith.extract_answer("So the answer is 5. Then 7 is wrong") == "5"  # the answer's sentence
    assert arith.extract_answer("the answer is -5 - -32 = 27.") == "27"
    assert arith.extract_answer("The answer is 1,024") == "1024"
    assert arith.extract_answer("Answer: 42\n") == "42"
    assert arith.extract_answer("I think\nit is 41") == "41"  # no "answer": the last line
    assert arith.extract_answer("no number here") is None and arith.extract_answer("") is None
    assert boolean.extract_answer("so the answer is: true.") == "True"
    assert sort.extract_answer("So the answer is Apple, fig, pear.") == "apple fig pear"
    assert date.extract_answer("So the answer is 3/1/2020.") == "03/01/2020"
    assert arith.score("So the answer is -12.", "-12") and not arith.score("So the answer is 12.", "-12")
    assert boolean.score("The answer is FALSE", "False") and not boolean.score("The answer is", "False")
    assert sort.score("So the answer is apple fig pear.", "apple fig pear")
    assert not sort.score("So the answer is fig apple pear.", "apple fig pear")


def test_generated_examples_agree_with_independent_references() -> None:
    for task in TASKS.values():
        for e in task.make(150, seed=3):
            assert task.solve(e.question) == task.normalize(e.answer), e
            assert task.score(e.rationale, e.answer), e  # every rationale ends in its own answer
            assert e.rationale.endswith(f"So the answer is {e.answer}.")
    for e in TASKS["multistep_arithmetic"].make(100, seed=1):  # Python's own arithmetic
        assert str(eval(e.question.rstrip("= "))) == e.answer  # noqa: S307 (digits and + - * only)
    for e in TASKS["boolean_expressions"].make(100, seed=1):  # Python's own boolean semantics
        assert str(eval(e.question.removesuffix(" is"))) == e.answer  # noqa: S307
    for e in TASKS["word_sorting"].make(50, seed=1):
        assert e.answer.split() == sorted(e.question.split("List: ")[1].split())
    for e in TASKS["date_arithmetic"].make(50, seed=1):
        m, d, y, n = map(int, re.findall(r"\d+", e.question)[:4])
        sign = 1 if "later" in e.question else -1
        got = datetime.date(y, m, d) + datetime.timedelta(days=sign * n)
        assert got.strftime("%m/%d/%Y") == e.answer


def test_splits_are_deterministic_and_disjoint() -> None:
    for task in TASKS.values():
        a = task.splits(seed_pool=8, preference=40, test=60, seed=0)
        assert a == task.splits(seed_pool=8, preference=40, test=60, seed=0)
        assert (len(a.seed_pool), len(a.preference), len(a.test)) == (8, 40, 60)
        texts = [e.question for e in (*a.seed_pool, *a.preference, *a.test)]
        assert len(set(texts)) == len(texts)  # no question in two sets
        assert task.make(20, seed=1) != task.make(20, seed=0)
        assert task.make(10, seed=0) == task.make(20, seed=0)[:10]  # a stream: more keeps the first ones


def test_prompt_format_and_unknown_task() -> None:
    task = get_task("word_sorting")
    demo = Example("Sort the following words alphabetically: List: b a", "a b. So the answer is a b.", "a b")
    prompt = format_question(task, "Sort the following words alphabetically: List: d c", [demo])
    assert prompt == (
        f"{task.instruction}\n\nQ: {demo.question}\nA: {demo.rationale}\n\n"
        "Q: Sort the following words alphabetically: List: d c\nA:"
    )
    with pytest.raises(ProtegeError, match="did you mean 'word_sorting'"):
        get_task("word_sort")
