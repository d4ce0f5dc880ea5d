"""Tests of audio and video end to end: decoding and features, the shared image tower, mixed-modality batches,
save/load with audio and video towers, assembling a model from separately saved Hugging Face parts, the world's
audio and video tasks and the MICL streams."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import yaml
from PIL import Image

from mmcl.config import load_config
from mmcl.data.batching import Collator, Example, MediaLoader, encode_records
from mmcl.data.media import frame_indices
from mmcl.data.records import check_media_file, load_task, read_records
from mmcl.data.streams import load_stream
from mmcl.data.synth import WorldSizes, world_texts, write_world
from mmcl.data.synth.clips import clip_bytes
from mmcl.data.synth.shapes import BACKGROUNDS, COLOURS
from mmcl.data.synth.sounds import beeps
from mmcl.engine import loop
from mmcl.eval.generate import generate_answers
from mmcl.models.builder import assemble_model, check_num_tokens, load_model, save_model
from mmcl.models.composition import audio_features, composition_processor, load_audio, load_video
from mmcl.models.mllm import P4_CUES, ModalitySpec, P4Adapter, pool_tokens
from mmcl.models.tiny import TinySizes, build_tiny
from mmcl.models.tokenizer import train_bpe_tokenizer

# 32 px images, patch 8 (a 4x4 grid), video pooled 2x2: the by-hand computations below are written for these sizes
SIZES = TinySizes(hidden=32, layers=1, heads=2, intermediate=64, vision_hidden=32, vision_layers=1, audio_hidden=32,
                  audio_layers=1, image_size=32, patch_size=8, video_pool=2)
SMALL = WorldSizes(train=6, test=6, lang_train=6, align=8, image_size=32)
MICL1 = ["audio_cap", "image_cap", "video_qa", "audio_qa", "image_qa", "video_cap"]
MICL2 = ["image_cap", "video_cap", "video_qa", "image_qa", "audio_cap", "audio_qa"]
RETENTION = ["lang_arith", "lang_facts", "lang_order"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    write_world(out, seed=5, sizes=SMALL)
    return out


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_bpe_tokenizer([*world_texts(world), "USER: ASSISTANT:"], vocab_size=400)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return build_tiny(tokenizer, SIZES, seed=0).eval()


def _sine(freq: float, seconds: float, rate: int, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def _slaney_mel(f: float) -> float:
    """The Slaney mel scale Whisper's filters use: linear (3 per 200 Hz) below 1 kHz, logarithmic above."""
    return 3 * f / 200 if f < 1000 else 15 + 27 * math.log(f / 1000) / math.log(6.4)


def _expected_bin(freq: float, n_mels: int = 80, top: float = 8000.0) -> int:
    # n_mels triangular filters whose peaks are the inner points of n_mels + 2 points evenly spaced in mel
    return round(_slaney_mel(freq) / (_slaney_mel(top) / (n_mels + 1))) - 1


def _spec_audio(seconds: int = 1) -> ModalitySpec:
    return ModalitySpec("<audio>", 10, select="full", pool=5, seconds=seconds)


# -- audio decoding and features ----------------------------------------------------------------------------------


@pytest.mark.parametrize("freq", [500.0, 1000.0, 3000.0])
def test_a_wav_of_a_sine_peaks_at_its_mel_bin(tmp_path: Path, freq: float) -> None:
    path = tmp_path / "sine.wav"
    soundfile.write(path, _sine(freq, 1.0, 16000), 16000, subtype="PCM_16")
    feats = load_audio(path, _spec_audio())
    assert feats.shape == (80, 100) and feats.dtype == torch.float32
    peak = int(feats[:, 10:90].mean(1).argmax())  # middle frames: away from the padded edges of the STFT
    assert abs(peak - _expected_bin(freq)) <= 1, (peak, _expected_bin(freq))
    assert torch.equal(load_audio(path, _spec_audio()), feats)  # deterministic


def test_stereo_44k_audio_is_mixed_down_and_resampled(tmp_path: Path) -> None:
    mono16 = tmp_path / "a16.wav"
    stereo44 = tmp_path / "a44.wav"
    soundfile.write(mono16, _sine(1000.0, 1.0, 16000), 16000, subtype="FLOAT")
    left = _sine(1000.0, 1.0, 44100)
    soundfile.write(stereo44, np.stack([left, left], axis=1), 44100, subtype="FLOAT")
    a, b = load_audio(mono16, _spec_audio()), load_audio(stereo44, _spec_audio())
    assert a.shape == b.shape == (80, 100)
    assert int(b[:, 10:90].mean(1).argmax()) == int(a[:, 10:90].mean(1).argmax()) == _expected_bin(1000.0)
    assert (a[:, 5:95] - b[:, 5:95]).abs().max() < 0.05  # the same sound after resampling


