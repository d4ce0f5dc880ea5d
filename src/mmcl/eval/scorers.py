"""Scorers: turn a task's predictions and references into one score (×100) plus per-sample values.

Every scorer has the signature ``(predictions, references) -> ScoreResult`` where ``references[k]`` is the
non-empty list of acceptable answers for ``predictions[k]``. Scorers are looked up by name from the task
manifest, so they live in a registry (``@register_scorer("name")``, ``get_scorer``, ``list_scorers``). A scorer
that needs the prompts (``option_letter`` reads the options they list) declares a keyword-only
``prompts: list[str] | None = None`` parameter; ``run_scorer`` passes them to such scorers only.

A bad *prediction* never raises (models produce garbage; it scores 0). A bad *reference* always raises,
because it is a data bug the user must fix.
"""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mmcl.eval.options import option_named, parse_options

__all__ = [
    "ScoreResult",
    "Scorer",
    "box_iou",
    "get_scorer",
    "list_scorers",
    "normalize_answer",
    "register_scorer",
    "run_scorer",
    "takes_prompts",
]


@dataclass(frozen=True)
class ScoreResult:
    """Aggregate score (conventionally ×100) and one value per prediction on the same scale."""

    score: float
    per_sample: list[float]


Scorer = Callable[[list[str], list[list[str]]], ScoreResult]

_REGISTRY: dict[str, Scorer] = {}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def register_scorer(name: str) -> Callable[[Scorer], Scorer]:
    """Decorator registering a scorer under ``name``; duplicates are an error, not a silent override."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"invalid scorer name {name!r}: use lower case letters, digits and '_' starting with a letter "
            "(e.g. 'vqa_accuracy')"
        )
    if name in _REGISTRY:
        raise ValueError(f"a scorer named {name!r} is already registered; pick another name")

    def decorator(fn: Scorer) -> Scorer:
        _REGISTRY[name] = fn
        return fn

    return decorator


def get_scorer(name: str) -> Scorer:
    """Return the scorer registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(list_scorers())}") from None


def list_scorers() -> list[str]:
    """Names of all registered scorers, sorted."""
    return sorted(_REGISTRY)


def takes_prompts(scorer: Scorer) -> bool:
    """Whether `scorer` declares a keyword-only ``prompts`` parameter, i.e. wants the prompts it scores."""
    param = inspect.signature(scorer).parameters.get("prompts")
    return param is not None and param.kind is inspect.Parameter.KEYWORD_ONLY


def run_scorer(name: str, predictions: list[str], references: list[list[str]], *,
               prompts: list[str] | None = None) -> ScoreResult:
    """Score with the scorer registered as `name`, handing it `prompts` only if it declares them (every other
    scorer keeps the plain two-argument signature)."""
    scorer = get_scorer(name)
    if prompts is not None and takes_prompts(scorer):
        return scorer(predictions, references, prompts=prompts)  # type: ignore[call-arg]
    return scorer(predictions, references)


# --------------------------------------------------------------------------------------------- normalisation

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
# Keep "3.5" and "1,000" intact as numbers; every other punctuation mark separates words.
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3})")
_APOSTROPHE = re.compile(r"['’`]")
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))(?:[^\w\s]|_)")  # any punctuation except a decimal point


def normalize_answer(text: str) -> str:
    """VQA-style answer normalisation so that "Two." and "2" compare equal.

    Lower-cases, drops punctuation (keeping decimal points inside numbers, so "3.5" survives), maps the
    number words zero..ten (and "none", as the official VQA evaluation does) to digits, drops the articles
    a/an/the and collapses whitespace. Apostrophes are dropped, so "don't" and "dont" meet, as the official
    contraction table makes them meet.
    """
    text = text.lower().strip()
    text = _THOUSANDS_COMMA.sub("", text)
    text = _APOSTROPHE.sub("", text)  # "don't" -> "dont", not "don t"
    text = _PUNCT.sub(" ", text)
    words = [_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


# ------------------------------------------------------------------------------------------------- helpers


def _check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]], scorer: str) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{scorer}: got {len(predictions)} predictions but {len(references)} reference lists; "
            "pass one reference list per prediction"
        )
    if not predictions:
        raise ValueError(f"{scorer}: no predictions to score; the evaluation set is empty")
    for k, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            what = "a string" if isinstance(refs, str) else "empty"
            raise ValueError(
                f"{scorer}: references[{k}] is {what}; each sample needs a non-empty list of reference strings"
            )


