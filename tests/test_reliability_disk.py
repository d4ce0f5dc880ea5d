"""A full disk or an unwritable output directory (docs/reliability.md, "Disk full, no permission"): one `error:` line
from the CLI naming the path and the fix, no half-written checkpoint, the previous checkpoint intact, and `--resume`
after the fix ends with the run that never failed. An unwritable output directory fails before the model is built.

The full disk is an injected ENOSPC in the low-level write of a checkpoint (safetensors' `save_file`): half the file
is written, then the error is raised, as the OSError a Python write gives and as the SafetensorError text safetensors'
Rust writer gives for the same errno. The permission case uses chmod, which root ignores: those tests skip as root,
and the output_dir-under-a-file case stands in for them (it fails the same way for every user).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from safetensors import SafetensorError
from support import QUIET, assert_no_partial_checkpoints, assert_same_run, fast_engine, overrides_for

from mmcl.cli import main
from mmcl.config import load_config
from mmcl.engine import checkpoint as ck
from mmcl.engine import loop

pytestmark = pytest.mark.integration

FULL = {
    "oserror": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "safetensors": lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
}


def _chmod_is_ignored() -> bool:
    """True where a directory's mode does not stop this process writing into it (root with CAP_DAC_OVERRIDE)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, stat.S_IRUSR | stat.S_IXUSR)
        try:
            Path(d, "probe").touch()
            return True
        except PermissionError:
            return False
        finally:
            os.chmod(d, stat.S_IRWXU)


CHMOD_IGNORED = _chmod_is_ignored()


def run_dir_of(args: list[str]) -> Path:
    return Path(next(a.split("=", 1)[1] for a in args if a.startswith("output_dir=")))


def one_error_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def finish_like_the_uninterrupted_run(micro_overrides, run_dir: Path, capsys) -> None:
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert_no_partial_checkpoints(run_dir)
    assert_same_run(loop.run(load_config(None, overrides_for(micro_overrides, "whole", "ewc")), **QUIET), run_dir)


@pytest.mark.parametrize("kind", list(FULL))
def test_a_full_disk_during_a_save_is_one_error_line_and_resume_finishes_the_run(micro_overrides, monkeypatch, capsys,
                                                                                 kind):
    fast_engine(monkeypatch)
    args = overrides_for(micro_overrides, "full", "ewc")
    run_dir = run_dir_of(args)
    real = ck.save_file

    def half_then_enospc(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        if f"{os.sep}.tmp-task-02-" in path:  # the second task's checkpoint: the disk fills up half-way
            Path(path).write_bytes(Path(path).read_bytes()[:100])
            raise FULL[kind]()
        return None

    monkeypatch.setattr(ck, "save_file", half_then_enospc)
    assert main(["run", *args, "--no-progress"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert f"cannot write {run_dir / 'checkpoints' / 'task-02-shape_cls'}: No space left on device" in err
    assert "free space on that filesystem" in err and f"mmcl run --resume {run_dir}" in err
    assert_no_partial_checkpoints(run_dir)  # the half-written .tmp-* directory is gone
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "task-01-color_qa"]
    ck.verify_checkpoint(run_dir / "checkpoints" / "task-01-color_qa")

    monkeypatch.setattr(ck, "save_file", real)  # space freed
    finish_like_the_uninterrupted_run(micro_overrides, run_dir, capsys)


def test_the_error_is_an_oserror_with_its_errno_and_a_checkpoint_error(tmp_path, monkeypatch):
    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(ck.StorageError) as info:
        ck.save_checkpoint(tmp_path / "run" / "checkpoints", "task-01", {"model": {}}, {"order": 1})
    assert isinstance(info.value, OSError) and isinstance(info.value, ck.CheckpointError)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "run" / "checkpoints" / "task-01")
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == []


def test_a_result_file_that_cannot_be_written_is_a_storage_error_naming_it(tmp_path):
    (tmp_path / "afile").write_text("")
    target = tmp_path / "afile" / "matrix.json"
    with pytest.raises(ck.StorageError, match=f"cannot write {target}: Not a directory; choose another output_dir, "
                                              f"then continue with `mmcl run --resume {target.parent}`"):
        ck.write_json_atomic(target, {"rows": []})


def test_an_output_dir_that_is_a_file_fails_before_the_model_is_built(micro_overrides, monkeypatch, capsys, tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    args = micro_overrides("x", tasks=1, **{"output_dir": tmp_path / "afile" / "run"})
    monkeypatch.setattr(loop, "build_context", lambda *a, **k: pytest.fail("the model was built"))
    assert main(["run", *args, "--no-progress"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert err == (f"error: cannot write {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a directory; "
                   "choose another output_dir, then run again\n")


@pytest.mark.skipif(CHMOD_IGNORED, reason="this process writes into a directory whatever its mode (root), "
                                    "so chmod cannot make it unwritable; the output_dir-under-a-file test covers the pre-flight check")
def test_an_unwritable_output_dir_fails_before_the_model_is_built(micro_overrides, monkeypatch, capsys, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    args = micro_overrides("x", tasks=1, **{"output_dir": parent / "run"})
    monkeypatch.setattr(loop, "build_context", lambda *a, **k: pytest.fail("the model was built"))
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert main(["run", *args, "--no-progress"]) == 2
    finally:
        parent.chmod(stat.S_IRWXU)
    err = one_error_line(capsys.readouterr().err)
    assert err == f"error: cannot write {parent}: Permission denied; fix the directory's permissions, then run again\n"
    assert list(parent.iterdir()) == []


@pytest.mark.skipif(CHMOD_IGNORED, reason="this process writes into a directory whatever its mode (root), "
                                    "so chmod cannot make it unwritable; the injected ENOSPC test covers a failing save")
def test_a_checkpoint_dir_made_read_only_mid_run_is_one_error_line_and_resume_finishes(micro_overrides, monkeypatch,
                                                                                       capsys):
    fast_engine(monkeypatch)
    args = overrides_for(micro_overrides, "locked", "ewc")
    run_dir = run_dir_of(args)
    ckpts = run_dir / "checkpoints"
    real = loop.evaluate_row

    def lock_at_row_2(ctx, row, progress):
        if row == 2:
            ckpts.chmod(stat.S_IRUSR | stat.S_IXUSR)
        return real(ctx, row, progress)

    monkeypatch.setattr(loop, "evaluate_row", lock_at_row_2)
    try:
        assert main(["run", *args, "--no-progress"]) == 2
    finally:
        ckpts.chmod(stat.S_IRWXU)
    err = one_error_line(capsys.readouterr().err)
    assert "Permission denied; fix the directory's permissions" in err and f"--resume {run_dir}" in err
    ck.verify_checkpoint(ckpts / "task-01-color_qa")
    monkeypatch.setattr(loop, "evaluate_row", real)
    finish_like_the_uninterrupted_run(micro_overrides, run_dir, capsys)
