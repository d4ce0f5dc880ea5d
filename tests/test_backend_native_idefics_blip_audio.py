"""Native families Idefics3, SmolVLM, BLIP-2, InstructBLIP and Qwen2-Audio on tiny random checkpoints.

Family level (the family + the HF model, batches from mmcl's Collator through a small stand-in processor): each
item's tokens and inputs equal the real HF processor's; forward on mixed media + text-only rows gives finite logits;
`Batch.select`/`concat` keep each row's logits; an AdamW step trains; LoRA reaches the language model only.
End to end (`load_native`): conversations through the checkpoint's template, forward, and generation from
left-padded batches that returns only the new tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_hf.idefics_blip_audio import BUILDERS

from mmcl.data.batching import Batch, Collator, Example, MediaLoader
from mmcl.models.base import Processor

FAMILY_TYPES = ["idefics3", "smolvlm", "blip-2", "instructblip", "qwen2_audio"]
QUESTION, ANSWER = "what colour is the shape?", "red"
QUESTIONS = [QUESTION, "how many shapes are there?", "where is the box?", "which word is written?"]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, list[Path]]:
    """Three images of different sizes (so tile counts differ) and three clips (0.6 s, 1 s, 1.5 s: cut to 1 s)."""
    import soundfile
    from PIL import Image

    out = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    images, clips = [], []
    for k, (w, h) in enumerate([(48, 40), (32, 32), (20, 60)]):
        images.append(out / f"im{k}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[-1])
    for k, seconds in enumerate([0.6, 1.0, 1.5]):
        clips.append(out / f"clip{k}.wav")
        t = np.arange(int(16000 * seconds)) / 16000
        soundfile.write(clips[-1], (0.3 * np.sin(2 * np.pi * (200 + 150 * k) * t)).astype(np.float32), 16000)
    return {"image": images, "audio": clips}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root, built = tmp_path_factory.mktemp("ckpt"), {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = BUILDERS[model_type](root / model_type)
        return built[model_type]

    return get


class StandIn(Processor):
    """A minimal processor over a family: one round `question -> answer` rendered by the chat template (or
    USER/ASSISTANT), one placeholder token per item, labels on the answer and its end token."""

    def __init__(self, family, tokenizer, template: str | None):
        self.family, self.tokenizer, self.template = family, tokenizer, template
        self.modalities = family.modalities
        self.pad_id, self.eos_ids = tokenizer.pad_token_id, [tokenizer.eos_token_id]

    def placeholder_id(self, modality: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.family.placeholder_token(modality))

    def _prompt(self, modality: str | None, question: str) -> str:
        if self.template is None:
            item = self.family.fallback_placeholder_text(modality) + "\n" if modality else ""
            return f"{self.tokenizer.bos_token or ''}USER: {item}{question}\nASSISTANT:"
        content = ([self.family.content_item(modality)] if modality else []) + [{"type": "text", "text": question}]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  chat_template=self.template, add_generation_prompt=True)

    def encode(self, conversations, for_generation=False):
        text = self._prompt(conversations[0]["modality"], conversations[0]["question"])
        prompt = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if for_generation:
            return prompt, [-100] * len(prompt)
        answer = self.tokenizer(" " + ANSWER, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return prompt + answer, [-100] * len(prompt) + answer

    def load_media(self, modality, path):
        return self.family.load_media(modality, path)


def open_family(path: Path):
    """The family, the HF model (eval mode) and a stand-in processor, loaded the way `load_native` does."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from mmcl.models.hf.families_idefics_blip_audio import Idefics3Family  # noqa: F401  (registers the families)
    from mmcl.models.hf.family import FAMILIES

    config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    family = FAMILIES[config.model_type](path, config, tokenizer)
    hf = getattr(transformers, family.model_class).from_pretrained(path).eval()
    template = (path / "chat_template.jinja").read_text() if (path / "chat_template.jinja").is_file() else None
    return family, hf, StandIn(family, tokenizer, template)