def test_short_audio_is_padded_and_long_audio_cut(tmp_path: Path) -> None:
    spec = _spec_audio()
    half = audio_features(_sine(1000.0, 0.5, 16000), 16000, spec)
    assert half.shape == (80, 100)
    silence = half[:, 55:]
    assert torch.all(silence == silence.min())  # padded with zeros: the log-mel floor everywhere
    assert half[:, 10:45].max() > silence.min() + 1.0
    long = audio_features(_sine(1000.0, 2.5, 16000), 16000, spec)
    one = audio_features(_sine(1000.0, 1.0, 16000), 16000, spec)
    assert long.shape == (80, 100)
    assert (long[:, :95] - one[:, :95]).abs().max() < 1e-4


# -- video decoding ----------------------------------------------------------------------------------------------


def test_frame_indices_are_uniform_and_keep_both_ends() -> None:
    assert frame_indices(7, 4) == [0, 2, 4, 6]
    assert frame_indices(6, 4) == [0, 2, 3, 5]
    assert frame_indices(4, 4) == [0, 1, 2, 3]
    assert frame_indices(2, 4) == [0, 0, 1, 1]
    assert frame_indices(9, 1) == [4]
    with pytest.raises(ValueError, match="no frames"):
        frame_indices(0, 4)


SOLID = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255), (128, 128, 128)]


def _solid_frames(size: int = 16) -> list[Image.Image]:
    return [Image.new("RGB", (size, size), c) for c in SOLID]


def test_load_video_samples_frames_and_normalises_like_images(tmp_path: Path) -> None:
    clip = tmp_path / "clip.mov"
    clip.write_bytes(clip_bytes(_solid_frames()))
    assert check_media_file("video", clip) is None
    spec = ModalitySpec("<video>", 4, image_size=8, frames=4, encoder="image")
    frames = load_video(clip, spec)
    assert frames.shape == (4, 3, 8, 8)
    # frames 0, 2, 4, 6 of 7; pixel v maps to (v / 255 - 0.5) / 0.5
    expected = torch.tensor([[c / 255 * 2 - 1 for c in SOLID[i]] for i in (0, 2, 4, 6)])
    torch.testing.assert_close(frames.mean((2, 3)), expected, atol=1e-6, rtol=0)
    # a folder of frame images is the same video
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, im in enumerate(_solid_frames()):
        im.save(folder / f"{i:03d}.png")
    assert check_media_file("video", folder) is None
    assert torch.equal(load_video(folder, spec), frames)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no frames")
    assert "no frame images" in check_media_file("video", empty)
    with pytest.raises(ValueError, match="holds no frame images"):
        load_video(empty, spec)


