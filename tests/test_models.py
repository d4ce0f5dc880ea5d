"""Tests of the model layer (mmcl.models): the conversation format, the composition's embedding, batched generation,
save/load, LLaVA checkpoints and the refusal of pickles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from support import tiny_llava

from mmcl.data.batching import Collator, Example, MediaLoader, encode_records
from mmcl.data.records import Record, load_task, read_records
from mmcl.eval.generate import generate_answers
from mmcl.models.base import ModelLoadError
from mmcl.models.builder import load_model, save_model
from mmcl.models.composition import CompositionProcessor, composition_processor
from mmcl.models.loading import load_backend
from mmcl.models.mllm import ModalitySpec
from mmcl.models.tiny import TinySizes, build_tiny
from mmcl.models.tokenizer import ConversationFormat, train_bpe_tokenizer

# 32 px images, patch 8: 16 image tokens, what these tests are written for
SIZES = TinySizes(hidden=32, layers=1, heads=2, intermediate=64, vision_hidden=32, vision_layers=1, image_size=32)
N_IMAGE = (32 // 8) ** 2  # placeholder positions per image for SIZES
TEXTS = [
    "USER: ASSISTANT:",
    "What colour is the shape?",
    "How many shapes are there?",
    "Describe the image briefly.",
    "A red square on a blue background.",
    "Which shape is shown? A. square B. circle C. star D. cross",
    "red green blue yellow purple orange white black",
    "one two three four five six seven eight nine ten",
] * 5


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    model = build_tiny(tokenizer, SIZES, seed=0).eval()
    return model, composition_processor(model, tokenizer)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.new("RGB", (20, 28), (200, 30, 60)).save(path)
    return path


def _collate(processor, ids: list[int], labels: list[int], media: dict[str, Path],
             left_pad: bool = False) -> tuple[list[int], list[int]]:
    """One encoded row through the collator: each placeholder expanded into its item's tokens (what the model sees)."""
    batch = Collator(processor, MediaLoader(processor), left_pad=left_pad)([Example("r", ids, labels, media, "t")])
    return batch.input_ids[0].tolist(), batch.labels[0].tolist()


def _t(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(turns)]


# -- the conversation format ------------------------------------------------------------------------------------------


def test_generation_prompt_is_an_exact_prefix_of_the_training_sequence(tokenizer, tiny, image_file) -> None:
    _, processor = tiny
    conv = _conv("<image>\nWhat colour is the shape?", "red")
    img = tokenizer.convert_tokens_to_ids("<image>")
    assert processor.placeholder_id("image") == img
    answer = _t(tokenizer, " red") + [tokenizer.eos_token_id]
    newline = _t(tokenizer, "\n")
    # the processor writes ONE placeholder per item; the collator expands it into the item's N_IMAGE tokens
    for n, expand in ((1, False), (N_IMAGE, True)):
        prompt, prompt_labels = processor.encode(conv, for_generation=True)
        ids, labels = processor.encode(conv)
        if expand:
            prompt, prompt_labels = _collate(processor, prompt, prompt_labels, {"image": image_file}, left_pad=True)
            ids, labels = _collate(processor, ids, labels, {"image": image_file})
        expected_prompt = (
            [tokenizer.bos_token_id]
            + _t(tokenizer, "USER: ")
            + [img] * n
            + _t(tokenizer, "\nWhat colour is the shape?")
            + _t(tokenizer, "\nASSISTANT:")
        )
        assert prompt == expected_prompt, n
        assert prompt_labels == [-100] * len(prompt)
        assert ids[: len(prompt)] == prompt
        assert ids[len(prompt) :] == answer + newline
        # labels: -100 everywhere except the answer tokens and their eos
        assert labels == [-100] * len(prompt) + answer + [-100] * len(newline)
        assert tokenizer.decode(ids[len(prompt) : len(prompt) + len(answer) - 1]) == " red"


