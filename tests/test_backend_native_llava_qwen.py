"""Native backends LLaVA-1.5, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL on tiny random checkpoints saved the Hugging
Face way: labels, prompts, placeholder expansion, forward against a direct HF call, batch cut/join, a training step,
generation, video, LoRA on the language model and the load errors."""

from __future__ import annotations

import functools
import json
import shutil
import types

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tiny_hf.llava_qwen import BUILDERS

from mmcl.data.batching import Batch, Collator, Example, MediaLoader
from mmcl.models.base import ModelLoadError, backends
from mmcl.models.hf import load_native

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21.2 itself

FAMILIES = ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
VIDEO = ["llava_onevision", "qwen2_vl", "qwen2_5_vl"]
END = {"llava": "</s>", "llava_onevision": "<|im_end|>", "qwen2_vl": "<|im_end|>", "qwen2_5_vl": "<|im_end|>"}
CONV = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many shapes are there?"}, {"from": "gpt", "value": "two"}]
TEXT = [{"from": "human", "value": "what colour is the square?"}, {"from": "gpt", "value": "blue"}]
VIDEO_CONV = [{"from": "human", "value": "<video>\ndescribe this video"}, {"from": "gpt", "value": "moving right"}]
QUESTION = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {k: BUILDERS[k](root / k) for k in FAMILIES}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    out = {}
    for name, (w, h), colour in (("small", (32, 32), "red"), ("tall", (40, 56), "green")):
        im = Image.new("RGB", (w, h), "white")
        ImageDraw.Draw(im).ellipse([4, 6, w - 5, h - 7], fill=colour)
        im.save(root / f"{name}.png")
        out[name] = root / f"{name}.png"
    (root / "clip").mkdir()
    for i in range(6):
        im = Image.new("RGB", (40, 40), "black")
        ImageDraw.Draw(im).rectangle([i * 5, 12, i * 5 + 10, 24], fill="blue")
        im.save(root / "clip" / f"{i:02d}.png")
    out["video"] = root / "clip"
    return out


def load(ckpts, family):
    torch.manual_seed(0)
    return load_native(ckpts[family])


def rows(proc, media, video=False):
    ids, labels = proc.encode(CONV)
    out = [Example("a", ids, labels, {"image": media["small"]}, "t"), Example("b", *proc.encode(TEXT), {}, "t"),
           Example("c", ids, labels, {"image": media["tall"]}, "t")]
    if video:
        out.append(Example("d", *proc.encode(VIDEO_CONV), {"video": media["video"]}, "t"))
    return out


def run(vlm, batch):
    return vlm(batch.input_ids, batch.attention_mask, **vlm.media_inputs(batch.media, batch.input_ids)).logits


def onevision_reference_tokens(image_processor, config, height, width):
    """Image tokens by transformers' own LlavaOnevisionProcessor arithmetic (the class cannot be built without
    torchvision, so its methods run on a stand-in)."""
    from transformers import LlavaOnevisionProcessor as P

    side = config.vision_config.image_size // config.vision_config.patch_size
    fake = types.SimpleNamespace(image_processor=image_processor, num_image_tokens=side**2,
                                 vision_aspect_ratio=config.vision_aspect_ratio)
    fake._get_unpadded_features = functools.partial(P._get_unpadded_features, fake)
    size = config.vision_config.image_size
    return P._get_number_of_features(fake, height, width, size, size)


def expected_tokens(family, proc, path):
    im = Image.open(path)
    if family == "llava":
        return 16  # (16 px / 4 px)^2, CLS dropped
    if family == "llava_onevision":
        return onevision_reference_tokens(proc.family.image_processor, proc.family.config, im.height, im.width)
    return proc.family.image_processor.get_number_of_image_patches(im.height, im.width) // 4