def _result(per_sample: list[float]) -> ScoreResult:
    return ScoreResult(score=float(sum(per_sample) / len(per_sample)), per_sample=per_sample)


# ------------------------------------------------------------------------------------------ accuracy scorers


@register_scorer("exact_match")
def exact_match(predictions: list[str], references: list[list[str]]) -> ScoreResult:
    """100 if the normalised prediction equals any normalised reference, else 0."""
    _check_inputs(predictions, references, "exact_match")
    per = []
    for pred, refs in zip(predictions, references):
        p = normalize_answer(pred)
        per.append(100.0 if any(p == normalize_answer(r) for r in refs) else 0.0)
    return _result(per)


def _vqa_simple(pred: str, refs: Sequence[str]) -> float:
    matches = sum(pred == r for r in refs)
    return min(1.0, matches / 3.0)


@register_scorer("vqa_accuracy")
def vqa_accuracy(predictions: list[str], references: list[list[str]]) -> ScoreResult:
    """VQA accuracy as the official VQA evaluation computes it, ×100, after normalisation: with the benchmark's 10
    human answers, the mean over the 10 leave-one-out sets of min(1, #matches in the other 9 / 3); with any other
    number of references (built-in tasks, converted sets), min(1, #matches / 3)."""
    _check_inputs(predictions, references, "vqa_accuracy")
    per = []
    for pred, refs in zip(predictions, references):
        p, rs = normalize_answer(pred), [normalize_answer(r) for r in refs]
        if len(rs) == 10:
            per.append(100.0 * sum(_vqa_simple(p, rs[:k] + rs[k + 1 :]) for k in range(10)) / 10)
        else:
            per.append(100.0 * _vqa_simple(p, rs))
    return _result(per)


@register_scorer("vqa_accuracy_simple")
def vqa_accuracy_simple(predictions: list[str], references: list[list[str]]) -> ScoreResult:
    """P4's simpler VQA accuracy: min(1, #references equal to the prediction / 3) ×100, after normalisation, over
    all references (no leave-one-out)."""
    _check_inputs(predictions, references, "vqa_accuracy_simple")
    return _result([100.0 * _vqa_simple(normalize_answer(p), [normalize_answer(r) for r in refs])
                    for p, refs in zip(predictions, references)])


@register_scorer("classification")
def classification(predictions: list[str], references: list[list[str]]) -> ScoreResult:
    """Label accuracy: the normalised prediction must equal the first (the label) reference."""
    _check_inputs(predictions, references, "classification")
    per = [
        100.0 if normalize_answer(pred) == normalize_answer(refs[0]) else 0.0
        for pred, refs in zip(predictions, references)
    ]
    return _result(per)


# Letters stand alone when not glued to other letters: "B", "B.", "(B)", "B) text", "is B." but not "Bob".
# An apostrophe before the letter rules out the "s" of "it's".
_CAPITAL_LETTER = re.compile(r"(?<![A-Za-z'’])([A-Z])(?![A-Za-z])")
_LOWER_LETTER = re.compile(r"(?<![A-Za-z'’])([a-z])(?![A-Za-z'’])")


