"""Checkpoints: safetensors + JSON only, written atomically, verified on load.

Layout: `checkpoints/<name>/{model.safetensors, strategies.safetensors, state.json}` plus `checkpoints/latest`
(the name of the newest complete checkpoint). A checkpoint is written into a hidden temporary directory, each file
fsynced, and renamed into place in one step; `state.json` records each file's size and SHA-256, so a truncated or
altered file is detected on load. A failed save removes its temporary directory and leaves `latest` as it was.
A write that fails for want of space or permission (here or in safetensors' writer) becomes a `StorageError` naming
the path, the fix and the `--resume` command; `check_writable` is the run's pre-flight probe of its directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = "mmcl-checkpoint"
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file and the reason."""


class StorageError(CheckpointError, OSError):
    """Writing into the run directory failed (disk full, no permission, read-only filesystem). Also an OSError with
    the original errno, and a CheckpointError so the CLI prints its message as one `error:` line."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno N] ..." form
        return str(self.args[0])


def storage_error(path: Path, e: OSError, then: str) -> StorageError:
    """A StorageError naming `path`, the system's reason, what to fix, and `then` (what to run after fixing)."""
    fix = {errno.ENOSPC: "free space on that filesystem", errno.EDQUOT: "free space (the disk quota is exceeded)",
           errno.EACCES: "fix the directory's permissions", errno.EPERM: "fix the directory's permissions",
           errno.EROFS: "use a writable filesystem", errno.ENOTDIR: "choose another output_dir"}
    err = StorageError(f"cannot write {path}: {e.strerror or e}; {fix.get(e.errno, 'fix the problem')}, then {then}")
    err.errno, err.strerror, err.filename = e.errno, e.strerror, str(path)
    return err