def test_a_broken_clip_is_reported_by_the_preflight_check(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mov"
    bad.write_bytes(b"not a video at all" * 10)
    assert check_media_file("video", bad).startswith("video file cannot be decoded")


# -- the model: pooling, the shared tower, specs ------------------------------------------------------------------


def test_pool_tokens_1d_and_grid() -> None:
    x = torch.arange(16.0).reshape(1, 16, 1)
    assert pool_tokens(x, 1).equal(x)
    assert pool_tokens(x, 4).flatten().tolist() == [1.5, 5.5, 9.5, 13.5]  # consecutive runs = grid rows
    assert pool_tokens(x, 2, "grid").flatten().tolist() == [2.5, 4.5, 10.5, 12.5]  # 2x2 windows of the 4x4 grid
    assert pool_tokens(x[:, :15], 4).flatten().tolist() == [1.5, 5.5, 9.5]  # remainder dropped
    with pytest.raises(ValueError, match="square number of tokens, got 15"):
        pool_tokens(x[:, :15], 2, "grid")


@pytest.mark.parametrize("mode, frames, tokens, pool, want", [
    ("grid", 2, 32, 2, 8),   # video: two frames of a 4x4 patch grid -> 2x2 per frame
    ("1d", 0, 50, 5, 10),    # audio: 50 positions -> 10
    ("1d", 0, 16, 1, 16),    # image: no pooling, as in P4
])
def test_p4_adapter_is_layernorm_conv_pooling_linear(mode, frames, tokens, pool, want) -> None:
    """P4's adapter by hand: LayerNorm, then a conv with kernel = stride = pool over each frame's tokens, then the
    linear map; with an averaging kernel the pooling equals `pool_tokens` of the normalised features."""
    torch.manual_seed(0)
    adapter = P4Adapter(6, 5, pool, mode, frames).eval()
    with torch.no_grad():
        for prm in adapter.parameters():
            prm.normal_()
    x = torch.randn(3, tokens, 6)
    out = adapter(x)
    assert out.shape == (3, want, 5)
    normed = torch.nn.functional.layer_norm(x, (6,), adapter.norm.weight, adapter.norm.bias)
    per_frame = normed.reshape(3 * max(frames, 1), tokens // max(frames, 1), 6)
    if pool == 1:
        pooled = per_frame
    elif mode == "grid":
        side = int(math.isqrt(per_frame.shape[1]))
        grid = per_frame.transpose(1, 2).reshape(-1, 6, side, side)
        pooled = torch.nn.functional.conv2d(grid, adapter.conv_pool.weight, adapter.conv_pool.bias, stride=pool)
        pooled = pooled.flatten(2).transpose(1, 2)
    else:
        pooled = torch.nn.functional.conv1d(per_frame.transpose(1, 2), adapter.conv_pool.weight,
                                            adapter.conv_pool.bias, stride=pool).transpose(1, 2)
    want_out = pooled.reshape(3, want, 6) @ adapter.proj.weight.T + adapter.proj.bias
    assert torch.allclose(out, want_out, atol=1e-5)
    if pool > 1:  # an averaging kernel (identity across channels) makes the conv exactly the average pooling
        with torch.no_grad():
            adapter.conv_pool.weight.zero_()
            adapter.conv_pool.bias.zero_()
            for c in range(6):
                adapter.conv_pool.weight[c, c] = 1.0 / adapter.conv_pool.weight[c, c].numel()
        avg = pool_tokens(per_frame, pool, mode).reshape(3, want, 6)
        assert torch.allclose(adapter(x), avg @ adapter.proj.weight.T + adapter.proj.bias, atol=1e-5)


def test_tiny_model_with_p4_adapters_trains_and_round_trips(tokenizer, world, tmp_path: Path) -> None:
    """`TinySizes(adapter="p4")`: every modality reads P4's adapter; a mixed batch trains every adapter part, and
    the saved model directory loads back to the same logits."""
    model = build_tiny(tokenizer, dataclasses.replace(SIZES, adapter="p4"), seed=2)
    assert {m: s.projector for m, s in model.modalities.items()} == {"image": "p4", "audio": "p4", "video": "p4"}
    assert {m: s.cue for m, s in model.modalities.items()} == P4_CUES
    assert model.projectors["image"].conv_pool is None and isinstance(model.projectors["video"].conv_pool,
                                                                       torch.nn.Conv2d)
    processor = composition_processor(model, tokenizer)
    records = _mixed_records(world)
    batch = Collator(processor, MediaLoader(processor))(encode_records(records, processor, "mix"))
    cue = tokenizer(P4_CUES["video"], add_special_tokens=False)["input_ids"]
    video_tokens = processor.load_media("video", records[2].media["video"]).tokens  # what the collator writes
    assert video_tokens == cue + [model.token_ids["video"]] * model.modalities["video"].num_tokens
    row = batch.input_ids[2].tolist()  # the cue's tokens come right before the video's placeholders
    first = row.index(model.token_ids["video"])
    assert cue and row[first - len(cue):first] == cue
    out = model.train()(batch.input_ids, batch.attention_mask, **model.media_inputs(batch.media, batch.input_ids),
                        labels=batch.labels)
    out.loss.backward()
    for m in ("image", "audio", "video"):
        for name, prm in model.projectors[m].named_parameters():
            assert prm.grad is not None and prm.grad.abs().sum() > 0, (m, name)
    save_model(model, tokenizer, tmp_path / "p4")
    loaded, _ = load_model(tmp_path / "p4")
    assert torch.equal(_logits(model, tokenizer, world), _logits(loaded, tokenizer, world))
    with pytest.raises(ValueError, match="projector must be one of"):
        ModalitySpec("<image>", 16, projector="qformer")
    with pytest.raises(ValueError, match="adapter must be 'llava' or 'p4'"):
        TinySizes(adapter="blip")


def test_spec_defaults_reproduce_the_first_format_and_bad_fields_are_refused() -> None:
    old = {"placeholder": "<image>", "num_tokens": 16, "projector": "mlp2x_gelu", "feature_layer": -1,
           "select": "patch", "pool": 1, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "cue": ""}
    spec = ModalitySpec.from_dict(old)
    assert (spec.encoder, spec.frames, spec.pool_mode) == (None, 0, "1d")
    with pytest.raises(ValueError, match=r"unknown modality spec field\(s\) \['warp'\]"):
        ModalitySpec.from_dict({**old, "warp": 9})
    with pytest.raises(ValueError, match="pool_mode must be one of"):
        ModalitySpec("<video>", 16, pool_mode="3d")
    with pytest.raises(ValueError, match="num_tokens 10 must be frames \\(4\\) x tokens per frame"):
        ModalitySpec("<video>", 10, frames=4)


def test_video_reads_the_image_tower_itself(tiny) -> None:
    model = tiny
    assert sorted(model.encoders) == ["audio", "image"]  # no copy of the tower for video
    assert model.encoder_for("video") is model.encoder_for("image") is model.encoders["image"]
    assert model.projectors["video"] is not model.projectors["image"]
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) and not any(n.startswith("encoders.video") for n in names)
    specs = model.modalities
    assert (specs["image"].num_tokens, specs["audio"].num_tokens, specs["video"].num_tokens) == (16, 10, 16)
    check_num_tokens(model)

    clips = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = model.encoder_features("video", clips)
        # by hand: every frame through the image tower, CLS dropped, 2x2 windows of the 4x4 patch grid, in time order
        per_frame = model.encoders["image"](clips.reshape(8, 3, 32, 32)).last_hidden_state[:, 1:]
        grid = per_frame.reshape(8, 4, 4, -1)
        pooled = grid.reshape(8, 2, 2, 2, 2, -1).mean((2, 4)).reshape(8, 4, -1)
        torch.testing.assert_close(feats, pooled.reshape(2, 16, -1), atol=1e-6, rtol=0)
        reversed_clips = model.encoder_features("video", clips.flip(1))
        assert torch.equal(reversed_clips[:, :4], feats[:, 12:])  # frame order is token order
        assert model.encode("video", clips).shape == (2, 16, SIZES.hidden)
        assert model.encode("audio", torch.randn(3, 80, 100)).shape == (3, 10, SIZES.hidden)
    with pytest.raises(ValueError, match=r"video: expected clips of shape \(N, 4, \.\.\.\)"):
        model.encode("video", torch.randn(2, 3, 3, 32, 32))


def test_build_tiny_modalities_and_refusals(tokenizer) -> None:
    image_only = build_tiny(tokenizer, SIZES, modalities=("image",))
    assert list(image_only.modalities) == ["image"] and list(image_only.encoders) == ["image"]
    audio_only = build_tiny(tokenizer, SIZES, modalities=("audio",))
    assert list(audio_only.encoders) == ["audio"]
    with pytest.raises(ValueError, match="modalities must be a non-empty subset"):
        build_tiny(tokenizer, SIZES, modalities=("smell",))
    from mmcl.models.mllm import MultimodalLM

    with pytest.raises(ValueError, match="video reads encoder 'image'; the encoders are \\['audio'\\]"):
        MultimodalLM(audio_only.language_model, {"audio": audio_only.encoders["audio"]},
                     {"video": ModalitySpec("<video>", 16, encoder="image", frames=4)}, {"video": 7})


# -- a batch mixing image, audio, video and text-only records ------------------------------------------------------


def _mixed_records(world: Path) -> list:
    records = []
    for name in ("image_qa", "audio_qa", "video_cap", "lang_arith"):
        good, problems = read_records(load_task(world / "tasks" / name), "test", limit=1)
        assert problems == []
        records += good
    return records


def test_mixed_batch_forward_backward_and_generate(tokenizer, world) -> None:
    model = build_tiny(tokenizer, SIZES, seed=1)
    processor = composition_processor(model, tokenizer)
    media = MediaLoader(processor)
    records = _mixed_records(world)
    assert [sorted(r.media) for r in records] == [["image"], ["audio"], ["video"], []]
    examples = encode_records(records, processor, "mix")
    batch = Collator(processor, media)(examples)
    assert [sorted(row) for row in batch.media] == [["image"], ["audio"], ["video"], []]
    inputs = model.media_inputs(batch.media, batch.input_ids)
    assert {m: tuple(v.shape) for m, v in inputs["media"].items()} == {
        "image": (1, 3, 32, 32), "audio": (1, 80, 100), "video": (1, 4, 3, 32, 32)}
    for row, (modality, n) in enumerate([("image", 16), ("audio", 10), ("video", 16), (None, 0)]):
        ids = batch.input_ids[row]
        for m, tid in model.token_ids.items():
            assert int((ids == tid).sum()) == (n if m == modality else 0), (row, m)

    model.train()
    out = model(batch.input_ids, batch.attention_mask, **inputs, labels=batch.labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in ("projectors.image", "projectors.audio", "projectors.video", "encoders.image", "encoders.audio",
                 "language_model"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part) and p.grad is not None]
        assert grads, part
        assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads), part

    # each row's media reaches that row only
    model.eval()
    other = [dict(row, audio={"values": torch.zeros_like(row["audio"]["values"])}) if "audio" in row else row
             for row in batch.media]
    with torch.no_grad():
        a = model(batch.input_ids, batch.attention_mask, **model.media_inputs(batch.media, batch.input_ids)).logits
        b = model(batch.input_ids, batch.attention_mask, **model.media_inputs(other, batch.input_ids)).logits
    changed = [(a[i] - b[i]).abs().max().item() > 1e-6 for i in range(4)]
    assert changed == [False, True, False, False]

    # generation: batched (left padding) equals one record at a time; random wide weights so answers vary
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.language_model.parameters():
            p.normal_(0.0, 0.5)
    left = Collator(processor, media, left_pad=True)
    args = (model, processor, left, records, "mix", 5)
    one_by_one = generate_answers(*args, 1, torch.device("cpu"), torch.float32)
    batched = generate_answers(*args, 4, torch.device("cpu"), torch.float32)
    assert batched == one_by_one
    assert all(len(a) >= 3 for a in one_by_one), one_by_one


