"""Tests of the world's optional spoken words (`mmcl data synth --speech`, espeak-ng): the clips really hold the word
their record names, in the captioned order beside the right number of beeps; the bytes are stable for a seed; a world
without speech is unchanged; a missing espeak-ng is a clear error. The espeak-ng tests skip where it is absent."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mmcl.cli import main
from mmcl.data.synth import WorldSizes, write_world
from mmcl.data.synth.audio_tasks import SPOKEN_WORDS, WORD_QUESTION
from mmcl.data.synth.sounds import COUNT_WORDS, beeps
from mmcl.data.synth.speech import SpeechUnavailable, espeak_version, resample, word_bank

SMALL = WorldSizes(train=6, test=6, lang_train=6, align=8, image_size=32)
AUDIO = ("audio_cap", "audio_qa", "align_audio")
needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(world: Path, task: str) -> list[dict]:
    return [json.loads(x) for s in ("train", "test")
            for x in (world / "tasks" / task / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]


def _loud(wave: np.ndarray) -> np.ndarray:
    """Which 10 ms windows are far above the noise floor (RMS > 0.05)."""
    return np.sqrt((wave[: len(wave) // 160 * 160].reshape(-1, 160) ** 2).mean(1)) > 0.05


def _runs(loud: np.ndarray) -> int:
    """How many separate loud runs (beeps, or a word) a window mask holds."""
    return int(loud[:1].sum() + np.sum(loud[1:] & ~loud[:-1])) if len(loud) else 0


def _match(clip: np.ndarray, voice: np.ndarray) -> tuple[float, int]:
    """Normalised cross-correlation of `voice` against every position of `clip`: (best score, its start sample).
    1.0 means the clip holds exactly this waveform (at any gain) there."""
    n = len(clip) + len(voice)
    corr = np.fft.irfft(np.fft.rfft(clip, n) * np.conj(np.fft.rfft(voice, n)), n)[: len(clip) - len(voice) + 1]
    energy = np.concatenate([[0.0], np.cumsum(clip**2)])
    local = energy[len(voice):] - energy[: len(clip) - len(voice) + 1]
    score = corr / (np.linalg.norm(voice) * np.sqrt(np.maximum(local, 1e-12)))
    return float(score.max()), int(score.argmax())


@pytest.fixture(scope="module")
def bank() -> dict[str, np.ndarray]:
    return word_bank(SPOKEN_WORDS)


@pytest.fixture(scope="module")
def speech_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    out = tmp_path_factory.mktemp("sw") / "world"
    write_world(out, seed=5, sizes=SMALL, speech=True)
    return out


def test_missing_espeak_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    fix = r"install espeak-ng, e\.g\. apt-get install espeak-ng, or drop --speech"
    with pytest.raises(SpeechUnavailable, match=fix):
        write_world(tmp_path / "w", seed=0, sizes=SMALL, speech=True)
    assert not (tmp_path / "w").exists()
    assert main(["data", "synth", "--out", str(tmp_path / "w"), "--speech", "--no-progress"]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_speech_false_is_the_default_world(tmp_path: Path) -> None:
    default = _files(write_world(tmp_path / "default", seed=5, sizes=SMALL).parent)
    off = _files(write_world(tmp_path / "off", seed=5, sizes=SMALL, speech=False).parent)
    assert len(default) > 100 and sorted(default) == sorted(off)
    assert [k for k in default if default[k] != off[k]] == []
    assert "speech" not in json.loads(default["world.json"])
    texts = b"".join(v for k, v in default.items() if k.endswith(".jsonl")).decode()
    assert "How many beeps" in texts and "a voice says" not in texts and WORD_QUESTION not in texts


@pytest.mark.parametrize("count", [1, 2, 3])
def test_beeps_shrink_to_fit_beside_a_word(count: int) -> None:
    rng = random.Random(count)
    for pitch in ("low", "medium", "high"):
        for timbre in ("sine", "square", "sawtooth"):
            wave = beeps(rng, pitch, count, timbre, seconds=0.55)
            assert wave.shape == (8800,) and _runs(_loud(wave)) == count


def test_resample_keeps_a_tone() -> None:
    src = np.sin(2 * np.pi * 1000 * np.arange(22050) / 22050)
    out = resample(src, 22050, 16000)
    assert out.shape == (16000,)
    assert np.abs(out - np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)).max() < 1e-6
    assert resample(src, 22050, 22050) is not src and np.array_equal(resample(src, 22050, 22050), src)


@needs_espeak
def test_words_are_spoken_trimmed_and_resampled(bank: dict[str, np.ndarray]) -> None:
    assert sorted(bank) == sorted(SPOKEN_WORDS)
    for word, voice in bank.items():
        assert 0.15 < len(voice) / 16000 < 0.45, word
        assert np.abs(voice).max() == pytest.approx(1.0)
        sound = np.flatnonzero(np.abs(voice) > 0.02)  # silence trimmed to a 5 ms margin either side
        assert sound[0] <= 80 and sound[-1] >= len(voice) - 81
        assert _loud(voice).mean() > 0.5  # and most of what is left is speech
    assert _match(np.pad(bank["red"], 800), bank["red"])[0] > 0.999
    assert _match(np.pad(bank["red"], 800), bank["blue"])[0] < 0.8  # the words differ


@needs_espeak
def test_speech_world_json_records_espeak(speech_world: Path) -> None:
    meta = json.loads((speech_world / "world.json").read_text())
    assert meta["speech"]["engine"] == "espeak-ng"
    assert meta["speech"]["version"] == espeak_version() != ""
    assert meta["speech"]["words"] == list(SPOKEN_WORDS)
    for task in AUDIO:
        manifest = (speech_world / "tasks" / task / "task.yaml").read_text()
        assert "spoken word" in manifest


def _word_of(rec: dict) -> str | None:
    """The spoken word a record names (QA answer or caption), or None for beeps alone."""
    question, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
    if WORD_QUESTION in question:
        return answer
    for part in answer.split(", then "):
        if part.startswith(("a voice says ", "a voice saying ")):
            return part.split()[-1]
    return None


@needs_espeak
def test_speech_clips_hold_the_named_word(speech_world: Path, bank: dict[str, np.ndarray]) -> None:
    seen, alone = {task: 0 for task in AUDIO}, 0
    for task in AUDIO:
        for rec in _records(speech_world, task):
            wave, rate = soundfile.read(speech_world / "tasks" / task / rec["audio"])
            assert rate == 16000 and wave.shape == (16000,)
            word = _word_of(rec)
            if word is None:
                if task != "audio_qa":  # a caption without a voice: no word hides in the clip
                    assert max(_match(wave, v)[0] for v in bank.values()) < 0.9
                continue
            seen[task] += 1
            assert word in SPOKEN_WORDS and rec["answers"][0] == rec["conversations"][1]["value"]
            scores = {w: _match(wave, v)[0] for w, v in bank.items()}
            assert max(scores, key=scores.get) == word and scores[word] > 0.95, (rec["id"], scores)
            at = _match(wave, bank[word])[1]
            inside = np.zeros(len(wave), dtype=bool)
            inside[at : at + len(bank[word])] = True
            assert np.sqrt(np.mean(wave[inside] ** 2)) > 0.02  # the clip is loud where the word is (noise: 0.002)
            if task != "audio_qa" and ", then " not in rec["conversations"][1]["value"]:
                alone += 1
                assert np.sqrt(np.mean(wave[~inside] ** 2)) < 0.004  # a word alone: only the noise floor elsewhere
    assert all(seen.values()) and alone > 0, (seen, alone)


@needs_espeak
def test_beep_questions_beside_a_word_count_the_beeps(speech_world: Path, bank: dict[str, np.ndarray]) -> None:
    beside = 0
    for rec in _records(speech_world, "audio_qa"):
        if not rec["conversations"][0]["value"].startswith("<audio>\nHow many"):
            continue
        wave, _ = soundfile.read(speech_world / "tasks" / "audio_qa" / rec["audio"])
        loud = _loud(wave)
        scores = {w: _match(wave, v) for w, v in bank.items()}
        word = max(scores, key=lambda w: scores[w][0])
        if scores[word][0] > 0.95:  # a distractor word: leave its windows out of the count
            beside += 1
            at = scores[word][1]
            loud[at // 160 : -(-(at + len(bank[word])) // 160)] = False
        assert str(_runs(loud)) == rec["conversations"][1]["value"], rec["id"]
    assert beside > 0


@needs_espeak
def test_words_and_beeps_in_the_captioned_order(speech_world: Path, bank: dict[str, np.ndarray]) -> None:
    orders = set()
    for rec in _records(speech_world, "audio_cap"):
        parts = rec["conversations"][1]["value"].split(", then ")
        if len(parts) == 1:
            continue
        word_first = parts[0].startswith("a voice says ")
        word, beep_caption = (parts[0], parts[1]) if word_first else (parts[1], parts[0])
        wave, _ = soundfile.read(speech_world / "tasks" / "audio_cap" / rec["audio"])
        voice = bank[word.split()[-1]]
        at = _match(wave, voice)[1]
        loud = _loud(wave)
        before, after = loud[: at // 160], loud[-(-(at + len(voice)) // 160) :]  # windows clear of the word
        beep_part, quiet_part = (after, before) if word_first else (before, after)
        assert not quiet_part.any(), rec["id"]
        assert _runs(beep_part) == COUNT_WORDS.index(beep_caption.split()[0]), rec["id"]
        orders.add(word_first)
    assert orders == {True, False}


@needs_espeak
def test_speech_world_is_byte_identical_for_a_seed(speech_world: Path, tmp_path: Path) -> None:
    first = _files(speech_world)
    again = _files(write_world(tmp_path / "again", seed=5, sizes=SMALL, speech=True).parent)
    assert sorted(first) == sorted(again)
    assert [k for k in first if first[k] != again[k]] == []
    # Speech touches only the audio tasks and world.json: everything else is the default world's bytes.
    default = _files(write_world(tmp_path / "default", seed=5, sizes=SMALL).parent)
    assert sorted(default) == sorted(first)
    changed = {k.split("/")[1] if k.startswith("tasks/") else k for k in first if first[k] != default[k]}
    assert changed == {*AUDIO, "world.json"}