def test_multi_turn_labels_cover_every_answer(tokenizer, tiny) -> None:
    _, processor = tiny
    conv = _conv("<image>\nWhat colour is the shape?", "red", "How many shapes are there?", " three ")
    ids, labels = processor.encode(conv)
    prompt, _ = processor.encode(conv, for_generation=True)
    assert ids[: len(prompt)] == prompt
    eos = tokenizer.eos_token_id
    supervised = [i for i, lab in zip(ids, labels) if lab != -100]
    assert supervised == _t(tokenizer, " red") + [eos] + _t(tokenizer, " three") + [eos]
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    assert len(ids) == len(labels)
    # the last answer is what generation must produce after the prompt
    assert ids[len(prompt) :][: len(_t(tokenizer, " three")) + 1] == _t(tokenizer, " three") + [eos]


def test_a_trailing_human_turn_becomes_the_prompt(tokenizer, tiny) -> None:
    _, processor = tiny
    prompt, labels = processor.encode(_conv("What colour is the shape?"), for_generation=True)
    assert prompt == (
        [tokenizer.bos_token_id]
        + _t(tokenizer, "USER: ")
        + _t(tokenizer, "What colour is the shape?")
        + _t(tokenizer, "\nASSISTANT:")
    )
    assert labels == [-100] * len(prompt)


def test_image_placeholder_expands_to_num_tokens(tokenizer, image_file) -> None:
    img = tokenizer.convert_tokens_to_ids("<image>")
    for n in (1, 5, 16):
        fmt = ConversationFormat(tokenizer, {"image": n}, {})
        ids, _ = fmt.encode(_conv("Look: <image> now", "ok"))
        assert ids.count(img) == n
        start = ids.index(img)
        assert ids[start : start + n] == [img] * n  # one contiguous run
        # the composition's processor: one placeholder in the text, expanded to num_tokens by the collator
        processor = CompositionProcessor(tokenizer, {"image": ModalitySpec("<image>", n)})
        one, one_labels = processor.encode(_conv("Look: <image> now", "ok"))
        assert one.count(img) == 1
        assert processor.load_media("image", image_file).tokens == [img] * n
        ids, _ = _collate(processor, one, one_labels, {"image": image_file})
        assert ids.count(img) == n
        start = ids.index(img)
        assert ids[start : start + n] == [img] * n  # one contiguous run


def test_modality_cue_goes_right_before_the_features(tokenizer, image_file) -> None:
    img = tokenizer.convert_tokens_to_ids("<image>")
    cued = ConversationFormat(tokenizer, {"image": 3}, {"image": "red"})
    ids, _ = cued.encode(_conv("<image>", "ok"))
    start = ids.index(img)
    cue = _t(tokenizer, "red")
    assert ids[start - len(cue) : start + 3] == cue + [img] * 3
    # the composition's processor: the cue is part of the item's tokens, which the collator puts at the placeholder
    processor = CompositionProcessor(tokenizer, {"image": ModalitySpec("<image>", 3, cue="red")})
    assert processor.load_media("image", image_file).tokens == cue + [img] * 3
    ids, _ = _collate(processor, *processor.encode(_conv("<image>", "ok")), {"image": image_file})
    start = ids.index(img)
    assert ids[start - len(cue) : start + 3] == cue + [img] * 3


def test_decode_answer_stops_at_eos(tokenizer, tiny) -> None:
    _, processor = tiny
    eos = tokenizer.eos_token_id
    assert processor.eos_ids == [eos]
    assert processor.decode_answer(_t(tokenizer, " red square") + [eos] + _t(tokenizer, " blue")) == "red square"
    assert processor.decode_answer(_t(tokenizer, " red square")) == "red square"
    assert processor.decode_answer([eos] + _t(tokenizer, " blue")) == ""
    assert processor.decode_answer(_t(tokenizer, " three") + [tokenizer.pad_token_id, eos]) == "three"


# -- the composition ----------------------------------------------------------------------------------------------


def test_embed_refuses_a_placeholder_count_that_does_not_match_the_features(tokenizer, tiny) -> None:
    model, _ = tiny
    img = tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[tokenizer.bos_token_id] + [img] * (N_IMAGE - 1) + _t(tokenizer, "red")])
    pixels = torch.zeros(1, 3, 32, 32)
    with pytest.raises(
        ValueError,
        match=rf"^image: the batch holds {N_IMAGE - 1} placeholder tokens but the encoder produced 1 items x "
        rf"{N_IMAGE} features; every item needs exactly {N_IMAGE} placeholder tokens$",
    ):
        model.embed(ids, {"image": pixels})
    two = torch.zeros(2, 3, 32, 32)
    full = torch.tensor([[img] * N_IMAGE])
    with pytest.raises(ValueError, match=rf"holds {N_IMAGE} placeholder tokens but the encoder produced 2 items"):
        model.embed(full, {"image": two})