def test_media_loader_has_a_decoder_for_every_modality(tiny, tokenizer, world) -> None:
    media = MediaLoader(composition_processor(tiny, tokenizer))
    rec = _mixed_records(world)
    image, audio, video = (media(m, rec[i].media[m]) for i, m in enumerate(("image", "audio", "video")))
    assert tuple(image.inputs["values"].shape) == (3, 32, 32)
    assert tuple(audio.inputs["values"].shape) == (80, 100)
    assert tuple(video.inputs["values"].shape) == (4, 3, 32, 32)
    # each item stands for its modality's num_tokens placeholders in the text (no cue for LLaVA-style adapters)
    assert image.tokens == [tiny.token_ids["image"]] * 16
    assert audio.tokens == [tiny.token_ids["audio"]] * 10
    assert video.tokens == [tiny.token_ids["video"]] * 16
    small = train_bpe_tokenizer(["a b"], 300)
    image_only = MediaLoader(composition_processor(build_tiny(small, SIZES, modalities=("image",)), small))
    with pytest.raises(ValueError, match=r"the model reads \['image'\], not 'audio'; needed for "):
        image_only("audio", rec[1].media["audio"])


# -- save / load ----------------------------------------------------------------------------------------------------


def _logits(model, tokenizer, world) -> torch.Tensor:
    processor = composition_processor(model, tokenizer)
    batch = Collator(processor, MediaLoader(processor))(encode_records(_mixed_records(world), processor, "m"))
    with torch.no_grad():
        return model.eval()(batch.input_ids, batch.attention_mask,
                            **model.media_inputs(batch.media, batch.input_ids)).logits


