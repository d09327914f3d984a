"""Self-check questions at the end of a chapter: a number or a choice, answered in the notebook.

``quiz.show(questions)`` draws them with ipywidgets (a box or buttons, a Check button and the
feedback beside it); ``quiz.answer(question, value)`` gives the same feedback as text, where no
widget can be drawn. They are not graded. The right answers are kept as salted hashes, so a
glance at the notebook does not give them away; ``digest`` makes one for a new question.
"""

from __future__ import annotations

import ast
import hashlib
import html
from collections.abc import Sequence
from dataclasses import dataclass

import ipywidgets as widgets

from minimoe.checks import check_int


@dataclass(frozen=True)
class Question:
    """One question. ``text`` may hold $...$ maths; ``digest`` is ``digest(text, right answer)``."""

    text: str
    digest: str
    choices: tuple[str, ...] = ()  # multiple choice when given, else a number
    decimals: int = 0  # a number is compared after rounding to this many decimals
    hint: str = ""  # shown after a wrong answer

    def __post_init__(self) -> None:
        check_int("decimals", self.decimals, 0, 15)  # float formatting: no negative places
        if len(set(self.choices)) != len(self.choices) or len(self.choices) > 26:
            raise ValueError(
                f"choices must be distinct and at most 26 (letters a-z), got {list(self.choices)}"
            )
        if not all(isinstance(c, str) and c.strip() for c in self.choices):
            raise ValueError(f"choices must be non-empty strings, got {list(self.choices)}")


def number(text: str, digest: str, decimals: int = 0, hint: str = "") -> Question:
    """A question answered with a number, rounded to ``decimals`` before the comparison."""
    return Question(text, digest, (), decimals, hint)


def choice(text: str, choices: Sequence[str], digest: str, hint: str = "") -> Question:
    """A multiple-choice question; the answer is one of ``choices`` (or its letter, a, b, ...)."""
    if isinstance(choices, str) or len(choices) < 2:
        raise ValueError(
            f"a choice question needs a sequence of 2 or more choices, got {choices!r}"
        )
    return Question(text, digest, tuple(choices), 0, hint)


def _normalized(question: Question, value: object) -> str:
    """The answer as the text that is hashed; ValueError if it is no answer to this question."""
    if question.choices:
        value = str(value).strip()
        letters = "abcdefghijklmnopqrstuvwxyz"[: len(question.choices)]
        if len(value) == 1 and value.lower() in letters:
            return question.choices[letters.index(value.lower())]
        if value not in question.choices:
            raise ValueError(f"pick one of {list(question.choices)} (or its letter)")
        return value
    try:
        x = float(str(value).strip())
    except ValueError:
        raise ValueError("answer with a number, e.g. 0.25") from None
    text = f"{round(x, question.decimals):.{question.decimals}f}"
    return text.lstrip("-") if float(text) == 0 else text  # -0.00 is 0.00


def _hash(text: str, normalized: str) -> str:
    return hashlib.sha256(f"{text}\0{normalized}".encode()).hexdigest()[:16]


def digest(text: str, answer: object, choices: Sequence[str] = (), decimals: int = 0) -> str:
    """The stored form of a question's right answer (for whoever writes a question)."""
    return _hash(text, _normalized(Question(text, "", tuple(choices), decimals), answer))


def is_right(question: Question, value: object) -> bool:
    """Whether ``value`` answers ``question``; False for anything that is no answer."""
    try:
        return _hash(question.text, _normalized(question, value)) == question.digest
    except ValueError:
        return False


def answer(question: Question, value: object) -> str:
    """Feedback on one answer, as text: the same as the widget's Check button gives."""
    try:
        _normalized(question, value)
    except ValueError as err:
        return f"Not an answer: {err}."
    if is_right(question, value):
        return "Right."
    rounding = f" (rounded to {question.decimals} decimals)" if question.decimals else ""
    return f"Not yet{rounding}. {question.hint}".strip()


def solve(question: Question, search: int = 10**6) -> str | None:
    """The right answer, recovered from the digest (for the website, which shows it behind a
    reveal): the matching choice, or the first of 0, +-1, +-2, ... (in units of the last
    decimal, ``search`` of them) that matches; None if none does."""
    if question.choices:
        return next((c for c in question.choices if is_right(question, c)), None)
    unit = 10**question.decimals
    for n in range(search):
        for m in (n, -n) if n else (0,):
            text = f"{m / unit:.{question.decimals}f}"
            if _hash(question.text, text) == question.digest:
                return text
    return None


