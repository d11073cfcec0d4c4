"""The guide's cleaning rules (control characters, markup, punctuation, whitespace) and the
folding that finds near duplicates; each rule can be switched off in data.clean and is counted.
"""

from __future__ import annotations

import difflib
import html
import re
import unicodedata
from collections.abc import Callable

from loraflow.config import CleaningConfig
from loraflow.data.records import Example

RULES = (
    "strip_control", "strip_html", "strip_markdown", "normalize_punctuation", "trim_whitespace"
)


PUNCTUATION = str.maketrans(
    {
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
        "\u00ab": '"', "\u00bb": '"',
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
        "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-",
        "\u2015": "-", "\u2212": "-",
    }
)  # fmt: skip
# C0 controls but tab, newline and carriage return; DEL; C1 controls
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
HTML_TAG = re.compile(r"<(?:[a-zA-Z/!][^<>]*)>")
MARKDOWN = (
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # image -> alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # link -> text
    (re.compile(r"^```[^\n]*\n?|\n?```$", re.M), ""),  # code fences
    (re.compile(r"^#{1,6}[ \t]+", re.M), ""),  # headings
    (re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1"), r"\2"),  # bold
    (re.compile(r"(?<![\w*])\*(?=\S)([^*\n]+?)(?<=\S)\*(?!\w)"), r"\1"),  # italic
    (re.compile(r"`([^`\n]+)`"), r"\1"),  # inline code
)
FOLD = re.compile(r"[\W_]+")
# fold() for ASCII text in one bytes.translate: lower-case letters and digits kept, every other
# byte a space (NFKC and casefold change no ASCII character but case; [\W_] is "not a letter
# or digit" there). Most text is ASCII and this is ~3x faster than the regex.
_ASCII_FOLD = bytes(
    c | 0x20 if chr(c).isalpha() else c if chr(c).isdigit() else 0x20 for c in range(128)
) + bytes(128)


def strip_control(text: str) -> str:
    return CONTROL.sub("", text)


def strip_html(text: str) -> str:
    return html.unescape(HTML_TAG.sub("", text)) if "<" in text or "&" in text else text


def strip_markdown(text: str) -> str:
    for pattern, repl in MARKDOWN:
        text = pattern.sub(repl, text)
    return text


def normalize_punctuation(text: str) -> str:
    # every character PUNCTUATION maps is outside ASCII, and isascii() costs nothing
    return text if text.isascii() else text.translate(PUNCTUATION)


def fold(text: str) -> str:
    """Text for near-duplicate and similarity checks: no case, spacing, punctuation, markup."""
    text = strip_html(text)
    if text.isascii():
        return b" ".join(text.encode().translate(_ASCII_FOLD).split()).decode()
    return FOLD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def cleaning_steps(clean: CleaningConfig) -> list[tuple[str, Callable[[str], str]]]:
    steps: list[tuple[str, Callable[[str], str]]] = []
    if clean.strip_control:
        steps.append(("strip_control", strip_control))
    if clean.strip_markup in ("html", "html+markdown"):
        steps.append(("strip_html", strip_html))
    if clean.strip_markup == "html+markdown":
        steps.append(("strip_markdown", strip_markdown))
    if clean.normalize_punctuation:
        steps.append(("normalize_punctuation", normalize_punctuation))
    if clean.trim_whitespace:
        steps.append(("trim_whitespace", str.strip))
    return steps


def similarity(a: str, b: str) -> float:
    """Similarity 0..1 of two folded texts; cheap bounds first, difflib only when close."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    shorter, longer = sorted((len(a), len(b)))
    if shorter / longer < 0.5:
        return 2 * shorter / (shorter + longer)  # an upper bound of difflib's ratio
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def rule_runner(
    steps: list[tuple[str, Callable[[str], str]]],
) -> tuple[Callable[[str], str], set[str]]:
    """A function that applies the cleaning steps to one text, and the set in which it records
    the names of the rules that changed something (shared by every record kind's cleaning)."""
    changed: set[str] = set()

    def run(text: str) -> str:
        for name, step in steps:
            new = step(text)
            if new != text:
                changed.add(name)
                text = new
        return text

    return run, changed


def clean_example(
    example: Example, steps: list[tuple[str, Callable[[str], str]]]
) -> tuple[Example, list[str]]:
    """Apply the cleaning steps to every text field; return the example and the rules that
    changed something."""
    run, changed = rule_runner(steps)

    if not steps:
        return example, []
    cleaned = Example.model_construct(  # the fields are strings already: no validation again
        instruction=run(example.instruction),
        input=run(example.input),
        output=run(example.output),
        messages=[{"role": m["role"], "content": run(m["content"])} for m in example.messages]
        if example.messages
        else None,
    )
    return cleaned, [name for name, _ in steps if name in changed]