def test_model_dir_with_audio_and_video_round_trips(tiny, tokenizer, world, tmp_path: Path) -> None:
    save_model(tiny, tokenizer, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "mmcl_model.json").read_text())
    assert index["encoders"] == {"image": "CLIPVisionModel", "audio": "WhisperEncoder"}
    assert index["modalities"]["video"]["encoder"] == "image" and index["modalities"]["video"]["frames"] == 4
    assert sorted(p.name for p in (tmp_path / "m" / "encoders").iterdir()) == ["audio", "image"]
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.modalities == tiny.modalities
    assert type(loaded.encoders["audio"]).__name__ == "WhisperEncoder"
    assert loaded.encoder_for("video") is loaded.encoders["image"]
    assert torch.equal(_logits(tiny, tokenizer, world), _logits(loaded, tokenizer, world))


def test_model_dir_of_the_first_format_still_loads(tokenizer, world, tmp_path: Path) -> None:
    model = build_tiny(tokenizer, SIZES, modalities=("image",)).eval()
    save_model(model, tokenizer, tmp_path / "old")
    index_path = tmp_path / "old" / "mmcl_model.json"
    index = json.loads(index_path.read_text())
    del index["encoders"]  # as written before audio/video: no class map, the ten original spec fields
    first = ("placeholder", "num_tokens", "projector", "feature_layer", "select", "pool", "image_size", "mean", "std",
             "cue")
    index["modalities"] = {"image": {k: index["modalities"]["image"][k] for k in first}}
    index_path.write_text(json.dumps(index))
    loaded, _ = load_model(tmp_path / "old")
    assert loaded.modalities == model.modalities
    rec = _mixed_records(world)[0]
    processor = composition_processor(model, tokenizer)
    batch = Collator(processor, MediaLoader(processor))(encode_records([rec], processor, "m"))
    with torch.no_grad():
        assert torch.equal(model(batch.input_ids, **model.media_inputs(batch.media, batch.input_ids)).logits,
                           loaded.eval()(batch.input_ids, **loaded.media_inputs(batch.media, batch.input_ids)).logits)


def test_an_unknown_encoder_class_is_refused(tiny, tokenizer, tmp_path: Path) -> None:
    save_model(tiny, tokenizer, tmp_path / "m")
    index_path = tmp_path / "m" / "mmcl_model.json"
    for bad in ("Popen", "os.system", "__import__", "AutoTokenizer"):
        index = json.loads(index_path.read_text())
        index["encoders"]["audio"] = bad
        index_path.write_text(json.dumps(index))
        with pytest.raises(ValueError, match=rf"unknown encoder class '{bad}': it must be a transformers model class"):
            load_model(tmp_path / "m")