def questions_in(source: str) -> list[Question]:
    """The questions a self-check cell writes (``quiz.number(...)``, ``quiz.choice(...)`` with
    literal arguments), read without running the cell: how the website gets them."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        make = {"number": number, "choice": choice}.get(node.func.attr)
        if make is not None and getattr(node.func.value, "id", None) == "quiz":
            args = [ast.literal_eval(a) for a in node.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            found.append((node.lineno, node.col_offset, make(*args, **kwargs)))
    return [q for *_, q in sorted(found, key=lambda f: f[:2])]


def _math_html(text: str) -> str:
    """Text with $...$ maths as HTML: escaped, the maths in Sphinx's MathJax spans."""
    parts = text.split("$")
    if len(parts) % 2 == 0:  # an odd number of $: no maths
        return html.escape(text)
    return "".join(
        html.escape(part)
        if i % 2 == 0
        else f'<span class="math notranslate nohighlight">\\({html.escape(part)}\\)</span>'
        for i, part in enumerate(parts)
    )


def as_html(questions: Sequence[Question]) -> str:
    """The questions as static HTML, each with its hint and its answer behind a reveal."""
    items = []
    for q in questions:
        body = [f"<p>{_math_html(q.text)}</p>"]
        if q.choices:
            body.append('<ol type="a">')
            body += [f"<li>{_math_html(c)}</li>" for c in q.choices]
            body.append("</ol>")
        if q.hint:
            body.append(
                f'<details class="quiz-hint"><summary>Hint</summary><p>{_math_html(q.hint)}</p>'
                "</details>"
            )
        right = solve(q)
        if right is not None:
            if q.choices:
                letter = "abcdefghij"[q.choices.index(right)]
                right = f"({letter}) {right}"
            body.append(
                '<details class="quiz-answer"><summary>Answer</summary>'
                f"<p>{_math_html(right)}</p></details>"
            )
        items.append(f"<li>{''.join(body)}</li>")
    return f'<ol class="quiz">{"".join(items)}</ol>'


class Quiz(widgets.VBox):
    """The questions as widgets; as text (``str``) where no widget can be drawn."""

    def __init__(self, questions: Sequence[Question]):
        self.questions = tuple(questions)
        shared = _Shared()
        rows = [_row(i, q, shared) for i, q in enumerate(self.questions, 1)]
        super().__init__([w for row in rows for w in row], layout=shared.layout())

    def __str__(self) -> str:
        lines = []
        for i, q in enumerate(self.questions, 1):
            lines.append(f"{i}. {q.text}")
            lines += [f"   ({letter}) {c}" for letter, c in zip("abcdefghij", q.choices)]
        lines.append("Check an answer without widgets: quiz.answer(question, value)")
        return "\n".join(lines)

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = str(self)  # the full questions, not "Quiz(children=...)"
        return bundle


class _Shared:
    """One layout and one style model per kind, shared by every widget of the quiz: a notebook
    stores each model's state, and a quiz of separate ones would add ~100 kB to it."""

    def __init__(self) -> None:
        self.layouts: dict[str, widgets.Layout] = {}
        self.styles: dict[type, widgets.Widget] = {}

    def layout(self, width: str = "") -> widgets.Layout:
        if width not in self.layouts:
            self.layouts[width] = widgets.Layout(width=width or None)
        return self.layouts[width]

    def make(self, kind: type, width: str = "", **kwargs) -> widgets.Widget:
        if kind in self.styles:
            kwargs["style"] = self.styles[kind]
        made = kind(layout=self.layout(width), **kwargs)
        if hasattr(made, "style"):
            self.styles.setdefault(kind, made.style)
        return made


def _row(i: int, question: Question, shared: _Shared) -> list[widgets.Widget]:
    """The question, its answer box or buttons, a Check button and the feedback beside it."""
    label = shared.make(widgets.HTMLMath, value=f"<b>{i}.</b> {html.escape(question.text)}")
    if question.choices:
        box = shared.make(widgets.RadioButtons, "auto", options=question.choices, value=None)
    else:
        box = shared.make(widgets.Text, "10em", placeholder="a number")
    check = shared.make(widgets.Button, "auto", description="Check")
    feedback = shared.make(widgets.HTML)

    def on_check(_: widgets.Button) -> None:
        if box.value is None:
            feedback.value = "Pick an answer first."
            return
        text = answer(question, box.value)
        colour = "green" if text == "Right." else "firebrick"
        feedback.value = f'<span style="color:{colour}">{html.escape(text)}</span>'

    check.on_click(on_check)
    if question.choices:  # the choices one under the other, the button below them
        return [label, box, shared.make(widgets.HBox, children=[check, feedback])]
    return [label, shared.make(widgets.HBox, children=[box, check, feedback])]


def show(questions: Sequence[Question]) -> Quiz:
    """The questions as a widget: a notebook cell that ends with ``quiz.show(...)`` draws it."""
    return Quiz(questions)