def spans(ids, labels):
    out, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_cover_answers_and_prompt_is_prefix(ckpts, family):
    vlm, proc = load(ckpts, family)
    ids, labels = proc.encode(CONV)
    decoded = [proc.tokenizer.decode(s).strip() for s in spans(ids, labels)]
    assert decoded == ["red" + END[family], "two" + END[family]]
    assert ids.count(proc.placeholder_id("image")) == 1
    if family == "llava":  # its tokenizer adds <s> itself (as Llama's does); the template does not write it
        assert ids[0] == proc.tokenizer.bos_token_id and ids.count(ids[0]) == 1
    assert END[family] in [proc.tokenizer.convert_ids_to_tokens(i) for i in proc.eos_ids]
    prompt, plabels = proc.encode(CONV, for_generation=True)
    assert ids[: len(prompt)] == prompt and set(plabels) == {-100}
    assert labels[len(prompt)] != -100 and labels[len(prompt) - 1] == -100  # the prompt ends where "two" starts
    assert vlm.family == family and vlm.modalities == proc.modalities
    assert set(backends()) >= set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_collate_forward_and_cut_join(ckpts, media, family):
    vlm, proc = load(ckpts, family)
    examples = rows(proc, media, video=family in VIDEO)
    batch = Collator(proc, MediaLoader(proc))(examples)
    pid = proc.placeholder_id("image")
    counts = [(batch.input_ids[i] == pid).sum().item() for i in range(len(batch))]
    assert counts[:3] == [expected_tokens(family, proc, media["small"]), 0,
                          expected_tokens(family, proc, media["tall"])]
    with torch.no_grad():
        logits = run(vlm, batch)
        assert logits.shape == (*batch.input_ids.shape, len(proc.tokenizer)) and torch.isfinite(logits).all()
        mask = batch.attention_mask.bool()
        for i in range(len(batch)):
            alone = run(vlm, batch.select([i]))[0]
            torch.testing.assert_close(alone[mask[i]], logits[i][mask[i]], atol=1e-5, rtol=1e-5)
        joined = Batch.concat([batch.select([1]), batch.select([2, 0])], proc.pad_id)
        again = run(vlm, joined)
        for j, i in enumerate([1, 2, 0]):
            torch.testing.assert_close(again[j][mask[i]], logits[i][mask[i]], atol=1e-5, rtol=1e-5)


def reference_inputs(family, path, image):
    """Model inputs built without mmcl: the template through the tokenizer, the image through the HF image processor
    (or LlavaProcessor, the one processor that builds without torchvision)."""
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        CLIPImageProcessorPil,
        LlavaOnevisionImageProcessorPil,
        LlavaProcessor,
        Qwen2VLImageProcessorPil,
    )

    tok = AutoTokenizer.from_pretrained(path)
    question = {"type": "text", "text": "What colour is the shape?"}
    messages = [{"role": "user", "content": [{"type": "image"}, question]}]
    text = tok.apply_chat_template(messages, chat_template=(path / "chat_template.jinja").read_text(), tokenize=False,
                                   add_generation_prompt=True)
    im = Image.open(image).convert("RGB")
    if family == "llava":
        p = LlavaProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(path), tokenizer=tok, patch_size=4,
                           vision_feature_select_strategy="default", num_additional_image_tokens=1)
        return dict(p(text=[text], images=[im], return_tensors="pt"))
    if family == "llava_onevision":
        ip = LlavaOnevisionImageProcessorPil.from_pretrained(path)
        n = onevision_reference_tokens(ip, AutoConfig.from_pretrained(path), im.height, im.width)
        px = ip(images=[im], return_tensors="pt")
        ids = tok([text.replace("<image>", "<image>" * n)], return_tensors="pt")["input_ids"]
        return dict(input_ids=ids, pixel_values=px["pixel_values"], image_sizes=px["image_sizes"])
    px = Qwen2VLImageProcessorPil.from_pretrained(path)(images=[im], return_tensors="pt")
    n = int(px["image_grid_thw"].prod()) // 4
    ids = tok([text.replace("<|image_pad|>", "<|image_pad|>" * n)], return_tensors="pt")["input_ids"]
    mm = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).int()
    return dict(input_ids=ids, pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                mm_token_type_ids=mm)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_a_direct_hf_call(ckpts, media, family):
    vlm, proc = load(ckpts, family)
    ref = reference_inputs(family, ckpts[family], media["tall"])
    ids, labels = proc.encode(QUESTION, for_generation=True)
    batch = Collator(proc, MediaLoader(proc))([Example("q", ids, labels, {"image": media["tall"]}, "t")])
    assert batch.input_ids.tolist() == ref["input_ids"].tolist()
    with torch.no_grad():
        ours = run(vlm, batch)
        ref.pop("attention_mask", None)
        theirs = vlm.hf(attention_mask=torch.ones_like(ref["input_ids"]), **ref).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_changes_every_part(ckpts, media, family):
    vlm, proc = load(ckpts, family)
    vlm.train()
    batch = Collator(proc, MediaLoader(proc))(rows(proc, media, video=family in VIDEO))
    logits = run(vlm, batch)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=-100)
    assert torch.isfinite(loss)
    parts = {p: vlm.part_parameters(p) for p in ("encoders", "projectors", "language_model")}
    before = {p: [x.detach().clone() for x in ps] for p, ps in parts.items()}
    opt = torch.optim.AdamW(vlm.parameters(), lr=1e-3)
    loss.backward()
    opt.step()
    for p, ps in parts.items():
        assert any(not torch.equal(a, b) for a, b in zip(ps, before[p])), f"{p} did not change"


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_new_left_padded_matches_alone(ckpts, media, family):
    vlm, proc = load(ckpts, family)
    gen = Collator(proc, MediaLoader(proc), left_pad=True)
    examples = [Example("a", *proc.encode(CONV, for_generation=True), {"image": media["small"]}, "t"),
                Example("b", *proc.encode(TEXT[:1], for_generation=True), {}, "t")]
    batch = gen(examples)
    kw = vlm.media_inputs(batch.media, batch.input_ids)
    new = vlm.generate_new(batch.input_ids, batch.attention_mask, 6, **kw)
    assert new.shape[0] == 2 and 0 < new.shape[1] <= 6
    full = vlm.hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=6,
                           do_sample=False, **kw)
    assert torch.equal(full[:, batch.input_ids.shape[1]:], new)
    for i, ex in enumerate(examples):
        one = gen([ex])
        alone = vlm.generate_new(one.input_ids, one.attention_mask, 6, **vlm.media_inputs(one.media, one.input_ids))[0]
        assert new[i, : len(alone)].tolist() == alone.tolist()
        assert set(new[i, len(alone):].tolist()) <= {proc.pad_id}
    assert isinstance(proc.decode_answer(new[0].tolist()), str)


