"""Reliability of checkpoint files (docs/reliability.md, promises 3, 4, 5): a failed save leaves nothing half-written,
a damaged checkpoint is refused naming the file and the reason, and nothing in a checkpoint can run code."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from support import QUIET, assert_no_partial_checkpoints, fast_engine, latest, overrides_for

from mmcl.config import load_config
from mmcl.engine import checkpoint as ck
from mmcl.engine import loop


def save(root: Path, name: str, order: int, value: float = 1.0) -> Path:
    tensors = {"model": {"w": torch.full((64, 64), value), "b": torch.arange(5.0)}, "strategies": {"s": torch.ones(3)}}
    return ck.save_checkpoint(root, name, tensors, {"order": order, "rows": [], "note": name})


def half_then_fail(exc: BaseException):
    """A stand-in for safetensors' save_file that writes half of the real file and then fails."""
    real = ck.save_file

    def writer(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise exc

    return writer


class _Payload:
    """Unpickling this object creates a marker file: a stand-in for code a malicious pickle would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- 3. a save that fails half-way ------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
def test_a_save_that_fails_half_way_leaves_no_partial_checkpoint(tmp_path, monkeypatch, exc):
    root = tmp_path / "checkpoints"
    good = save(root, "task-01", 1)
    monkeypatch.setattr(ck, "save_file", half_then_fail(exc))
    with pytest.raises(type(exc)):
        save(root, "task-02", 2, value=2.0)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "task-01"]  # no task-02, no temporary files
    assert (root / "latest").read_text().strip() == "task-01"
    assert ck.latest_valid(root, warn=pytest.fail)[0] == good
    tensors, state = ck.load_checkpoint(good)
    assert torch.equal(tensors["model"]["w"], torch.full((64, 64), 1.0)) and state["note"] == "task-01"


def test_a_save_failing_on_its_second_file_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    save(root, "task-01", 1)
    real = ck.save_file
    calls = []

    def second_fails(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            half_then_fail(OSError("I/O error"))(tensors, path, metadata)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", second_fails)
    with pytest.raises(OSError, match="I/O error"):
        save(root, "task-02", 2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "task-01"]


def test_a_run_whose_checkpoint_save_fails_resumes_from_the_previous_one(micro_overrides, monkeypatch):
    fast_engine(monkeypatch)
    real = ck.save_file
    failing = half_then_fail(OSError(28, "No space left on device"))
    monkeypatch.setattr(ck, "save_file", lambda t, p, metadata=None: (failing if "task-02" in p else real)(
        t, p, metadata=metadata))
    cfg = load_config(None, overrides_for(micro_overrides, "full-disk", "ewc"))
    with pytest.raises(OSError, match="No space left"):
        loop.run(cfg, **QUIET)
    assert_no_partial_checkpoints(cfg.run_dir)
    assert ck.latest_valid(cfg.run_dir / "checkpoints", warn=pytest.fail)[0].name == "task-01-color_qa"


# -- 4. corrupt checkpoints are detected and skipped with a warning ---------------------------------------------------


def _truncate(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _flip_a_byte(d: Path) -> None:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0xFF
    f.write_bytes(bytes(data))


def _break_header(d: Path) -> None:
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"####"  # the JSON header right after its 8-byte length
    f.write_bytes(bytes(data))


def _remove_file(d: Path) -> None:
    (d / "strategies.safetensors").unlink()


def _corrupt_state(d: Path) -> None:
    (d / "state.json").write_text('{"format": "mmcl-checkpoint", "files": {')


def _remove_state(d: Path) -> None:
    (d / "state.json").unlink()


CORRUPTIONS = {
    "truncated": (_truncate, r"model\.safetensors: \d+ bytes but \d+ were written; the file is truncated or altered"),
    "altered": (_flip_a_byte, r"model\.safetensors: SHA-256 mismatch; the file was altered or corrupted"),
    "header": (_break_header, r"model\.safetensors: SHA-256 mismatch"),
    "file-missing": (_remove_file, r"strategies\.safetensors: missing; the checkpoint is incomplete"),
    "state-corrupt": (_corrupt_state, r"state\.json: corrupt JSON"),
    "state-missing": (_remove_state, r"state\.json: missing; the checkpoint is incomplete"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_checkpoint_is_refused_naming_the_file_and_auto_resume_falls_back(tmp_path, kind):
    root = tmp_path / "checkpoints"
    good = save(root, "task-01", 1)
    bad = save(root, "task-02", 2, value=2.0)
    damage, reason = CORRUPTIONS[kind]
    damage(bad)
    with pytest.raises(ck.CheckpointError, match=rf"{bad}/{reason}"):
        ck.load_checkpoint(bad)
    warnings: list[str] = []
    path, state = ck.latest_valid(root, warn=warnings.append)
    assert path == good and state["note"] == "task-01"
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipping checkpoint task-02: ")
    assert warnings[0].endswith("falling back to the previous one")
    assert ck.load_checkpoint(good)[1]["note"] == "task-01"


def test_no_valid_checkpoint_at_all_gives_none_and_every_warning(tmp_path):
    root = tmp_path / "checkpoints"
    _truncate(save(root, "task-01", 1))
    warnings: list[str] = []
    assert ck.latest_valid(root, warn=warnings.append) is None
    assert len(warnings) == 1 and "task-01" in warnings[0]
    assert ck.latest_valid(tmp_path / "nowhere", warn=pytest.fail) is None


# -- 5. nothing in a checkpoint can run code --------------------------------------------------------------------------

ALLOWED_SUFFIXES = {".safetensors", ".json", ".jsonl", ".yaml", ".md", ".html", ".png", ""}


def test_a_run_directory_holds_no_pickle_and_a_dropped_pickle_is_never_loaded(micro_overrides, monkeypatch,
                                                                               tmp_path):
    """A run with strategy tensors and a mid-task checkpoint (optimizer, scheduler, RNG) writes only safetensors,
    JSON/YAML and the report; pickles dropped into its checkpoint are never unpickled on --resume."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *a, **k: 0)  # the report is kept: it is part of the scan
    cfg = load_config(None, overrides_for(micro_overrides, "nopickle", "ewc", **{"checkpoint.every_steps": 1}))
    real = loop.evaluate_row
    monkeypatch.setattr(loop, "evaluate_row", lambda ctx, r, p: (_ for _ in ()).throw(KeyboardInterrupt())
                        if r == 2 else real(ctx, r, p))
    mid = []
    real_save = ck.save_checkpoint
    monkeypatch.setattr(loop.ck, "save_checkpoint", lambda *a, **k: mid.append(a[1]) or real_save(*a, **k))
    with pytest.raises(KeyboardInterrupt):
        loop.run(cfg, **QUIET)
    assert any("-step-" in n for n in mid)
    monkeypatch.setattr(loop, "evaluate_row", real)

    marker = tmp_path / "pwned"
    for name in ("evil.pt", "optimizer.bin", "model.ckpt"):
        torch.save({"payload": _Payload(marker)}, latest(cfg.run_dir) / name)
    loop.run(cfg, resume=True, **QUIET)
    assert not marker.exists()

    for f in (p for p in cfg.run_dir.rglob("*") if p.is_file()):
        if f.name in ("evil.pt", "optimizer.bin", "model.ckpt"):
            continue
        assert f.suffix in ALLOWED_SUFFIXES, f
        assert not ck.is_pickle(f), f
        assert not f.read_bytes()[:2].startswith(b"\x80"), f  # no pickle of any protocol >= 2
    assert (cfg.run_dir / "report.md").exists()


def _list_in_state(d: Path, name: str, replace: str | None = None) -> None:
    """Edit state.json so that it names `name` (optionally in place of `replace`) with its true size and hash, as
    someone crafting a malicious checkpoint would."""
    state = json.loads((d / "state.json").read_text())
    f = d / name
    entry = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    if replace:
        del state["files"][replace]
    state["files"][name] = entry
    (d / "state.json").write_text(json.dumps(state))


def test_a_pickle_named_by_a_crafted_state_json_is_refused_and_never_unpickled(tmp_path):
    root = tmp_path / "checkpoints"
    d = save(root, "task-01", 1)
    marker = tmp_path / "pwned"
    torch.save({"payload": _Payload(marker)}, d / "optimizer.pt")
    _list_in_state(d, "optimizer.pt")
    with pytest.raises(ck.CheckpointError, match=rf"{d}/optimizer\.pt: not a \.safetensors file; mmcl checkpoints "
                                                 r"hold only safetensors and JSON, and a pickle is never loaded"):
        ck.load_checkpoint(d)

    # a pickle disguised under the safetensors name, with a matching hash: refused by the safetensors parser
    (d / "optimizer.pt").unlink()
    (d / "model.safetensors").write_bytes(pickle.dumps({"payload": _Payload(marker)}, protocol=4))
    _list_in_state(d, "model.safetensors", replace="optimizer.pt")
    with pytest.raises(ck.CheckpointError, match=rf"{d}/model\.safetensors: not a valid safetensors file"):
        ck.load_checkpoint(d)

    # a manifest entry that points outside the checkpoint directory
    state = json.loads((d / "state.json").read_text())
    state["files"] = {"../../outside.safetensors": {"bytes": 1, "sha256": "0"}}
    (d / "state.json").write_text(json.dumps(state))
    with pytest.raises(ck.CheckpointError, match=r"outside\.safetensors: not a file name inside the checkpoint"):
        ck.load_checkpoint(d)
    assert not marker.exists()
    assert not os.path.exists(tmp_path / "outside.safetensors")