# -- assembling a model from separately saved Hugging Face parts -------------------------------------------------


def _hf_parts(tokenizer, root: Path) -> dict[str, Path]:
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        WhisperConfig,
        WhisperModel,
    )

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer) - 3, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=256))
    lm.save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(root / "clip")
    # a whole Whisper (encoder and decoder), as a converted Whisper-tiny checkpoint is; only its encoder is used
    whisper = WhisperModel(WhisperConfig(num_mel_bins=80, d_model=16, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                         decoder_ffn_dim=32, max_source_positions=50, vocab_size=64,
                                         pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2))
    whisper.save_pretrained(root / "whisper")
    return {"lm": root / "lm", "clip": root / "clip", "whisper": root / "whisper"}


P4_SPECS = {
    "image": ModalitySpec("<image>", 16, projector="linear", cue=P4_CUES["image"]),
    "audio": ModalitySpec("<audio>", 10, projector="linear", select="full", pool=5, seconds=1, cue=P4_CUES["audio"]),
    "video": ModalitySpec("<video>", 16, projector="linear", pool=4, encoder="image", frames=4, cue=P4_CUES["video"]),
}


def test_assemble_model_from_separately_saved_towers(tokenizer, world, tmp_path: Path) -> None:
    from transformers import CLIPVisionModel, WhisperModel

    parts = _hf_parts(tokenizer, tmp_path)
    model, tok = assemble_model(parts["lm"], {"image": parts["clip"], "audio": parts["whisper"]}, P4_SPECS)
    assert type(model.encoders["audio"]).__name__ == "WhisperEncoder"
    whisper_enc = WhisperModel.from_pretrained(parts["whisper"]).get_encoder().state_dict()
    assert all(torch.equal(v, whisper_enc[k]) for k, v in model.encoders["audio"].state_dict().items())
    clip = CLIPVisionModel.from_pretrained(parts["clip"]).state_dict()
    assert all(torch.equal(v, clip[k]) for k, v in model.encoders["image"].state_dict().items())
    assert model.encoder_for("video") is model.encoders["image"]
    assert model.language_model.get_input_embeddings().num_embeddings == len(tok)

    processor = composition_processor(model, tok)
    conv = [{"from": "human", "value": "<audio>\nHow many beeps are there?"}, {"from": "gpt", "value": "2"}]
    ids, labels = processor.encode(conv)
    assert ids.count(model.token_ids["audio"]) == 1  # one placeholder in the text; the collator expands it
    wav = tmp_path / "beeps.wav"
    soundfile.write(wav, _sine(1000.0, 1.0, 16000), 16000)
    cue = tok(" audio: ", add_special_tokens=False)["input_ids"]
    assert processor.load_media("audio", wav).tokens == cue + [model.token_ids["audio"]] * 10
    batch = Collator(processor, MediaLoader(processor))([Example("a", ids, labels, {"audio": wav}, "t")])
    ids = batch.input_ids[0].tolist()
    start = ids.index(model.token_ids["audio"])
    assert ids[start - len(cue) : start + 10] == cue + [model.token_ids["audio"]] * 10

    a = _logits(model, tok, world)
    assert a.shape[0] == 4 and torch.isfinite(a).all()
    save_model(model, tok, tmp_path / "assembled")
    loaded, tok2 = load_model(tmp_path / "assembled")
    assert torch.equal(a, _logits(loaded, tok2, world))


def test_assemble_model_checks_num_tokens_and_refuses_dual_encoders(tokenizer, tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    parts = _hf_parts(tokenizer, tmp_path)
    wrong = dict(P4_SPECS, audio=ModalitySpec("<audio>", 12, select="full", pool=5, seconds=1))
    with pytest.raises(ValueError, match=r"audio: the spec says num_tokens=12 but the encoder, selection and pooling "
                                         r"give 10 features per item; set num_tokens=10"):
        assemble_model(parts["lm"], {"image": parts["clip"], "audio": parts["whisper"]}, wrong)
    thirty = dict(P4_SPECS, audio=ModalitySpec("<audio>", 10, select="full", pool=5, seconds=30))
    with pytest.raises(ValueError, match=r"audio: the WhisperEncoder encoder does not accept the spec's input "
                                         r"\(1, 80, 3000\)"):
        assemble_model(parts["lm"], {"image": parts["clip"], "audio": parts["whisper"]}, thirty)
    CLIPModel(CLIPConfig(text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "vocab_size": 64},
                         vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                         projection_dim=8)).save_pretrained(tmp_path / "dual")
    with pytest.raises(ValueError, match=r"dual encoder \(CLIPModel\); save its vision tower on its own"):
        assemble_model(parts["lm"], {"image": tmp_path / "dual"}, {"image": P4_SPECS["image"]})


