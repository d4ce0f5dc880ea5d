"""Scorers against hand-worked examples; the working is in the comments."""

import math

import pytest

from mmcl.eval.scorers import (
    ScoreResult,
    box_iou,
    get_scorer,
    list_scorers,
    normalize_answer,
    register_scorer,
)

BUILTIN = ["exact_match", "vqa_accuracy", "vqa_accuracy_simple", "option_letter", "box_iou", "classification", "cider"]

# ------------------------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Two Dogs. ", "2 dogs"),  # lower, strip, number word, trailing period
        ("The answer is: a cat!", "answer is cat"),  # articles and punctuation dropped
        ("3.5", "3.5"),  # decimal point inside a number survives
        ("end.5", "end 5"),  # a period not between digits is punctuation
        ("1,000 people", "1000 people"),  # thousands separator
        ("don't", "dont"),  # apostrophes glue, they do not split
        ("ten\tten  TEN", "10 10 10"),  # whitespace collapsed
        ("an apple, the pear", "apple pear"),
        ("zero-one", "0 1"),  # hyphen splits words, then each maps
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


# ------------------------------------------------------------------------------------------------- registry


def test_registry_lists_builtin_scorers() -> None:
    names = list_scorers()
    for name in BUILTIN:
        assert name in names
    assert names == sorted(names)


def test_register_duplicate_name_raises() -> None:
    with pytest.raises(ValueError, match="'exact_match' is already registered"):
        register_scorer("exact_match")