def test_embed_puts_features_at_the_placeholders(tokenizer, tiny) -> None:
    model, _ = tiny
    img = tokenizer.convert_tokens_to_ids("<image>")
    text = _t(tokenizer, "red")
    ids = torch.tensor([[tokenizer.bos_token_id] + [img] * N_IMAGE + text])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embeds = model.embed(ids, {"image": pixels})
        feats = model.encode("image", pixels)
        plain = model.language_model.get_input_embeddings()(ids)
    assert embeds.shape == (1, 1 + N_IMAGE + len(text), SIZES.hidden)
    assert torch.equal(embeds[0, 1 : 1 + N_IMAGE], feats[0])
    assert torch.equal(embeds[0, 0], plain[0, 0])
    assert torch.equal(embeds[0, 1 + N_IMAGE :], plain[0, 1 + N_IMAGE :])


# -- batched generation -------------------------------------------------------------------------------------------


def _mixed_records(world: Path) -> list[Record]:
    """One record each of tasks whose prompts differ in length, image and text-only mixed."""
    records = []
    for name in ("color_qa", "mcq", "caption", "lang_arith", "count", "lang_facts"):
        good, problems = read_records(load_task(world / "tasks" / name), "test", limit=1)
        assert problems == []
        records += good
    return records


@pytest.fixture(scope="module")
def wide(micro_world: Path):
    """(model, processor, media loader, records of different lengths, tokenizer) with random wide weights: the greedy
    text is long, varied and sensitive to every position, which a trained micro model (it answers blanks after a
    few steps of pre-training) is not."""
    from mmcl.data.synth import world_texts

    tokenizer = train_bpe_tokenizer([*world_texts(micro_world), "USER: ASSISTANT:"], vocab_size=400)
    model = build_tiny(tokenizer, TinySizes(hidden=32, layers=2, heads=2, intermediate=64, vision_hidden=32,
                                            vision_layers=1), seed=1).eval()
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.language_model.parameters():
            p.normal_(0.0, 0.5)
    processor = composition_processor(model, tokenizer)
    media = MediaLoader(processor)
    records = _mixed_records(micro_world)
    # prompt lengths as the model sees them: each placeholder expanded into its item's tokens by the collator
    expand = Collator(processor, media, left_pad=True).expand
    lengths = [len(expand(e)[0]) for e in encode_records(records, processor, "mix", for_generation=True)]
    assert len(set(lengths)) == len(records) == 6
    assert sum(bool(r.media) for r in records) == 4
    return model, processor, media, records, tokenizer


def _answers(wide, collator: Collator, batch_size: int, **decoding) -> list[str]:
    model, processor, _, records, _ = wide
    return generate_answers(model, processor, collator, records, "mix", 5, batch_size, torch.device("cpu"),
                            torch.float32, **decoding)


def test_left_padded_batched_generation_equals_one_at_a_time(wide) -> None:
    _, processor, media, records, tokenizer = wide
    assert processor.pad_id == tokenizer.pad_token_id
    left = Collator(processor, media, left_pad=True)
    one_by_one = _answers(wide, left, 1)
    batched = _answers(wide, left, len(records))
    assert all(len(a) >= 3 for a in one_by_one), one_by_one
    assert len(set(one_by_one)) >= 3, one_by_one
    assert batched == one_by_one
    # negative control: right padding puts pads between prompt and answer, and the comparison sees it
    right = Collator(processor, media, left_pad=False)
    assert _answers(wide, right, len(records)) != one_by_one
    # beam search (eval.num_beams) batches the same way
    beams = _answers(wide, left, 1, num_beams=3)
    assert _answers(wide, left, len(records), num_beams=3) == beams