def examples(proc: Processor, media, for_generation: bool = False) -> list[Example]:
    """Rows: item 0, text only, item 1, item 2 (the family's modality), each with its own question."""
    m = proc.modalities[0]
    rows = [(m, {m: media[m][0]}), (None, {}), (m, {m: media[m][1]}), (m, {m: media[m][2]})]
    out = []
    for k, (modality, files) in enumerate(rows):
        ids, labels = proc.encode([{"modality": modality, "question": QUESTIONS[k]}], for_generation=for_generation)
        out.append(Example(str(k), ids, labels, files, "t"))
    return out


def logits(hf, family, batch: Batch) -> torch.Tensor:
    return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              **family.media_inputs(batch.media, batch.input_ids)).logits


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_items_match_the_real_processor(model_type, checkpoints, media):
    """Item tokens and inputs equal what the real HF processor builds (Idefics3Processor also stands for SmolVLM,
    whose processor needs a video processor and num2words; same expansion format)."""
    import transformers as tf
    from PIL import Image

    path = checkpoints(model_type)
    family, _, proc = open_family(path)
    tok = tf.AutoTokenizer.from_pretrained(path)
    if model_type in ("idefics3", "smolvlm"):
        ip_cls = tf.SmolVLMImageProcessorPil if model_type == "smolvlm" else tf.Idefics3ImageProcessorPil
        real = tf.Idefics3Processor(ip_cls.from_pretrained(path), tok, image_seq_len=4)
        for file in media["image"]:
            item = family.load_media("image", file)
            ref = real(text=["<image>"], images=[[Image.open(file).convert("RGB")]], add_special_tokens=False,
                       return_tensors="pt")
            assert item.tokens == ref["input_ids"][0].tolist()
            assert torch.equal(item.inputs["pixel_values"], ref["pixel_values"][0])
            assert torch.equal(item.inputs["pixel_attention_mask"], ref["pixel_attention_mask"][0].bool())
        tiles = family.load_media("image", media["image"][0]).inputs["pixel_values"].shape[0]
        assert tiles == (1 if model_type == "smolvlm" else 5)  # do_image_splitting off / on (2 x 2 tiles + global)
    elif model_type in ("blip-2", "instructblip"):
        ip = tf.BlipImageProcessorPil.from_pretrained(path)
        if model_type == "blip-2":
            real = tf.Blip2Processor(ip, tok, num_query_tokens=4)
        else:
            qtok = tf.AutoTokenizer.from_pretrained(path / "qformer_tokenizer")
            real = tf.InstructBlipProcessor(ip, tok, qtok, num_query_tokens=4)
        ims = [Image.open(f).convert("RGB") for f in media["image"]]
        ref = real(images=ims, text=[QUESTIONS[k] for k in (0, 2, 3)], padding=True, return_tensors="pt")
        item = family.load_media("image", media["image"][0])
        assert item.tokens == ref["input_ids"][0, :4].tolist()  # the real processor puts them before BOS
        assert torch.equal(item.inputs["pixel_values"], ref["pixel_values"][0])
        if model_type == "instructblip":  # the Q-Former reads each row's instruction, never the answer
            batch = Collator(proc, MediaLoader(proc))(examples(proc, media))
            got = family.media_inputs(batch.media, batch.input_ids)
            assert torch.equal(got["qformer_input_ids"], ref["qformer_input_ids"])
            assert torch.equal(got["qformer_attention_mask"], ref["qformer_attention_mask"])
    else:
        import soundfile

        real = tf.Qwen2AudioProcessor(tf.WhisperFeatureExtractor.from_pretrained(path), tok)
        for file, frames in zip(media["audio"], [60, 100, 100]):
            item = family.load_media("audio", file)
            wave, _ = soundfile.read(file, dtype="float32")
            ref = real(text=["<|audio_bos|><|AUDIO|><|audio_eos|>"], audio=[wave], sampling_rate=16000,
                       return_tensors="pt")
            assert [t for t in ref["input_ids"][0].tolist() if t == family.audio_id] == item.tokens
            assert len(item.tokens) == ((frames - 1) // 2 + 1 - 2) // 2 + 1  # 100 frames -> 25
            assert torch.allclose(item.inputs["input_features"], ref["input_features"][0], atol=1e-6)
            assert torch.equal(item.inputs["feature_attention_mask"], ref["feature_attention_mask"][0].long())


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_forward_mixed_rows_select_concat(model_type, checkpoints, media):
    """Mixed media/text-only rows give finite (B, L, V) logits, and every row keeps its logits when the batch is
    cut and re-joined (other widths, other tile padding), or run alone as a text-only batch."""
    family, hf, proc = open_family(checkpoints(model_type))
    collate = Collator(proc, MediaLoader(proc))
    exs = examples(proc, media)
    batch = collate(exs)
    with torch.no_grad():
        full = logits(hf, family, batch)
        assert full.shape == (*batch.input_ids.shape, hf.config.text_config.vocab_size)
        assert torch.isfinite(full).all()
        parts = [batch.select([3, 1]), collate([exs[0]]), collate([exs[2]])]
        joined = Batch.concat(parts, proc.pad_id)
        assert joined.ids == ["3", "1", "0", "2"] and [bool(m) for m in joined.media] == [True, False, True, True]
        cuts = [(batch.select([2, 0]), [2, 0]), (joined, [3, 1, 0, 2]), (parts[0], [3, 1])]
        for got, rows in [(logits(hf, family, b), rows) for b, rows in cuts]:
            for k, r in enumerate(rows):
                n = int(batch.attention_mask[r].sum())
                torch.testing.assert_close(got[k, :n], full[r, :n], atol=1e-5, rtol=1e-5)
        alone = collate([exs[1]])  # a text-only batch (retention tasks), under no_grad
        torch.testing.assert_close(logits(hf, family, alone)[0], full[1, : alone.input_ids.shape[1]],
                                   atol=1e-5, rtol=1e-5)
    # ... and with gradients on (BLIP takes another path there: no pixels at all)
    torch.testing.assert_close(logits(hf, family, alone)[0].detach(), full[1, : alone.input_ids.shape[1]],
                               atol=1e-5, rtol=1e-5)


def lm_loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_adamw_step_trains_every_part(model_type, checkpoints, media):
    """One AdamW step on a mixed batch: finite loss, and encoder, projector and language model all change; a
    text-only batch gives the media towers no gradient at all."""
    family, hf, proc = open_family(checkpoints(model_type))
    hf.train()
    batch = Collator(proc, MediaLoader(proc))(examples(proc, media))
    parts = family.parts(hf)
    watch = {name: next(iter(mods.values())) for name, mods in parts.items()}
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in watch.items()}
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-2)
    loss = lm_loss(logits(hf, family, batch), batch.labels)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    for name, module in watch.items():
        assert any(not torch.equal(a, p) for a, p in zip(before[name], module.parameters())), name
    if model_type.startswith(("blip", "instruct")):  # the query tokens are part of the projector and train
        assert any(p is hf.query_tokens for p in parts["projectors"]["image"].parameters())
    opt.zero_grad(set_to_none=True)
    text = Collator(proc, MediaLoader(proc))(examples(proc, media)[1:2])
    lm_loss(logits(hf, family, text), text.labels).backward()
    for name in ("encoders", "projectors"):
        assert all(p.grad is None for m in parts[name].values() for p in m.parameters()), name
    assert any(p.grad is not None for p in parts["language_model"]["lm"].parameters())


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_lora_reaches_the_language_model_only(model_type, checkpoints, media):
    """A regex built from `language_model_path` adapts q/v projections of the language model and no tower (CLIP,
    SigLIP, Whisper encoders have q_proj/v_proj too)."""
    from peft import LoraConfig, get_peft_model

    family, hf, proc = open_family(checkpoints(model_type))
    towers = [m for name in ("encoders", "projectors") for m in family.parts(hf)[name].values()]
    prefix = re.escape(".".join(family.language_model_path))
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=rf"^{prefix}\..*\.(q_proj|v_proj)$"))
    assert not [n for t in towers for n, _ in t.named_modules() if "lora_" in n]
    lm = hf
    for name in family.language_model_path:
        lm = getattr(lm, name)
    assert sum("lora_A" in n for n, _ in lm.named_modules()) >= 4
    batch = Collator(proc, MediaLoader(proc))(examples(proc, media))
    lm_loss(logits(pm, family, batch), batch.labels).backward()
    trained = {n for n, p in pm.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n for n in trained)