@pytest.mark.parametrize("bad", ["ExactMatch", "1abc", "with-dash", "", "_x"])
def test_register_invalid_name_raises(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid scorer name"):
        register_scorer(bad)


def test_unknown_scorer_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown scorer 'bleu'; known scorers: .*exact_match"):
        get_scorer("bleu")


def test_register_and_get_new_scorer() -> None:
    @register_scorer("test_always_half")
    def always_half(predictions: list[str], references: list[list[str]]) -> ScoreResult:
        return ScoreResult(50.0, [50.0] * len(predictions))

    assert get_scorer("test_always_half") is always_half
    assert "test_always_half" in list_scorers()


# ------------------------------------------------------------------------------------------ input checking


@pytest.mark.parametrize("name", BUILTIN)
def test_length_mismatch_raises(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}: got 2 predictions but 1 reference lists"):
        get_scorer(name)(["a", "b"], [["a"]])


@pytest.mark.parametrize("name", BUILTIN)
def test_empty_reference_list_raises(name: str) -> None:
    with pytest.raises(ValueError, match=r"references\[1\] is empty"):
        get_scorer(name)(["a", "b"], [["a"], []])


def test_bare_string_reference_raises() -> None:
    with pytest.raises(ValueError, match=r"references\[0\] is a string"):
        get_scorer("exact_match")(["a"], ["a"])  # type: ignore[list-item]


def test_no_predictions_raises() -> None:
    with pytest.raises(ValueError, match="no predictions to score"):
        get_scorer("exact_match")([], [])


# ------------------------------------------------------------------------------------------ accuracy-type


def test_exact_match() -> None:
    preds = ["Two.", "a red cube", "blue", "3.50"]
    refs = [["2"], ["green", "Red cube!"], ["red"], ["3.5"]]
    # "2"=="2" ✓; "red cube" matches the 2nd ref ✓; "blue"≠"red" ✗; "3.50"≠"3.5" (no numeric parsing) ✗
    res = get_scorer("exact_match")(preds, refs)
    assert res.per_sample == [100.0, 100.0, 0.0, 0.0]
    assert res.score == pytest.approx(50.0)


def test_vqa_accuracy_simple_is_p4s_min_matches_over_3() -> None:
    ten = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    preds = ["2", "3", "Two", "4", "two"]
    refs = [ten, ten, ["2", "2"], ten, ["2"]]
    # "2": three matches ("2","2","two"→"2") → min(1, 3/3)=1 → 100
    # "3": seven matches → min(1, 7/3)=1 → 100
    # "Two"→"2" vs ["2","2"]: 2/3 → 66.67
    # "4": 0 matches → 0
    # "two" vs ["2"]: 1/3 → 33.33
    res = get_scorer("vqa_accuracy_simple")(preds, refs)
    assert res.per_sample == pytest.approx([100.0, 100.0, 200 / 3, 0.0, 100 / 3])
    assert res.score == pytest.approx((100 + 100 + 200 / 3 + 0 + 100 / 3) / 5)  # = 60.0


def test_vqa_accuracy_official_leave_one_out_with_ten_answers() -> None:
    ten = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    two_of_ten = ["2", "2", "3", "3", "3", "3", "3", "3", "3", "3"]
    preds = ["2", "3", "2", "none", "Two", "two"]
    refs = [ten, ten, two_of_ten, ["0", "zero", "x", "x", "x", "x", "x", "x", "x", "x"], ["2", "2"], ["2"]]
    # "2" vs ten (3 matches): leaving out one of the 3 matches leaves 2 → 2/3 (3 sets); any other set keeps 3 → 1
    #   (7 sets): (3·2/3 + 7·1)/10 = 0.9 → 90
    # "3" (7 matches): every set keeps ≥ 6 → 1 → 100
    # "2" vs two_of_ten: leaving out a match → 1/3 (2 sets), else 2/3 (8 sets): (2/3 + 16/3)/10 = 0.6 → 60
    # "none" → "0" matches "0" and "zero" (2 of 10): as above → 60
    # fewer than 10 references: min(1, matches/3), as before: 2/3 → 66.67, 1/3 → 33.33
    res = get_scorer("vqa_accuracy")(preds, refs)
    assert res.per_sample == pytest.approx([90.0, 100.0, 60.0, 60.0, 200 / 3, 100 / 3])


def test_classification_uses_first_reference_only() -> None:
    # "Cat." vs label "cat" ✓; "dog" vs label "cat" ✗ even though "dog" is the 2nd reference
    res = get_scorer("classification")(["Cat.", "dog"], [["cat"], ["cat", "dog"]])
    assert res.per_sample == [100.0, 0.0]
    assert res.score == 50.0


def test_box_iou_function() -> None:
    # a=[0,0,2,2] (area 4), b=[1,1,3,3] (area 4): intersection [1,1,2,2] = 1; union 4+4-1 = 7
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0  # disjoint
    assert box_iou([1, 0, 0, 1], [0, 0, 1, 1]) == 0.0  # x2 < x1: invalid
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0  # empty union, no division by zero


def test_box_iou_scorer() -> None:
    ref = "[0.1, 0.2, 0.5, 0.6]"  # area 0.4*0.4 = 0.16
    preds = [
        "[0.1, 0.2, 0.5, 0.6]",  # identical → IoU 1 ✓
        "The box is [0.1,0.2,0.5,0.5].",  # inside, area 0.4*0.3=0.12; IoU = 0.12/0.16 = 0.75 ✓
        "[0.3, 0.2, 0.7, 0.6]",  # overlap x 0.3..0.5 → 0.2*0.4=0.08; union 0.16+0.16-0.08=0.24; IoU 1/3 ✗
        "[0.5, 0.2, 0.1, 0.6]",  # x2 < x1: invalid prediction → 0, no exception
        "[0.1, 0.2, 0.5]",  # only three numbers → 0
        "no box",  # → 0
        "[1, 2, 5, 6]",  # integers, vs the 2nd reference (identical) ✓
    ]
    refs = [[ref]] * 6 + [[ref, "[1, 2, 5, 6]"]]
    res = get_scorer("box_iou")(preds, refs)
    assert res.per_sample == [100.0, 100.0, 0.0, 0.0, 0.0, 0.0, 100.0]
    assert res.score == pytest.approx(300 / 7)


def test_box_iou_boundary_is_inclusive() -> None:
    # pred [0,0,1,1] (area 1) inside ref [0,0,2,1] (area 2): IoU exactly 0.5 → hit
    assert get_scorer("box_iou")(["[0, 0, 1, 1]"], [["[0, 0, 2, 1]"]]).per_sample == [100.0]


@pytest.mark.parametrize("bad_ref", ["[0.1, 0.2]", "box", "[0.5, 0.2, 0.1, 0.6]"])
def test_box_iou_malformed_reference_raises(bad_ref: str) -> None:
    with pytest.raises(ValueError, match=r"references\[0\]\[0\] = .* is not a box"):
        get_scorer("box_iou")(["[0, 0, 1, 1]"], [[bad_ref]])


# --------------------------------------------------------------------------------------------------- CIDEr-D

# Corpus of N = 2 images. Image 1's references: "a red square" twice; image 2's: "a blue circle" twice.
# Document frequencies (over references, per image): "a" appears for both images → df 2 → idf log2 − log2 = 0;
# every other n-gram appears for one image → idf log 2.
CORPUS_REFS = [["a red square", "A red square."], ["a blue circle", "a blue circle"]]


def test_cider_identical_candidates_hand_computed() -> None:
    # Candidate "a red square" vs each (identical) reference:
    #   n=1: vectors {a: 0, red: log2, square: log2} → clipped dot = 2 log²2, norms² = 2 log²2 → sim 1
    #   n=2: {"a red": log2, "red square": log2} → sim 1
    #   n=3: {"a red square": log2} → sim 1
    #   n=4: no 4-grams, both norms 0 → dot 0 → sim 0
    #   length penalty: δ = 0 → exp(0) = 1
    # mean over n = 3/4; mean over the two refs = 3/4; ×10 = 7.5; ×100 = 750. Same for image 2.
    res = get_scorer("cider")(["a red square", "a blue circle"], CORPUS_REFS)
    assert res.per_sample == pytest.approx([750.0, 750.0])
    assert res.score == pytest.approx(750.0)


def test_cider_no_shared_ngram_is_zero() -> None:
    # "green triangle" shares no n-gram with image 1's references → every clipped dot product is 0
    res = get_scorer("cider")(["green triangle", "a blue circle"], CORPUS_REFS)
    assert res.per_sample[0] == 0.0
    assert res.per_sample[1] == pytest.approx(750.0)  # image 2 is unaffected by image 1's candidate


def test_cider_longer_candidate_is_penalised() -> None:
    # "a red square red square": n=1 tf red=2, square=2 → weights 2log2 clipped to log2:
    #   dot = 2·log²2; ‖c‖ = sqrt(8)·log2, ‖s‖ = sqrt(2)·log2 → sim1 = 2/sqrt(16) = 0.5
    #   n=2: c = {a red: 1, red square: 2, square red: 1}·log2; s = {a red, red square}·log2
    #        dot = (1 + 1)·log²2; ‖c‖ = sqrt(6)·log2, ‖s‖ = sqrt(2)·log2 → sim2 = 2/sqrt(12)
    #   n=3: c = {a red square, red square red, square red square}; s = {a red square} → 1/sqrt(3)
    #   n=4: c has 2 4-grams, s none: ‖s‖ = 0 → dot 0 → 0
    #   δ = 5 − 3 = 2 → penalty exp(−4/72)
    # CIDEr-D = 10 · exp(−4/72) · (0.5 + 2/sqrt(12) + 1/sqrt(3) + 0)/4, ×100
    expected = 1000 * math.exp(-4 / 72) * (0.5 + 2 / math.sqrt(12) + 1 / math.sqrt(3)) / 4
    res = get_scorer("cider")(["a red square red square", "a blue circle"], CORPUS_REFS)
    assert res.per_sample[0] == pytest.approx(expected)
    assert res.per_sample[0] < 750.0


def test_cider_length_penalty_alone() -> None:
    # Candidate "red square" (2 words) vs reference "a red square" (3 words): "a" has idf 0, so every
    # tf-idf vector is the same as for the identical candidate except 3-grams; δ = −1.
    #   n=1: {red, square} vs {a:0, red, square} → sim 1;  n=2: {red square} vs {a red, red square} → 1/sqrt(2)
    #   n=3: candidate has none → 0;  n=4: 0
    # CIDEr-D ×100 = 1000 · exp(−1/72) · (1 + 1/sqrt(2))/4
    res = get_scorer("cider")(["red square", "a blue circle"], CORPUS_REFS)
    assert res.per_sample[0] == pytest.approx(1000 * math.exp(-1 / 72) * (1 + 1 / math.sqrt(2)) / 4)


def test_cider_single_sample_corpus_is_zero() -> None:
    # N = 1: idf = log1 − log1 = 0 for every n-gram, so nothing carries weight (toolkit behaviour).
    assert get_scorer("cider")(["a red square"], [["a red square"]]).score == 0.0


def test_cider_empty_candidate_is_zero() -> None:
    assert get_scorer("cider")(["", "a blue circle"], CORPUS_REFS).per_sample[0] == 0.0