@pytest.mark.parametrize("family", VIDEO)
def test_video(ckpts, media, family):
    vlm, proc = load(ckpts, family)
    item = proc.load_media("video", media["video"])
    if family == "llava_onevision":
        assert item.inputs["pixel_values_videos"].shape == (4, 3, 16, 16)
        assert len(item.tokens) == 4 * 2 * 2 + 1  # 4 frames x pooled 2x2 + newline
    else:  # 4 frames of 40x40 -> 56x56: grid (2, 4, 4) -> 8 tokens; each temporal patch holds 2 consecutive frames
        assert item.inputs["video_grid_thw"].tolist() == [2, 4, 4] and len(item.tokens) == 8
        from mmcl.data.media import read_video_frames

        frames = read_video_frames(media["video"], 4)
        image = proc.family.image_processor(images=frames, return_tensors="pt")["pixel_values"]
        image = image.view(4, 16, 3, 2, 14, 14)
        video = item.inputs["pixel_values_videos"].view(2, 16, 3, 2, 14, 14)
        for f in range(4):
            torch.testing.assert_close(video[f // 2, :, :, f % 2], image[f, :, :, 0])
    assert set(item.tokens) == {proc.placeholder_id("video")}
    if family == "qwen2_5_vl":  # 2 frames per temporal patch at the default 2 fps: one second per patch
        assert item.inputs["second_per_grid_ts"].item() == 1.0
    batch = Collator(proc, MediaLoader(proc))(rows(proc, media, video=True)[1:] + rows(proc, media, video=True)[-1:])
    with torch.no_grad():
        logits = run(vlm, batch)
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(run(vlm, batch.select([2]))[0], logits[2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_language_model_then_merge(ckpts, media, family):
    from peft import LoraConfig, get_peft_model

    vlm, proc = load(ckpts, family)
    batch = Collator(proc, MediaLoader(proc))(rows(proc, media)[:2])
    with torch.no_grad():
        base = run(vlm, batch)
    peft = get_peft_model(vlm.language_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0))
    vlm.language_model = peft
    assert vlm.parts()["language_model"]["lm"] is peft and vlm.hf.model.language_model is peft
    with torch.no_grad():
        torch.testing.assert_close(run(vlm, batch), base)  # B = 0 at init
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
        wrapped = run(vlm, batch)
    assert not torch.allclose(wrapped, base, atol=1e-4)
    question = Example("a", *proc.encode(QUESTION, True), {"image": media["small"]}, "t")
    gen = Collator(proc, MediaLoader(proc), left_pad=True)([question])
    assert vlm.generate_new(gen.input_ids, gen.attention_mask, 3, **vlm.media_inputs(gen.media, gen.input_ids)).numel()
    vlm.language_model = peft.merge_and_unload()
    assert not any("lora" in n for n, _ in vlm.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(run(vlm, batch), wrapped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_parts(ckpts, family):
    vlm, _ = load(ckpts, family)
    parts = vlm.parts()
    assert set(parts["encoders"]) == set(vlm.modalities) == set(parts["projectors"])
    assert parts["language_model"]["head"] is vlm.hf.lm_head is vlm.output_embeddings()
    assert parts["language_model"]["lm"] is vlm.hf.model.language_model
    assert vlm.separable_projector == (family.startswith("llava"))
    lm_names = vlm.language_model_parameter_names()
    assert lm_names and all("language_model" in n or "lm_head" in n for n in lm_names)
    if family == "llava_onevision":
        assert any(p is vlm.hf.model.image_newline for p in vlm.part_parameters("projectors"))


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
def test_onevision_anyres_token_count(ckpts, aspect):
    vlm, proc = load(ckpts, "llava_onevision")
    fam = proc.family
    fam.config.vision_aspect_ratio = vlm.hf.config.vision_aspect_ratio = aspect
    for h, w in [(32, 32), (56, 40), (20, 90), (90, 20), (17, 300), (16, 16)]:
        px = fam.image_processor(images=[Image.new("RGB", (w, h), "red")], return_tensors="pt")
        with torch.no_grad():
            feats = vlm.hf.model.get_image_features(pixel_values=px["pixel_values"], image_sizes=px["image_sizes"])
        model_count = feats.pooler_output[0].shape[0]
        assert fam.num_image_tokens(h, w) == model_count == onevision_reference_tokens(
            fam.image_processor, fam.config, h, w), (h, w)


def _copy(ckpts, tmp_path, name="copy"):
    return shutil.copytree(ckpts["llava"], tmp_path / name)


def _config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_load_errors_name_the_file(ckpts, tmp_path):
    d = _copy(ckpts, tmp_path, "unknown")
    _config(d, model_type="mystery_vlm")
    with pytest.raises(ModelLoadError, match=r"model_type 'mystery_vlm'.*llava.*qwen2_vl"):
        load_native(d)
    d = _copy(ckpts, tmp_path, "pickle")
    torch.save({}, d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*allow_pickle"):
        load_native(d)
    d = _copy(ckpts, tmp_path, "remote")
    _config(d, auto_map={"AutoModel": "modeling_x.XModel"})
    with pytest.raises(ModelLoadError, match=r"auto_map.*trust_remote_code=true"):
        load_native(d)
    d = _copy(ckpts, tmp_path, "noproc")
    (d / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"preprocessor_config\.json.*save_pretrained"):
        load_native(d)
    d = _copy(ckpts, tmp_path, "notok")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer.*save_pretrained"):
        load_native(d)


def test_template_sources_and_fallback(ckpts, tmp_path):
    _, jinja = load(ckpts, "llava")
    d = _copy(ckpts, tmp_path, "json")
    (d / "chat_template.json").write_text(json.dumps({"chat_template": (d / "chat_template.jinja").read_text()}))
    (d / "chat_template.jinja").unlink()
    _, js = load_native(d)
    assert js.template_source.endswith("chat_template.json") and js.encode(CONV) == jinja.encode(CONV)
    (d / "chat_template.json").unlink()
    _, plain = load_native(d)
    ids, labels = plain.encode(CONV)
    assert plain.tokenizer.decode(ids) == ("<s>USER: <image>\nWhat colour is the shape?\nASSISTANT: red</s>\n"
                                           "USER: how many shapes are there?\nASSISTANT: two</s>\n")
    assert [plain.tokenizer.decode(s) for s in spans(ids, labels)] == [" red</s>", " two</s>"]
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'][-1]['text'] }}\n"
                                           "{% endfor %}{% if add_generation_prompt %}{{ 'bot says:' }}{% endif %}")
    with pytest.raises(ModelLoadError, match=r"chat_template\.jinja.*not a prefix"):
        load_native(d)


def test_onevision_template_quirk_keeps_train_and_eval_prompts_equal(ckpts):
    """llava-hf's OneVision template renders "assistant \\n" in turns but "assistant\\n" as generation prompt: the
    eval prompt of a recorded answer is the training prefix, a bare question gets the template's own prompt."""
    _, proc = load(ckpts, "llava_onevision")
    ids, _ = proc.encode(CONV[:2])
    prompt, _ = proc.encode(CONV[:2], for_generation=True)
    assert proc.tokenizer.decode(prompt).endswith("<|im_start|>assistant \n") and ids[: len(prompt)] == prompt
    assert proc.tokenizer.decode(proc.encode(QUESTION, True)[0]).endswith("<|im_start|>assistant\n")


def test_video_frames_from_the_checkpoint_video_config(ckpts, media, tmp_path):
    d = shutil.copytree(ckpts["qwen2_vl"], tmp_path / "qwen")
    (d / "video_preprocessor_config.json").write_text(json.dumps({"num_frames": 6}))
    _, proc = load_native(d)
    item = proc.load_media("video", media["video"])
    assert item.inputs["video_grid_thw"].tolist() == [3, 4, 4] and len(item.tokens) == 12