def test_repetition_penalty_reaches_generation(wide) -> None:
    """eval.repetition_penalty reaches the model's generate. HF's penalty divides a positive logit of an
    already generated token by it (multiplies a negative one), so a penalty below 1 rewards repeating: the wide
    model then repeats more, and `generate_answers` gives exactly what a direct call with the penalty gives."""
    model, processor, media, records, tokenizer = wide
    assert (processor.pad_id, processor.eos_ids) == (tokenizer.pad_token_id, [tokenizer.eos_token_id])
    left = Collator(processor, media, left_pad=True)
    batch = left(encode_records(records, processor, "mix", for_generation=True))

    def raw(**decoding) -> list[list[int]]:
        with torch.no_grad():
            out = model.generate_new(batch.input_ids, batch.attention_mask, 5,
                                     **model.media_inputs(batch.media, batch.input_ids),
                                     pad_token_id=processor.pad_id, eos_token_id=processor.eos_ids, **decoding)
        return [[t for t in row if t not in (processor.pad_id, *processor.eos_ids)] for row in out.tolist()]

    def repeats(rows: list[list[int]]) -> int:
        return sum(len(t) - len(set(t)) for t in rows)

    greedy, rewarded = raw(), raw(repetition_penalty=1e-4)
    assert repeats(rewarded) > repeats(greedy), (greedy, rewarded)
    direct = [processor.decode_answer(ids) for ids in rewarded]
    assert _answers(wide, left, len(records), repetition_penalty=1e-4) == direct != _answers(wide, left, len(records))


# -- save / load ----------------------------------------------------------------------------------------------------


def _image_batch(tokenizer, tmp_path: Path, processor) -> tuple[torch.Tensor, list[dict]]:
    """(input_ids, per-row media) of one image row, the image decoded by the processor as the collator does."""
    path = tmp_path / "img.png"
    Image.new("RGB", (20, 28), (200, 30, 60)).save(path)
    item = processor.load_media("image", path)
    img = tokenizer.convert_tokens_to_ids("<image>")
    assert item.tokens == [img] * processor.specs["image"].num_tokens
    assert tuple(item.inputs["values"].shape) == (3, 32, 32)
    row = [tokenizer.bos_token_id] + item.tokens + _t(tokenizer, "What colour is the shape?")
    return torch.tensor([row]), [{"image": item.inputs}]


def test_save_load_round_trip_gives_identical_logits(tokenizer, tiny, tmp_path: Path) -> None:
    model, processor = tiny
    save_model(model, tokenizer, tmp_path / "m", extra={"note": "round trip"})
    index = json.loads((tmp_path / "m" / "mmcl_model.json").read_text())
    assert index["format"] == "mmcl-mllm"
    assert index["note"] == "round trip"
    assert index["modalities"]["image"]["num_tokens"] == N_IMAGE
    # safetensors and JSON only: nothing that needs a pickle to load
    suffixes = {p.suffix for p in (tmp_path / "m").rglob("*") if p.is_file()}
    assert not suffixes & {".bin", ".pt", ".pth", ".pkl", ".ckpt"}
    assert ".safetensors" in suffixes

    loaded, tok2 = load_model(tmp_path / "m")
    loaded.eval()
    assert tok2.get_vocab() == tokenizer.get_vocab()
    assert loaded.token_ids == model.token_ids
    assert loaded.modalities == model.modalities
    ids, media = _image_batch(tokenizer, tmp_path, processor)
    with torch.no_grad():
        a = model(ids, **model.media_inputs(media, ids)).logits
        b = loaded(ids, **loaded.media_inputs(media, ids)).logits
        text_only = model(ids[:, -3:]).logits
    assert a.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.equal(a, b)
    assert not torch.equal(a[:, -3:], text_only)  # the image does reach the logits


