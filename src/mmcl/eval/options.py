"""Multiple-choice options as prompts list them, and which option an answer names by its text.

The `option_letter` scorer (mmcl.eval.scorers) uses both so that "square" is credited when the prompt lists
"B. square": benchmarks such as ScienceQA and MMBench count an answer that gives the option's text as that option.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["option_named", "parse_options"]

# An option marker: "(A)", "A.", "A)" or "A:" (capital letters only, so the article "a" is never one), opening a line
# or following whitespace or a colon ("Options:(A) red"), with the option's text after it on the same line.
_MARKER = re.compile(
    r"(?:^|(?<=[\s:]))(?:\((?P<paren>[A-Z])\)[ \t]*|(?P<letter>[A-Z])(?P<sep>[.):])[ \t]+)(?=\S)", re.MULTILINE
)


def parse_options(prompt: str) -> dict[str, str]:
    """The options a prompt lists, as {letter: text} in letter order; {} when it lists none.

    Reads options one per line ("A. circle", "(B) square", "B) square", "A: cat") or inline in one line
    ("Options: (A) red (B) blue"). A parse is trusted only as a run of markers in one style whose letters go A, B,
    C, ... (at least A and B); markers of other styles or letters in between are part of an option's text, so
    "A. vitamin C. B. iron" gives {"A": "vitamin C.", "B": "iron"}. When a prompt holds several runs (a context
    quoting "(A)" before the real list), the longest wins, the later one on a tie. An option's text is what follows
    its marker up to the next marker of the run or the end of its line, stripped.
    """
    markers = [(m.start(), m.end(), m["paren"] or m["letter"], m["sep"] or "()") for m in _MARKER.finditer(prompt)]
    best: list[tuple[int, int, str, str]] = []
    for i, first in enumerate(markers):
        if first[2] != "A":
            continue
        run = [first]
        for m in markers[i + 1 :]:
            if m[3] == first[3] and ord(m[2]) == ord(run[-1][2]) + 1:
                run.append(m)
        if len(run) >= 2 and len(run) >= len(best):
            best = run
    options = {}
    for k, (_, end, letter, _) in enumerate(best):
        stop = best[k + 1][0] if k + 1 < len(best) else len(prompt)
        options[letter] = prompt[end:stop].split("\n", 1)[0].strip()
    return options


def _spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """Where `phrase` occurs in `text` as whole words (both are single-space separated words)."""
    return [m.span() for m in re.finditer(rf"(?<!\S){re.escape(phrase)}(?!\S)", text)]


def option_named(answer: str, options: Mapping[str, str]) -> str | None:
    """The letter of the one option that `answer` names by its text, or None when it names none or several.

    `answer` and the option texts must already be normalised the same way (words separated by single spaces);
    options with empty text are ignored. An answer names an option when it equals the option's text; failing
    that, when it contains the option's text as whole words. An occurrence lying inside an occurrence of a longer
    option's text does not count, so with options "cat" and "black cat", "it is black cat" names only "black cat".
    Two options with the same text are never told apart (None).
    """
    texts = {letter: text for letter, text in options.items() if text}
    equal = [letter for letter, text in texts.items() if text == answer]
    if equal:
        return equal[0] if len(equal) == 1 else None
    spans = {letter: _spans(answer, text) for letter, text in texts.items()}

    def inside_another(letter: str, span: tuple[int, int]) -> bool:
        return any(o != letter and s != span and s[0] <= span[0] and span[1] <= s[1]
                   for o, ss in spans.items() for s in ss)

    named = [letter for letter, ss in spans.items() if any(not inside_another(letter, s) for s in ss)]
    return named[0] if len(named) == 1 else None