_EXPLICIT_LETTER = [
    re.compile(r"\(([A-Za-z])\)"),  # "(B)"
    # "The answer is B", "Answer: b", "option C"
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Za-z])\b(?![A-Za-z'’])", re.IGNORECASE),
    re.compile(r"^\s*([A-Za-z])\s*(?:[.):]|$)"),  # "B", "B.", "B)", "B:" at the start
]
_ARTICLE_NEXT = re.compile(r"[ \t]+\w")  # "a"/"A" then a word on the same line: "a circle", "is A square"
_ANSWER_LEAD = re.compile(r"^(?:answer is|answer) (?=\S)")  # after normalisation: "The answer is:" -> "answer is"


def _first_letter(patterns: Sequence[re.Pattern[str]], text: str, articles: bool) -> str | None:
    """The first match's letter over `patterns` in order; with `articles`, "a"/"A" followed by a word is skipped."""
    for pattern in patterns:
        for m in pattern.finditer(text):
            if articles and m.group(1) in "aA" and _ARTICLE_NEXT.match(text, m.end(1)):
                continue
            return m.group(1).upper()
    return None


def _option_letter(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter of an answer, in this order:

    1. an explicit form — "(B)", "the answer is B" / "option: B", or a letter that opens the answer as "B", "B."
       or "B)";
    2. when the prompt listed `options`: the one option whose text the answer gives (``option_named`` on the
       normalised answer, "the answer is" / "answer:" dropped), so "Square." and "The answer is square" are B when
       B is "square", while an answer naming two options' texts names none;
    3. the first standalone capital letter, else the first standalone lower-case letter (upper-cased).

    With options, "a"/"A" followed by a word ("a circle", "The answer is a square") is the article, not a letter,
    in steps 1 and 3, so the text decides; without options every step reads as it always did. "A." or "(a)" stays a
    letter either way.
    """
    articles = bool(options)
    letter = _first_letter(_EXPLICIT_LETTER, text, articles)
    if letter is None and options:
        answer = _ANSWER_LEAD.sub("", normalize_answer(text))
        letter = option_named(answer, {k: normalize_answer(v) for k, v in options.items()})
    return letter or _first_letter([_CAPITAL_LETTER, _LOWER_LETTER], text, articles)


@register_scorer("option_letter")
def option_letter(predictions: list[str], references: list[list[str]], *,
                  prompts: list[str] | None = None) -> ScoreResult:
    """Multiple choice: 100 if the option letter found in the prediction equals the reference letter.

    The reference letter is read with the letter rules alone (so "A", "(a)" and "A. cat" all give "A"). Given the
    prompts, the options each lists ("A. circle", "(B) square", ...; see ``parse_options``) also let a prediction
    name its option by text (order in ``_option_letter``); a prompt without options changes nothing. The prediction
    scores 0 when it yields no letter.
    """
    _check_inputs(predictions, references, "option_letter")
    if prompts is not None and len(prompts) != len(predictions):
        raise ValueError(f"option_letter: got {len(prompts)} prompts for {len(predictions)} predictions; "
                         "pass one prompt per prediction, or none")
    per = []
    for k, (pred, refs) in enumerate(zip(predictions, references)):
        ref_letter = _option_letter(refs[0].strip())
        if ref_letter is None:
            raise ValueError(
                f"option_letter: references[{k}][0] = {refs[0]!r} contains no option letter; "
                "multiple-choice references must be a letter such as 'B'"
            )
        options = parse_options(prompts[k]) if prompts is not None else None
        per.append(100.0 if _option_letter(pred, options) == ref_letter else 0.0)
    return _result(per)


# ----------------------------------------------------------------------------------------------- grounding

_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first four numbers of ``text`` as (x1, y1, x2, y2); None if fewer than four or not ordered."""
    nums = [float(x) for x in _NUMBER.findall(text)[:4]]
    if len(nums) < 4 or not all(math.isfinite(x) for x in nums):
        return None
    x1, y1, x2, y2 = nums
    if x2 < x1 or y2 < y1:
        return None
    return x1, y1, x2, y2


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 for invalid (x2<x1 or y2<y1) or empty boxes."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    if ax2 < ax1 or ay2 < ay1 or bx2 < bx1 or by2 < by1:
        return 0.0
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


@register_scorer("box_iou")
def box_iou_scorer(predictions: list[str], references: list[list[str]]) -> ScoreResult:
    """Grounding: 100 if the predicted box has IoU >= 0.5 with any reference box (format "[x1, y1, x2, y2]")."""
    _check_inputs(predictions, references, "box_iou")
    per = []
    for k, (pred, refs) in enumerate(zip(predictions, references)):
        ref_boxes = []
        for r, ref in enumerate(refs):
            box = _parse_box(ref)
            if box is None:
                raise ValueError(
                    f"box_iou: references[{k}][{r}] = {ref!r} is not a box; "
                    "write it as '[x1, y1, x2, y2]' with x1 <= x2 and y1 <= y2"
                )
            ref_boxes.append(box)
        pbox = _parse_box(pred)
        hit = pbox is not None and any(box_iou(pbox, rb) >= 0.5 for rb in ref_boxes)
        per.append(100.0 if hit else 0.0)
    return _result(per)


# --------------------------------------------------------------------------------------------------- CIDEr-D

_CIDER_N = 4
_CIDER_SIGMA = 6.0


def _cider_tokens(text: str) -> list[str]:
    return _PUNCT.sub(" ", text.lower()).split()


def _ngram_counts(words: list[str]) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for n in range(1, _CIDER_N + 1) for i in range(len(words) - n + 1))


def _tfidf(
    counts: Counter[tuple[str, ...]], df: Counter[tuple[str, ...]], log_n: float
) -> tuple[list[dict[tuple[str, ...], float]], list[float]]:
    """Per-n tf-idf vectors (tf = raw count, idf = log N − log max(1, df)) and their L2 norms."""
    vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(_CIDER_N)]
    for ngram, tf in counts.items():
        vec[len(ngram) - 1][ngram] = tf * (log_n - math.log(max(1.0, df[ngram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
    return vec, norms


def _cider_sim(cand: tuple, ref: tuple, cand_len: int, ref_len: int) -> float:
    """Mean over n of the clipped cosine similarity times the Gaussian length penalty."""
    (cvec, cnorm), (rvec, rnorm) = cand, ref
    penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * _CIDER_SIGMA**2))
    total = 0.0
    for n in range(_CIDER_N):
        # Clipping min(cand, ref) is the "-D" part: repeating a reference n-gram cannot raise the score.
        dot = sum(min(w, rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0) for g, w in cvec[n].items())
        if cnorm[n] != 0 and rnorm[n] != 0:
            dot /= cnorm[n] * rnorm[n]
        total += dot * penalty
    return total / _CIDER_N


@register_scorer("cider")
def cider(predictions: list[str], references: list[list[str]]) -> ScoreResult:
    """CIDEr-D (Vedantam et al. 2015) as computed by the coco-caption toolkit's ``CiderD``, ×100.

    Tokens: lower-cased, punctuation stripped (decimal points in numbers kept), split on whitespace.
    For n = 1..4 each sentence becomes a tf-idf vector g_n with weight
    ``count(ngram) * (log N − log max(1, df(ngram)))``, where N is the number of samples and df the number
    of samples whose *references* contain the n-gram — so one sample's score depends on the whole evaluated
    set (a corpus-level metric; with N = 1 every idf is 0). For a candidate c and its references s_1..s_m::

        sim_n(c, s) = Σ_g min(g_n(c), g_n(s)) · g_n(s) / (‖g_n(c)‖ ‖g_n(s)‖) · exp(−(l_c − l_s)² / (2σ²))
        CIDEr-D(c) = 10 · mean_n mean_j sim_n(c, s_j)

    with σ = 6 and l the length in words (a zero norm leaves the dot product undivided, as in the toolkit).
    ``per_sample`` holds CIDEr-D ×100 per sample and ``score`` their mean, matching papers' "CIDEr 85.3".
    """
    _check_inputs(predictions, references, "cider")
    ref_tokens = [[_cider_tokens(r) for r in refs] for refs in references]
    ref_counts = [[_ngram_counts(t) for t in toks] for toks in ref_tokens]
    df: Counter[tuple[str, ...]] = Counter()
    for counts in ref_counts:
        df.update(set().union(*counts))
    log_n = math.log(float(len(predictions)))
    per = []
    for pred, toks, counts in zip(predictions, ref_tokens, ref_counts):
        cand_words = _cider_tokens(pred)
        cand = _tfidf(_ngram_counts(cand_words), df, log_n)
        sims = [_cider_sim(cand, _tfidf(c, df, log_n), len(cand_words), len(t)) for c, t in zip(counts, toks)]
        per.append(1000.0 * sum(sims) / len(sims))  # ×10 (CIDEr-D) ×100 (reporting scale)
    return _result(per)
