"""Multiple-choice scoring: option letters in every form, and options named by their own text in the prompt."""

from pathlib import Path

import pytest
import torch

from mmcl.data.records import Record, load_task, read_records
from mmcl.eval.options import option_named, parse_options
from mmcl.eval.scorers import (
    _REGISTRY,
    ScoreResult,
    get_scorer,
    register_scorer,
    run_scorer,
    takes_prompts,
)


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        ("B", "B", 100.0),
        ("B.", "B", 100.0),
        ("(B)", "B", 100.0),
        ("B) a red cube", "B", 100.0),
        ("The answer is B.", "B", 100.0),  # "T" of "The" is glued to "he", so B is the first standalone capital
        ("b", "B", 100.0),  # lower-case fallback
        ("the answer is c", "C", 100.0),
        ("it's c", "C", 100.0),  # the "s" after the apostrophe is not a letter token; "c" is
        ("C", "B", 0.0),
        ("no idea", "B", 0.0),  # no standalone letter at all
        ("", "B", 0.0),
        ("A", "a", 100.0),  # reference letter read with the same rule: "a" → "A"
        ("A", "(A) a dog", 100.0),
        ("D is wrong, B", "B", 0.0),  # the first standalone capital wins
        ("The answer is (C).", "C", 100.0),  # explicit forms come first
        ("Answer: d", "D", 100.0),
        ("I choose option B", "B", 100.0),  # "option B" beats the standalone "I"
        ("A. a circle", "A", 100.0),
    ],
)
def test_option_letter(pred: str, ref: str, expected: float) -> None:
    assert get_scorer("option_letter")([pred], [[ref]]).per_sample == [expected]


def test_option_letter_reference_without_letter_raises() -> None:
    with pytest.raises(ValueError, match=r"references\[0\]\[0\] = '42' contains no option letter"):
        get_scorer("option_letter")(["A"], [["42"]])


# Options as the built-in world and LLaVA's ScienceQA / MMBench prompts list them.
SHAPE_PROMPT = ("Which shape is shown?\nA. square\nB. circle\nC. triangle\nD. star\n"
                "Answer with the option's letter from the given choices directly.")
SHAPES_ABCD = {"A": "square", "B": "circle", "C": "triangle", "D": "star"}


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (SHAPE_PROMPT, SHAPES_ABCD),  # one per line; the instruction line after D is not D's text
        ("Question: Which is warmer?\nOptions: (A) red (B) blue\nAnswer:", {"A": "red", "B": "blue"}),  # inline
        ("A) cat\nB) dog\nC) a cow", {"A": "cat", "B": "dog", "C": "a cow"}),
        ("Pick one.\nA: cat\nB: dog", {"A": "cat", "B": "dog"}),
        ("<image>\nHow many?\nA. 1\nB. 2", {"A": "1", "B": "2"}),
        # "C." inside A's text is not an option (no B before it); the run is A, B
        ("A. vitamin C. B. iron", {"A": "vitamin C.", "B": "iron"}),
        # a context quoting two options, then the real list of three: the longest run wins
        ("Context: (A) foo (B) bar\nQ?\nA. x\nB. y\nC. z", {"A": "x", "B": "y", "C": "z"}),
        # mixed styles do not form a run: "A." then "(B)"
        ("A. cat (B) dog", {}),
        ("Plan A. is fine", {}),  # one marker only: at least A and B are needed
        ("B. cat\nC. dog", {}),  # a run must start at A
        ("What colour is the shape?\nAnswer the question using a single word or phrase.", {}),
        ("a. cat\nb. dog", {}),  # lower case is never a marker (it collides with the article "a")
    ],
)
def test_parse_options(prompt: str, expected: dict[str, str]) -> None:
    assert parse_options(prompt) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("circle", "B"),  # equals B's text
        ("it is circle", "B"),  # contains only B's text
        ("circle or square", None),  # two options' texts: names none
        ("hexagon", None),
        ("circles", None),  # whole words only
        ("black cat", "C"),  # equality beats containment of "cat"
        ("it is black cat", "C"),  # "cat" lies inside "black cat", so only C is named
        ("black cat and cat", None),  # "cat" also stands on its own
    ],
)
def test_option_named(answer: str, expected: str | None) -> None:
    assert option_named(answer, {"A": "square", "B": "circle", "C": "black cat", "D": "cat", "E": ""}) == expected