def as_os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: `e` itself, or the one safetensors reports as text (its SafetensorError,
    e.g. "I/O error: No space left on device (os error 28)"); None for anything else."""
    if isinstance(e, StorageError):
        return None
    if isinstance(e, OSError):
        return e
    found = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    return OSError(int(found[2]), found[1]) if found else None


def resume_hint(ckpt_root: Path) -> str:
    return f"continue with `mmcl run --resume {ckpt_root.parent}` (the previous checkpoint is intact)"


def check_writable(run_dir: Path) -> None:
    """Pre-flight: fail in the first second, not after a task's training, when the run directory (or, before it
    exists, its nearest existing parent) can't be written. Probes by creating and removing a hidden file."""
    where = run_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{where} is a file, not a directory")
        fd, probe = tempfile.mkstemp(prefix=".mmcl-write-check-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise storage_error(where, e, "run again") from e


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
        _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise storage_error(path, e, f"continue with `mmcl run --resume {path.parent}`") from e
    finally:
        with contextlib.suppress(OSError):  # nothing to remove, or the directory itself is unusable
            tmp.unlink(missing_ok=True)


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors that share storage (tied embeddings) are cloned so safetensors accepts them."""
    out, seen = {}, set()
    for k, v in state.items():
        v = v.detach()
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
        out[k] = v.to("cpu").clone().contiguous() if ptr in seen or not v.is_contiguous() else v.to("cpu")
        if ptr is not None:
            seen.add(ptr)
    return out


def save_checkpoint(
    ckpt_root: Path,
    name: str,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict,
    keep_last: int = 0,
    protect: set[str] | None = None,
) -> Path:
    """Atomically write checkpoint `name` (one safetensors file per entry of `tensors`, plus state.json)."""
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise storage_error(tmp, e, resume_hint(ckpt_root)) from e
    try:
        files = {}
        for fname, tdict in tensors.items():
            path = tmp / f"{fname}.safetensors"
            save_file(unique_tensors(tdict), str(path), metadata={"format": "pt"})
            _fsync_file(path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        full_state = {"format": FORMAT, "version": 1, "name": name, "files": files, **state}
        (tmp / "state.json").write_text(json.dumps(full_state, indent=2) + "\n")
        _fsync_file(tmp / "state.json")
        _fsync_dir(tmp)
        if final.exists():  # re-running a task after a resume replaces its old checkpoint
            old = ckpt_root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync_dir(ckpt_root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        io = as_os_error(e)
        if io is not None:
            raise storage_error(final, io, resume_hint(ckpt_root)) from e
        raise
    try:
        (ckpt_root / ".latest.tmp").write_text(name + "\n")
        os.replace(ckpt_root / ".latest.tmp", ckpt_root / "latest")
    except OSError as e:  # the new checkpoint is complete; a resume finds it by its recorded order
        with contextlib.suppress(OSError):
            (ckpt_root / ".latest.tmp").unlink(missing_ok=True)
        raise storage_error(ckpt_root / "latest", e, resume_hint(ckpt_root)) from e
    if keep_last:
        prune(ckpt_root, keep_last, protect={name} | (protect or set()))
    return final


def read_state(path: Path) -> dict:
    sfile = path / "state.json"
    if not sfile.exists():
        raise CheckpointError(f"{sfile}: missing; the checkpoint is incomplete")
    try:
        state = json.loads(sfile.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{sfile}: corrupt JSON ({e.msg} at line {e.lineno})") from e
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{sfile}: not an mmcl checkpoint (format {state.get('format')!r})")
    return state


def verify_checkpoint(path: Path) -> dict:
    """Check every file's size and hash against state.json; return the state or raise CheckpointError."""
    state = read_state(path)
    for fname, meta in state["files"].items():
        f = path / fname
        if Path(fname).name != fname or fname in ("", ".", ".."):
            raise CheckpointError(f"{f}: not a file name inside the checkpoint; state.json was altered")
        if not fname.endswith(".safetensors"):
            raise CheckpointError(f"{f}: not a .safetensors file; mmcl checkpoints hold only safetensors and JSON, "
                                  "and a pickle is never loaded")
        if not f.exists():
            raise CheckpointError(f"{f}: missing; the checkpoint is incomplete")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{f}: {size} bytes but {meta['bytes']} were written; the file is truncated or altered")
        if sha256(f) != meta["sha256"]:
            raise CheckpointError(f"{f}: SHA-256 mismatch; the file was altered or corrupted")
    return state


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Verified tensors (per safetensors file) and state of a checkpoint directory."""
    state = verify_checkpoint(path)
    tensors = {}
    for f in state["files"]:
        try:
            tensors[Path(f).stem] = load_file(str(path / f))
        except Exception as e:  # safetensors' own parser refuses anything else (it never unpickles)
            raise CheckpointError(f"{path / f}: not a valid safetensors file ({type(e).__name__}: {e})") from e
    return tensors, state


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete-looking checkpoint directories, newest (by recorded order) first."""
    if not ckpt_root.exists():
        return []
    found = []
    for d in ckpt_root.iterdir():
        if d.is_dir() and not d.name.startswith("."):
            try:
                found.append((read_state(d).get("order", -1), d))
            except CheckpointError:
                found.append((-2, d))
    return [d for _, d in sorted(found, key=lambda x: (x[0], x[1].name), reverse=True)]


def latest_valid(ckpt_root: Path, warn=print) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies; corrupt newer ones are reported through `warn` and skipped. One whose
    state.json is unreadable has no recorded order (it may be the newest), so it is always reported."""
    found = list_checkpoints(ckpt_root)
    unreadable = set()
    for d in found:
        try:
            read_state(d)
        except CheckpointError as e:
            unreadable.add(d)
            warn(f"warning: skipping checkpoint {d.name}: {e}; falling back to the previous one")
    for d in found:
        if d in unreadable:
            continue
        try:
            return d, verify_checkpoint(d)
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint {d.name}: {e}; falling back to the previous one")
    return None


def sweep_stale(ckpt_root: Path) -> list[str]:
    """Remove what a save killed mid-way (SIGKILL, power loss) leaves behind: `.tmp-*` directories and the
    `.latest.tmp` pointer. Only for the one process that writes checkpoints, before it writes any; returns the names
    removed."""
    if not ckpt_root.is_dir():
        return []
    stale = sorted(p for p in ckpt_root.iterdir() if p.name.startswith(".tmp-") or p.name == ".latest.tmp")
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return [p.name for p in stale]


def prune(ckpt_root: Path, keep_last: int, protect: set[str]) -> None:
    """Keep the newest `keep_last` task-boundary checkpoints and the newest mid-task one; never delete one named in
    `protect` or in `latest`."""
    latest = (ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").exists() else None
    keep = set(protect) | ({latest} if latest else set())
    found = list_checkpoints(ckpt_root)
    boundary = [d for d in found if "-step-" not in d.name]
    mid = [d for d in found if "-step-" in d.name]
    for d in boundary[keep_last:] + mid[1:]:
        if d.name not in keep:
            shutil.rmtree(d)


def remove_mid_task(ckpt_root: Path, keep: set[str]) -> None:
    """Delete mid-task checkpoints once their task's boundary checkpoint exists (except protected ones)."""
    for d in list_checkpoints(ckpt_root):
        if "-step-" in d.name and d.name not in keep:
            shutil.rmtree(d)


def is_pickle(path: Path) -> bool:
    """True if a file starts like a pickle or a torch zip archive."""
    with path.open("rb") as f:
        head = f.read(4)
    return any(head.startswith(m) for m in PICKLE_MAGIC)