# -- the world: audio and video tasks, MICL streams -----------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_world_with_audio_and_video_is_byte_identical_for_a_seed(world: Path, tmp_path: Path) -> None:
    again = _files(write_world(tmp_path / "again", seed=5, sizes=SMALL).parent)
    first = _files(world)
    assert sorted(first) == sorted(again)
    assert [k for k in first if first[k] != again[k]] == []
    wavs = [k for k in first if k.endswith(".wav")]
    clips = [k for k in first if k.endswith(".mov")]
    # audio_cap, audio_qa: 6 + 6 each; align_audio: 8 // 4 + 6 (likewise video)
    assert len(wavs) == len(clips) == 2 * 12 + 2 + 6
    other = _files(write_world(tmp_path / "other", seed=6, sizes=SMALL).parent)
    assert sum(first[k] != other.get(k) for k in wavs) > len(wavs) // 2
    assert sum(first[k] != other.get(k) for k in clips) > len(clips) // 2


def test_audio_files_and_answers(world: Path) -> None:
    for task in ("audio_cap", "audio_qa", "align_audio"):
        for split in ("train", "test"):
            recs = [json.loads(x) for x in (world / "tasks" / task / f"{split}.jsonl").read_text().splitlines()]
            for rec in recs:
                assert list(rec) == ["id", "audio", "conversations", "answers"]
                assert rec["conversations"][0]["value"].startswith("<audio>\n")
                wave, rate = soundfile.read(world / "tasks" / task / rec["audio"])
                assert rate == 16000 and wave.shape == (16000,)
                if task == "audio_qa" and rec["conversations"][0]["value"].startswith("<audio>\nHow many"):
                    assert rec["conversations"][1]["value"] == str(_count_beeps(wave))