def test_option_named_duplicate_texts_name_none() -> None:
    assert option_named("cat", {"A": "cat", "B": "cat"}) is None
    assert option_named("my cat", {"A": "cat", "B": "cat", "C": "dog"}) is None


@pytest.mark.parametrize(
    ("pred", "ref", "expected"),
    [
        # letter forms still work with options present
        ("B", "B", 100.0),
        ("(B)", "B", 100.0),
        ("The answer is B.", "B", 100.0),
        ("B. circle", "B", 100.0),
        # the option's text is credited
        ("circle", "B", 100.0),
        ("Circle.", "B", 100.0),
        ("The answer is circle.", "B", 100.0),
        ("Answer: circle", "B", 100.0),
        ("I think it is a circle", "B", 100.0),  # "I" would be the first capital; the text comes first
        ("two", "B", 0.0),  # no option named, no letter: 0 (no letter at all)
        # the wrong option's text scores 0
        ("square", "B", 0.0),
        ("The answer is star", "B", 0.0),
        # two options' texts: not credited via text, and no letter to fall back on
        ("circle or square", "B", 0.0),
        ("circle or square", "A", 0.0),
        # the article is not the letter A: "a circle" is B (circle), not A
        ("a circle", "B", 100.0),
        ("a circle", "A", 0.0),
        ("A circle", "B", 100.0),
        ("The answer is a circle", "B", 100.0),
        ("The answer is a circle", "A", 0.0),
        ("a hexagon", "A", 0.0),  # article, no option named, no letter
        # an explicit letter wins over the text
        ("(A) circle", "A", 100.0),
        ("A. circle", "B", 0.0),
        ("a", "A", 100.0),  # a bare "a" is a letter
        ("The answer is a.", "A", 100.0),
        # "C" here is no explicit form, and B's text is named: the text comes before the fallback's first capital
        ("C is a circle", "C", 0.0),
        ("C is a circle", "B", 100.0),
    ],
)
def test_option_letter_reads_option_text(pred: str, ref: str, expected: float) -> None:
    assert get_scorer("option_letter")([pred], [[ref]], prompts=[SHAPE_PROMPT]).per_sample == [expected]


@pytest.mark.parametrize("pred", ["circle", "a circle", "The answer is a circle", "It is a hexagon", "square", "B",
                                  "Answer: d", "A circle", "I choose option B", "circle or square", ""])
def test_option_letter_without_options_reads_as_before(pred: str) -> None:
    """A prompt without options, or no prompts at all, gives the letter-only result for every reference letter."""
    scorer = get_scorer("option_letter")
    refs = [["A"], ["B"], ["C"], ["D"], ["I"]]
    plain = scorer([pred] * 5, refs).per_sample
    prompt = "What colour is the shape?\nAnswer the question using a single word or phrase."
    assert scorer([pred] * 5, refs, prompts=[prompt] * 5).per_sample == plain
    assert scorer([pred] * 5, refs, prompts=None).per_sample == plain


def test_option_letter_without_options_examples() -> None:
    # worked by hand with the letter rules alone: "a circle" -> lower-case "a" -> A; "circle" has no letter
    res = get_scorer("option_letter")(["a circle", "circle", "It is a hexagon"], [["A"], ["B"], ["A"]])
    assert res.per_sample == [100.0, 0.0, 100.0]


def test_option_letter_prompt_count_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="option_letter: got 1 prompts for 2 predictions"):
        get_scorer("option_letter")(["A", "B"], [["A"], ["B"]], prompts=[SHAPE_PROMPT])


