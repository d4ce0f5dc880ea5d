"""Stage 0 of `mmcl pretrain` on the built-in world: new alignment images, never a test image of the world."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import plant_test_record

from mmcl.data.records import load_task
from mmcl.data.synth import WorldSizes, write_world
from mmcl.models.mllm import ModalitySpec
from mmcl.pretrain import GeneratedImages, _pixels, leave_out_tests, world_test_pixels


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    write_world(out, seed=2, sizes=WorldSizes(train=4, test=40, lang_train=4, align=8, image_size=32))
    return out


def test_fresh_draws_skip_every_test_image_and_are_reproducible(world: Path) -> None:
    index = json.loads((world / "world.json").read_text())
    forbidden = world_test_pixels(world)
    # every image test record of the world is fingerprinted (the OCR and word images repeat, so fewer are distinct)
    assert 40 < len(forbidden) <= 40 * 10
    spec = ModalitySpec("<image>", num_tokens=16, image_size=32)
    draw = GeneratedImages(world, index, spec, seed=0)
    kept = []
    draw.generate = _recording(draw.generate, kept)
    images, captions = draw(600)
    assert images.shape == (600, 3, 32, 32) and len(captions) == 600
    # the written words come from 12 words at a few positions: fresh draws do hit test images, and none is kept
    assert draw.skipped > 0
    assert sum(_pixels(im) in forbidden for im in kept) == draw.skipped
    again = GeneratedImages(world, index, spec, seed=0)
    assert torch.equal(again(600)[0], images) and again.skipped == draw.skipped
    assert not torch.equal(GeneratedImages(world, index, spec, seed=1)(600)[0], images)


def _recording(generate, kept: list):
    """The generator, also keeping every image it yields (kept or skipped by the caller)."""
    def gen(rng, n, size):
        for sample in generate(rng, n, size):
            kept.append(sample.image)
            yield sample
    return gen


def test_a_cached_base_of_another_world_or_recipe_is_not_current() -> None:
    from mmcl.builtin import is_current_base
    from mmcl.data.synth.world import DATA_VERSION
    from mmcl.pretrain import BASE_RECIPE

    assert is_current_base({"world_data_version": DATA_VERSION, "base_recipe": BASE_RECIPE})
    assert not is_current_base({"world_data_version": DATA_VERSION - 1, "base_recipe": BASE_RECIPE})
    assert not is_current_base({"world_data_version": DATA_VERSION, "base_recipe": BASE_RECIPE - 1})
    # a pretrain.json from before recipes were recorded is recipe 1, and names only the world version
    assert not is_current_base({"world_version": DATA_VERSION})
    assert BASE_RECIPE > 1


def test_an_unknown_stage0_source_is_refused_not_read_as_files() -> None:
    from mmcl.pretrain import PretrainConfig

    assert PretrainConfig(vision_source="files").vision_source == "files"
    with pytest.raises(ValueError, match=r"vision_source must be one of generate, files, got 'gen'"):
        PretrainConfig(vision_source="gen")


def test_a_training_record_equal_to_a_test_record_of_the_world_is_named_for_leaving_out(world: Path,
                                                                                         tmp_path: Path) -> None:
    """What `mmcl pretrain --instruct` (and alignment) must not train on: a train record of the tuned tasks that is
    a test record of any task of the world, compared by normalised prompt and image bytes; the near misses (same
    image with another prompt, same prompt with another image) stay."""
    assert leave_out_tests(world, [load_task(world / "tasks" / "image_cap")], "data", log=lambda *a: None) == []
    planted, test_id, line = plant_test_record(world, tmp_path)
    logs: list[str] = []
    found = leave_out_tests(planted, [load_task(planted / "tasks" / "image_cap")], "instruction data", log=logs.append)
    assert [o["test"] for o in found] == [test_id]
    assert found[0]["train"].endswith(f"image_cap/train.jsonl:{line}")
    assert len(logs) == 1 and "left out 1 training record" in logs[0] and test_id in logs[0]