def _count_beeps(wave: np.ndarray) -> int:
    """Beeps by hand: runs of 10 ms windows whose RMS is far above the noise floor."""
    rms = np.sqrt((wave[: len(wave) // 160 * 160].reshape(-1, 160) ** 2).mean(1))
    loud = rms > 0.05
    return int(loud[0] + np.sum(loud[1:] & ~loud[:-1]))


@pytest.mark.parametrize("count", [1, 2, 3])
def test_beep_counts_are_audible(count: int) -> None:
    rng = random.Random(count)
    for pitch in ("low", "medium", "high"):
        for timbre in ("sine", "square", "sawtooth"):
            assert _count_beeps(beeps(rng, pitch, count, timbre)) == count


def _shape_pixels(frame: np.ndarray) -> np.ndarray:
    bg = np.array(BACKGROUNDS)
    return ~(frame[:, :, None, :] == bg[None, None]).all(-1).any(-1)


def test_video_answers_match_the_frames(world: Path) -> None:
    import av

    checked = {"move": 0, "size": 0, "colour": 0}
    for split in ("train", "test"):
        for line in (world / "tasks" / "video_qa" / f"{split}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            question, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
            with av.open(str(world / "tasks" / "video_qa" / rec["video"])) as c:
                frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
            assert 4 <= len(frames) <= 8 and frames[0].shape == (32, 32, 3)
            first, last = _shape_pixels(frames[0]), _shape_pixels(frames[-1])
            if "Which way" in question:
                (y0, x0), (y1, x1) = (np.argwhere(m).mean(0) for m in (first, last))
                moved = {"right": x1 - x0, "left": x0 - x1, "down": y1 - y0, "up": y0 - y1}
                assert max(moved, key=moved.get) == answer and moved[answer] > 8
                checked["move"] += 1
            elif "grow or shrink" in question:
                assert ("grow" if last.sum() > first.sum() else "shrink") == answer
                checked["size"] += 1
            else:
                pixels = frames[-1][last]
                colour = min(COLOURS, key=lambda c: np.abs(pixels.astype(int) - COLOURS[c]).sum())
                assert colour == answer
                checked["colour"] += 1
    assert all(checked.values()), checked


def test_micl_streams_in_both_p4_orders(world: Path) -> None:
    meta = json.loads((world / "world.json").read_text())
    assert meta["streams"] == {"image": "streams/image.yaml", "micl1": "streams/micl1.yaml",
                               "micl2": "streams/micl2.yaml", "p1": "streams/p1.yaml"}
    assert meta["pretrain"]["align"] == ["tasks/align", "tasks/align_audio", "tasks/align_video"]
    modality = {"audio_cap": "audio", "audio_qa": "audio", "image_cap": "image", "image_qa": "image",
                "video_cap": "video", "video_qa": "video"}
    for name, order in (("micl1", MICL1), ("micl2", MICL2)):
        stream = load_stream(world / meta["streams"][name])
        assert stream.name == name
        assert [t.name for t in stream.tasks] == order
        assert [t.name for t in stream.retention] == RETENTION
        assert [t.modality for t in stream.tasks] == [modality[t] for t in order]
        assert [t.type for t in stream.tasks] == ["caption" if t.endswith("cap") else "qa" for t in order]
        assert [t.scorer for t in stream.tasks] == ["cider" if t.endswith("cap") else "exact_match" for t in order]
        for task in stream.tasks:
            good, bad = read_records(task, "test")
            assert bad == [] and len(good) == SMALL.test
    # order 2 re-ordered by data.order gives order 1
    reordered = load_stream(world / "streams" / "micl2.yaml", order=MICL1)
    assert [t.name for t in reordered.tasks] == MICL1
    stream = yaml.safe_load((world / "streams" / "micl1.yaml").read_text())
    assert "order 1" in stream["description"]


# -- pre-training and a continual run over modalities ---------------------------------------------------------------


def test_pretrained_micro_model_reads_every_modality(micro_model: Path) -> None:
    index = json.loads((micro_model / "mmcl_model.json").read_text())
    assert sorted(index["modalities"]) == ["audio", "image", "video"]
    assert index["encoders"] == {"image": "CLIPVisionModel", "audio": "WhisperEncoder"}
    assert {"align", "align_audio", "align_video"} <= set(index["pretrain"]["scores"])


@pytest.mark.integration
def test_a_micl_stream_runs_end_to_end(micro_overrides, micro_world: Path, tmp_path: Path) -> None:
    from mmcl.cli import main

    stream = tmp_path / "micl-mini.yaml"
    stream.write_text(yaml.safe_dump({
        "name": "micl-mini",
        "tasks": [str(micro_world / "tasks" / t) for t in ("audio_qa", "video_qa", "image_qa")],
        "retention": [str(micro_world / "tasks" / "lang_arith")],
    }))
    overrides = micro_overrides("micl", tasks=7, **{"data.stream": str(stream)})
    assert main(["run", *overrides, "--no-progress"]) == 0
    run_dir = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")))
    matrix = json.loads((run_dir / "matrix.json").read_text())
    assert matrix["tasks"] == ["audio_qa", "video_qa", "image_qa"]
    assert [r["after"] for r in matrix["rows"]] == [None, "audio_qa", "video_qa", "image_qa"]
    for row in matrix["rows"]:
        assert set(row["scores"]) == {"audio_qa", "video_qa", "image_qa", "lang_arith"}


@pytest.mark.integration
def test_a_p4_adapter_model_pretrains_and_runs_moincl(micro_world: Path, micro_overrides, tmp_path: Path) -> None:
    """`mmcl pretrain --adapter p4` builds a model whose every modality reads P4's adapter, aligns it (the adapter
    learns), and MoInCL runs on it across a modality change."""
    from mmcl.config import TrainConfig
    from mmcl.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(vocab_size=400, vision_steps=20,
                         sizes=TinySizes(hidden=32, layers=1, heads=2, intermediate=64, vision_hidden=32,
                                         vision_layers=1, audio_hidden=32, audio_layers=1, adapter="p4"),
                         language=TrainConfig(epochs=1, batch_size=16, lr=3e-3),
                         align=TrainConfig(epochs=1, batch_size=16, lr=3e-3))
    path = pretrain(micro_world, tmp_path / "p4-model", cfg, progress=False, log=lambda *a: None)
    index = json.loads((path / "mmcl_model.json").read_text())
    assert {m: s["projector"] for m, s in index["modalities"].items()} == {"image": "p4", "audio": "p4", "video": "p4"}
    model, tok = load_model(path)
    fresh = build_tiny(tok, cfg.sizes, seed=cfg.seed)  # the same initialisation pretrain started from
    assert torch.equal(fresh.projectors["image"].norm.weight, torch.ones(32))
    for m in ("audio", "video"):  # alignment trained the conv pooling
        assert not torch.equal(model.projectors[m].conv_pool.weight, fresh.projectors[m].conv_pool.weight), m
    stream = tmp_path / "two.yaml"
    stream.write_text(yaml.safe_dump({"name": "two", "tasks": [str(micro_world / "tasks" / t) for t in
                                                               ("video_cap", "video_qa")],
                                      "retention": [str(micro_world / "tasks" / "lang_arith")]}))
    overrides = micro_overrides("p4-moincl", tasks=7, **{"data.stream": str(stream), "model.path": str(path),
                                                         "strategies": "[moincl]", "train.max_steps": 2,
                                                         "data.test_limit": 2, "eval.max_new_tokens": 3})
    run_dir = loop.run(load_config(None, overrides), progress=False, log=lambda *a: None)
    rows = json.loads((run_dir / "matrix.json").read_text())["rows"]
    assert [r["after"] for r in rows] == [None, "video_cap", "video_qa"]