def test_run_scorer_passes_prompts_only_to_scorers_that_declare_them() -> None:
    seen: list[list[str] | None] = []

    @register_scorer("test_prompt_echo")
    def echo(predictions: list[str], references: list[list[str]], *,
             prompts: list[str] | None = None) -> ScoreResult:
        seen.append(prompts)
        return ScoreResult(0.0, [0.0] * len(predictions))

    try:
        assert takes_prompts(echo) and takes_prompts(get_scorer("option_letter"))
        assert not takes_prompts(get_scorer("exact_match"))
        run_scorer("test_prompt_echo", ["x"], [["y"]], prompts=["Q?"])
        run_scorer("test_prompt_echo", ["x"], [["y"]])
        assert seen == [["Q?"], None]
        # a two-argument scorer is called without prompts (it would raise TypeError if given them)
        assert run_scorer("exact_match", ["cat"], [["cat"]], prompts=["Q?"]).per_sample == [100.0]
        assert run_scorer("option_letter", ["circle"], [["B"]], prompts=[SHAPE_PROMPT]).per_sample == [100.0]
    finally:
        _REGISTRY.pop("test_prompt_echo", None)


def _world_mcq(world: Path, split: str) -> list[Record]:
    good, bad = read_records(load_task(world / "tasks" / "mcq"), split)
    assert not bad
    return good


def test_world_mcq_prompts_list_parseable_options(micro_world: Path) -> None:
    """Every mcq prompt the built-in world writes parses to four distinct shapes A-D, so its gold option's text
    scores 100 and another option's text 0."""
    from mmcl.data.synth.shapes import SHAPES

    records = _world_mcq(micro_world, "test")
    assert records
    for rec in records:
        prompt, gold = rec.conversations[-2]["value"], rec.references[0]
        options = parse_options(prompt)
        assert list(options) == list("ABCD") and len(set(options.values())) == 4, prompt
        assert set(options.values()) <= set(SHAPES), prompt
        wrong = next(t for letter, t in options.items() if letter != gold)
        res = get_scorer("option_letter")([options[gold], f"The answer is {wrong}."], [[gold], [gold]],
                                          prompts=[prompt, prompt])
        assert res.per_sample == [100.0, 0.0]


@pytest.mark.integration
def test_evaluate_task_hands_the_prompts_to_option_letter(micro_world: Path, micro_model: Path) -> None:
    """The real path: the micro model answers records 0 and 2 of the world's mcq test set; records 1 and 3 arrive
    through `gather` as option texts (1: the gold option's text, 3: another option's), which score 100 and 0 only
    if evaluate_task handed option_letter each record's prompt."""
    from mmcl.data.batching import Collator, MediaLoader
    from mmcl.eval.generate import evaluate_task
    from mmcl.models.loading import load_backend

    model, processor = load_backend(micro_model)
    task = load_task(micro_world / "tasks" / "mcq")
    records = _world_mcq(micro_world, "test")[:4]
    options = [parse_options(r.conversations[-2]["value"]) for r in records]
    gold = [r.references[0] for r in records]
    injected = [(1, options[1][gold[1]]), (3, next(t for k, t in options[3].items() if k != gold[3]))]
    res = evaluate_task(model, processor, Collator(processor, MediaLoader(processor), left_pad=True), task, records,
                        batch_size=4, device=torch.device("cpu"), max_new_tokens=3, shard=(0, 2),
                        gather=lambda pairs: pairs + injected)
    assert [p["prompt"] for p in res.predictions] == [r.conversations[-2]["value"] for r in records]
    assert [res.predictions[i]["score"] for i in (1, 3)] == [100.0, 0.0]
    answers = [p["prediction"] for p in res.predictions]
    expected = get_scorer("option_letter")(answers, [[g] for g in gold],
                                           prompts=[r.conversations[-2]["value"] for r in records])
    assert [p["score"] for p in res.predictions] == expected.per_sample
    assert res.score == expected.score


# ------------------------------------------------------------------------------------------------ grounding
