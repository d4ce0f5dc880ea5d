"""The feature cache: a frozen encoder's features per media item computed once, read back exactly, and missed
whenever the weights, the item or the spec change; never used for an encoder that trains or samples dropout."""

from __future__ import annotations

import json

import pytest
import torch

from mmcl.models.feature_cache import FeatureCache, attach_feature_cache
from mmcl.models.loading import load_backend


@pytest.fixture
def model(micro_model):
    m, _ = load_backend(micro_model)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _images(model, n):
    size = model.modalities["image"].image_size
    return torch.randn(n, 3, size, size)


def _calls(model, modality):
    """Count the items the encoder really runs on."""
    seen = []
    encoder = model.encoder_for(modality)
    handle = encoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen, handle


def test_cached_features_equal_computed_ones_and_the_encoder_runs_once_per_item(model, tmp_path):
    images = _images(model, 3)
    want = model.encoder_features("image", images)
    model.feature_cache = FeatureCache(tmp_path / "cache")
    seen, handle = _calls(model, "image")
    first = model.encoder_features("image", images)
    again = model.encoder_features("image", torch.cat([images[1:], _images(model, 1)]))
    handle.remove()
    assert torch.equal(first, want) and torch.equal(again[:2], want[1:])
    assert seen == [3, 1]  # the second batch ran only its new image
    assert model.feature_cache.hits == 2 and model.feature_cache.misses == 4
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    # a new process (empty memory) reads the files back
    fresh = FeatureCache(tmp_path / "cache")
    model.feature_cache = fresh
    assert torch.equal(model.encoder_features("image", images), want) and fresh.hits == 3


def test_changed_weights_miss_and_a_training_or_dropout_encoder_bypasses(model, tmp_path):
    images = _images(model, 2)
    model.feature_cache = FeatureCache(tmp_path / "cache")
    model.encoder_features("image", images)
    encoder = model.encoder_for("image")
    with torch.no_grad():
        next(encoder.parameters()).add_(0.5)  # in place: the fingerprint must change
    changed = model.encoder_features("image", images)
    assert model.feature_cache.misses == 4
    model.feature_cache = None
    assert torch.equal(changed, model.encoder_features("image", images))

    cache = model.feature_cache = FeatureCache(tmp_path / "other")
    next(encoder.parameters()).requires_grad_(True)
    out = model.encoder_features("image", images)
    assert out.requires_grad and cache.hits + cache.misses == 0 and not (tmp_path / "other").exists()
    next(encoder.parameters()).requires_grad_(False)
    drop = [m for m in encoder.modules() if isinstance(m, torch.nn.Dropout)]
    if drop:
        drop[0].p = 0.1
        encoder.train()
        model.encoder_features("image", images)
        assert cache.hits + cache.misses == 0


def test_video_clips_and_audio_are_cached_per_item(model, tmp_path):
    spec = model.modalities["video"]
    clips = torch.randn(2, spec.frames, 3, spec.image_size, spec.image_size)
    mels = torch.randn(2, model.modalities["audio"].n_mels, 100 * model.modalities["audio"].seconds)
    plain = {"video": model.encoder_features("video", clips), "audio": model.encoder_features("audio", mels)}
    model.feature_cache = FeatureCache(tmp_path / "cache")
    for _ in range(2):
        assert torch.equal(model.encoder_features("video", clips), plain["video"])
        assert torch.equal(model.encoder_features("audio", mels), plain["audio"])
    assert (model.feature_cache.misses, model.feature_cache.hits) == (4, 4)


def test_attach_modes(model, tmp_path):
    assert attach_feature_cache(model, "auto", tmp_path) == []  # the micro towers are below the auto threshold
    assert model.feature_cache is None
    assert sorted(attach_feature_cache(model, "always", tmp_path)) == sorted(model.encoders)
    assert attach_feature_cache(model, "never", tmp_path) == [] and model.feature_cache is None
    with pytest.raises(ValueError, match="composition backend"):
        attach_feature_cache(torch.nn.Linear(1, 1), "always", tmp_path)


@pytest.mark.integration
def test_a_run_with_the_cache_on_has_the_same_losses_and_matrix(micro_overrides, tmp_path, monkeypatch):
    from support import QUIET

    from mmcl.config import load_config
    from mmcl.engine.loop import run

    monkeypatch.setenv("MMCL_HOME", str(tmp_path / "home"))
    base = micro_overrides("plain", tasks=2) + ["model.train=[projectors]", "data.train_limit=16"]
    plain = run(load_config(None, base), **QUIET)
    cached = run(load_config(None, micro_overrides("cached", tasks=2) + ["model.train=[projectors]",
                                                                            "data.train_limit=16",
                                                                            "model.feature_cache=always"]), **QUIET)
    for name in ("losses.json", "matrix.json"):
        a, b = json.loads((plain / name).read_text()), json.loads((cached / name).read_text())
        if name == "matrix.json":
            a, b = a["rows"], b["rows"]
        assert a == b
    assert list((tmp_path / "home" / "features").rglob("*.safetensors"))