@pytest.mark.parametrize("model_type", FAMILY_TYPES)
def test_load_native_end_to_end(model_type, checkpoints, media):
    """`load_native` on the saved checkpoint: the template's prompt with one placeholder per item, a training
    batch through NativeVLM, and greedy generation from a left-padded mixed batch returning only new tokens whose
    first token is what the row's own (unpadded) forward predicts; a text-only batch generates too."""
    from mmcl.models.hf import load_native

    vlm, proc = load_native(checkpoints(model_type))
    m = proc.modalities[0]
    convs = [[{"from": "human", "value": f"<{m}>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}],
             [{"from": "human", "value": "how many shapes are there?"}, {"from": "gpt", "value": "two"}]]
    files = [{m: media[m][0]}, {}, {m: media[m][2]}]
    rows = [convs[0], convs[1], convs[0]]

    def make(for_generation: bool) -> list[Example]:
        return [Example(str(k), *proc.encode(c, for_generation=for_generation), f, "t")
                for k, (c, f) in enumerate(zip(rows, files))]

    train = Collator(proc, MediaLoader(proc))(make(False))
    assert (train.labels != -100).any(dim=1).all()
    with torch.no_grad():
        out = vlm(train.input_ids, train.attention_mask, **vlm.media_inputs(train.media, train.input_ids)).logits
    assert out.shape[:2] == train.input_ids.shape and torch.isfinite(out).all()
    if model_type.startswith(("blip", "instruct")):
        assert any(p is vlm.hf.query_tokens for p in vlm.part_parameters("projectors", {"image"}))

    collate = Collator(proc, MediaLoader(proc), left_pad=True)
    gen = collate(make(True))
    with torch.no_grad():
        new = vlm.generate_new(gen.input_ids, gen.attention_mask, 4, **vlm.media_inputs(gen.media, gen.input_ids),
                               pad_token_id=proc.pad_id, eos_token_id=[-1])  # no early stop: 4 new tokens
        assert new.shape == (3, 4)
        for k, example in enumerate(make(True)):
            one = collate([example])
            first = vlm(one.input_ids, one.attention_mask, **vlm.media_inputs(one.media, one.input_ids)).logits
            assert int(first[0, -1].argmax()) == int(new[k, 0]), k
        text = collate(make(True)[1:2])
        assert vlm.generate_new(text.input_ids, text.attention_mask, 3, **vlm.media_inputs(text.media, text.input_ids),
                                pad_token_id=proc.pad_id).shape[0] == 1


def test_instructblip_instruction_is_the_image_turn(checkpoints):
    """The Q-Former text is the human turn holding the image, wherever the image sits in it, without the answer
    or later rounds, in training and generation encodings alike."""
    from mmcl.models.hf import load_native

    vlm, proc = load_native(checkpoints("instructblip"))
    conv = [{"from": "human", "value": "where is the box?\n<image>"}, {"from": "gpt", "value": "left"},
            {"from": "human", "value": "how many?"}, {"from": "gpt", "value": "two"}]
    for for_generation in (False, True):
        ids, _ = proc.encode(conv, for_generation=for_generation)
        assert vlm.native_family.instruction(ids) == "where is the box?"
    ids, _ = proc.encode([{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": ANSWER}])
    assert vlm.native_family.instruction(ids) == QUESTION


def test_refusals_name_the_problem(checkpoints, tmp_path):
    """A Qwen2-Audio feature extractor whose window does not fit the encoder, and an InstructBLIP directory without
    its Q-Former tokenizer, are refused at load with a message saying what to fix."""
    import json
    import shutil

    from mmcl.models.base import ModelLoadError
    from mmcl.models.hf import load_native

    audio = shutil.copytree(checkpoints("qwen2_audio"), tmp_path / "audio")
    cfg = json.loads((audio / "preprocessor_config.json").read_text())
    cfg.update(chunk_length=2, n_samples=32000, nb_max_frames=200)
    (audio / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="max_source_positions"):
        load_native(audio)
    blip = shutil.copytree(checkpoints("instructblip"), tmp_path / "blip")
    shutil.rmtree(blip / "qformer_tokenizer")
    with pytest.raises(ModelLoadError, match="qformer_tokenizer"):
        load_native(blip)