@pytest.mark.parametrize("feature_layer, select", [(-1, "default"), (-2, "default"), (-2, "full")])
def test_llava_checkpoint_maps_exactly_onto_the_composition(tokenizer, tmp_path: Path, feature_layer, select) -> None:
    llava = tiny_llava(tokenizer, feature_layer, select)
    llava.save_pretrained(tmp_path / "llava")
    tokenizer.save_pretrained(tmp_path / "llava")

    model, tok2 = load_model(tmp_path / "llava")
    model.eval()
    spec = model.modalities["image"]
    n = 16 + (select == "full")
    assert (spec.num_tokens, spec.feature_layer) == (n, feature_layer)
    assert spec.select == ("patch" if select == "default" else "full")
    assert model.token_ids["image"] == llava.config.image_token_index

    img = tokenizer.convert_tokens_to_ids("<image>")
    ids = torch.tensor([[tokenizer.bos_token_id] + _t(tokenizer, "USER: ") + [img] * n + _t(tokenizer, "Describe.")])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=pixels).logits
        got = model(ids, media={"image": pixels}).logits
        other = model(ids, media={"image": torch.zeros_like(pixels)}).logits
    assert got.shape == expected.shape == (1, ids.shape[1], len(tokenizer))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (other - expected).abs().max() > 1e-3  # the pixels matter, so the equality above is not vacuous


# -- refusals -------------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_llava_dir_with_only_a_pickle_is_refused(tokenizer, tmp_path: Path) -> None:
    llava = tiny_llava(tokenizer, -1, "default")
    d = tmp_path / "pickled"
    llava.config.save_pretrained(d)
    tokenizer.save_pretrained(d)
    marker = tmp_path / "pwned"
    torch.save({"payload": _Payload(marker)}, d / "pytorch_model.bin")
    with pytest.raises(
        ValueError,
        match=r"pickled holds only pickle weights \(pytorch_model\.bin\); loading a pickle can run code\. Convert them "
        r"to safetensors, or opt in with model\.allow_pickle=true",
    ):
        load_model(d)
    assert not marker.exists()


def test_mmcl_dir_with_a_pickled_part_is_refused(tokenizer, tiny, tmp_path: Path) -> None:
    model, _ = tiny
    d = tmp_path / "m"
    save_model(model, tokenizer, d)
    (d / "language_model" / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save({"payload": _Payload(marker)}, d / "language_model" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"language_model holds only pickle weights \(pytorch_model\.bin\).*"
                                         r"model\.allow_pickle=true"):
        load_model(d)
    assert not marker.exists()


def test_dir_with_only_a_pickle_and_no_config_is_not_a_model(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "bare").mkdir()
    torch.save({"payload": _Payload(marker)}, tmp_path / "bare" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"bare: neither mmcl_model\.json nor config\.json found"):
        load_model(tmp_path / "bare")
    assert not marker.exists()


def test_load_model_missing_path(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError,
        match=r"model path .*nowhere is not a directory: give an mmcl model directory \(from `mmcl pretrain`\) or a "
        r"local Hugging Face LLaVA checkpoint directory \(hub ids are not fetched",
    ):
        load_model(tmp_path / "nowhere")


def test_load_model_non_model_dir(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("hello")
    with pytest.raises(
        FileNotFoundError, match=r"notes: neither mmcl_model\.json nor config\.json found; is this a model directory\?"
    ):
        load_model(tmp_path / "notes")


def test_load_model_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    # the composition loader maps only LLaVA; the entry point for any directory (load_backend) refuses what no
    # backend reads, naming what is supported
    with pytest.raises(ModelLoadError, match=r"config\.json: model_type 'bert' does not map onto the composition "
                                             r"\(only 'llava' does\)"):
        load_model(tmp_path / "bert")
    with pytest.raises(ModelLoadError,
                       match=r"config\.json: model_type 'bert' is not supported; supported: mmcl(, |$)"):
        load_backend(tmp_path / "bert")


def test_write_dir_replaces_only_after_a_complete_build(tmp_path):
    """A model directory is built beside its destination and renamed into place: a build that fails leaves the
    old directory as it was and no partial directory behind; a build that completes replaces it."""
    from mmcl.models.builder import write_dir

    dest = tmp_path / "model"
    write_dir(dest, lambda d: (d / "weights.safetensors").write_text("old"))
    assert (dest / "weights.safetensors").read_text() == "old"

    def broken(d):
        (d / "weights.safetensors").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_dir(dest, broken)
    assert (dest / "weights.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    write_dir(dest, lambda d: (d / "other.json").write_text("{}"))
    assert sorted(p.name for p in dest.iterdir()) == ["other.json"]
