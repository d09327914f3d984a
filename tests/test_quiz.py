"""course.quiz (the chapters' self-checks), and every chapter's answer key."""

import math
import statistics
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
import torch

from course import quiz
from minimoe import routing
from minimoe.analysis import max_violation
from minimoe.dispatch import expert_capacity
from minimoe.losses import load_balance_loss
from minimoe.parallel import Exchange

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def bias_change(u: float, load: list[int], expert: int) -> float:
    state = {"bias": torch.zeros(len(load))}
    routing.SigmoidTopK(bias_rate=u).update_state(
        state, SimpleNamespace(tokens_per_expert=torch.tensor(load))
    )
    return state["bias"][expert].item()


def ideal_top_p(m: int, p: float) -> int:
    """Experts top-p keeps for a router that gives m of 8 experts 1/m each and the rest 0."""
    logits = torch.full((1, 8), -1e4)
    logits[0, :m] = 0.0
    return int(routing.top_p(logits, p).expert_counts)


# The right answers, from the library where it computes them; a letter picks a choice.
KEYS = {
    "01": [
        expert_capacity(4096 * 2, 8, 1.25),
        "b",
        load_balance_loss(torch.eye(4)[[0, 0, 0]]).item(),
        "c",
        8,
    ],
    "02": [
        routing.entropy(torch.tensor([0.5, 0.5, 0.0, 0.0])).item(),
        routing.normalized_entropy(torch.tensor([0.5, 0.5, 0.0, 0.0])).item(),
        1.6 / math.log(8),
        "b",
        "c",
    ],
    "03": ["c", 0.75 * 2 + 0.25 * 8, "a", 100 * 2 / 32, "b"],
    "04": [1, 2, 3, "c", "b"],
    "04b": [ideal_top_p(3, 0.5), ideal_top_p(3, 0.7), "b", "b", "b"],
    "05": [2, 0.05 / 0.85, 1, "b", "c"],
    "05b": [2 * (1 - 0.66), 1 - 0.68 * (1 - 0.8), "b", "b", "b"],
    "06": [
        "c",
        (400 + 200 * 1.5) / 600,
        statistics.stdev([0.01, 0.02, 0.03]) / math.sqrt(3),
        "a",
        "b",
    ],
    "07": [0.75, Exchange(0, (0, 300), (0, 200), 256, 0).bytes_sent, "b", 5 * 2 // 8, "c"],
    "08": [
        bias_change(0.01, [10, 30, 20, 20], 1),
        max_violation(torch.tensor([10, 30, 20, 20])),
        "b",
        "a",
        math.comb(8, 2),
    ],
}


def chapter_quiz(number: str) -> list[quiz.Question]:
    (path,) = NOTEBOOKS.glob(f"{number}_*.ipynb")
    cells = [
        c.source for c in nbformat.read(path, as_version=4).cells if "quiz.show(QUIZ)" in c.source
    ]
    assert len(cells) == 1, "one self-check per chapter"
    namespace: dict = {}
    exec(cells[0], namespace)  # the cell defines QUIZ and draws it
    return namespace["QUIZ"]


@pytest.mark.parametrize("number", sorted(KEYS))
def test_every_chapter_answer_key(number):
    questions = chapter_quiz(number)
    assert len(questions) == len(KEYS[number]) == 5
    for q, key in zip(questions, KEYS[number]):
        assert quiz.is_right(q, key), f"chapter {number}: {q.text!r} does not take {key!r}"
        if q.choices:  # exactly one right choice
            assert sum(quiz.is_right(q, c) for c in q.choices) == 1


def test_numbers_are_compared_after_rounding():
    text = "How many slots?"
    q = quiz.number(text, quiz.digest(text, 0.7694, decimals=2), decimals=2, hint="ln 8")
    assert quiz.is_right(q, 0.77) and quiz.is_right(q, "0.769") and quiz.is_right(q, " 0.7712 ")
    assert not quiz.is_right(q, 0.78) and not quiz.is_right(q, "seven")
    assert quiz.answer(q, 0.78) == "Not yet (rounded to 2 decimals). ln 8"
    assert quiz.answer(q, "seven").startswith("Not an answer")
    zero = quiz.number("z", quiz.digest("z", 0.0, decimals=2), decimals=2)
    assert quiz.is_right(zero, -0.001)  # -0.00 is 0.00


def test_choices_take_the_text_or_the_letter():
    choices = ["one", "two", "three"]
    q = quiz.choice("Which?", choices, quiz.digest("Which?", "two", choices), hint="not one")
    assert quiz.is_right(q, "two") and quiz.is_right(q, "b") and quiz.is_right(q, "B")
    assert quiz.answer(q, "a") == "Not yet. not one"
    assert quiz.answer(q, "four").startswith("Not an answer")
    assert quiz.digest("Which?", "two", choices) != quiz.digest(
        "Which else?", "two", choices
    )  # salted


def test_the_widget_checks_and_reads_as_text():
    text = "How many?"
    q = quiz.number(text, quiz.digest(text, 28))
    c = quiz.choice("Pick", ["x", "y"], quiz.digest("Pick", "y", ["x", "y"]))
    box = quiz.show([q, c])
    _, row, _, _, choice_row = box.children  # number: label, row; choice: label, buttons, row
    entry, check, feedback = row.children
    entry.value = "28"
    check.click()
    assert "Right." in feedback.value
    entry.value = "27"
    check.click()
    assert "Not yet" in feedback.value
    choice_row.children[0].click()  # nothing picked yet
    assert choice_row.children[1].value == "Pick an answer first."
    plain = box._repr_mimebundle_()["text/plain"]
    assert "1. How many?" in plain and "(b) y" in plain and "quiz.answer" in plain


# ---- the website's self-check: the questions as text, each answer behind a reveal ------------


def quiz_cell(number: str) -> str:
    (path,) = NOTEBOOKS.glob(f"{number}_*.ipynb")
    (cell,) = [c for c in nbformat.read(path, as_version=4).cells if "quiz.show(QUIZ)" in c.source]
    return cell.source


@pytest.mark.parametrize("number", sorted(KEYS))
def test_the_site_reads_each_chapters_questions_without_running_the_cell(number):
    questions = quiz.questions_in(quiz_cell(number))
    assert questions == chapter_quiz(number)
    for q, key in zip(questions, KEYS[number]):
        right = quiz.solve(q)
        assert right is not None and quiz.is_right(q, right) and quiz.is_right(q, key)


def test_solve_recovers_numbers_choices_and_says_when_it_cannot():
    q = quiz.number("Slots?", quiz.digest("Slots?", -12.5, decimals=1), decimals=1)
    assert quiz.solve(q) == "-12.5"
    c = quiz.choice("Pick", ["x", "y"], quiz.digest("Pick", "y", ["x", "y"]))
    assert quiz.solve(c) == "y"
    far = quiz.number("Far?", quiz.digest("Far?", 5000))
    assert quiz.solve(far, search=100) is None and quiz.solve(far) == "5000"


def test_as_html_hides_hint_and_answer_and_keeps_the_maths():
    q = quiz.number("$E = 8$: slots & more?", quiz.digest("$E = 8$: slots & more?", 3), hint="k")
    c = quiz.choice("Pick", ["$x$", "y"], quiz.digest("Pick", "y", ["$x$", "y"]))
    page = quiz.as_html([q, c])
    assert r'<span class="math notranslate nohighlight">\(E = 8\)</span>: slots &amp; more?' in page
    assert '<ol type="a"><li><span class="math notranslate nohighlight">\\(x\\)</span></li>' in page
    answers = page.split('<details class="quiz-answer"><summary>Answer</summary>')[1:]
    assert [a.split("</details>")[0] for a in answers] == ["<p>3</p>", "<p>(b) y</p>"]
    assert page.count('<details class="quiz-hint">') == 1


def test_a_question_refuses_negative_decimals_and_choice_questions_without_choices():
    with pytest.raises(ValueError, match="decimals must be an int in \\[0, 15\\], got decimals=-1"):
        quiz.number("How many?", "0" * 16, decimals=-1)
    for choices in ([], ["only"], "abc"):
        with pytest.raises(ValueError, match="a choice question needs a sequence of 2 or more"):
            quiz.choice("Which?", choices, "0" * 16)
    with pytest.raises(ValueError, match="choices must be distinct"):
        quiz.choice("Which?", ["a", "a"], "0" * 16)
