"""Adapters that turn public datasets, as published and already on local disk, into mmcl tasks. Nothing is downloaded.

    convert("flickr30k", Path("/data/flickr30k"), Path("tasks"))  # -> [tasks/flickr30k]
    write_stream(Path("streams/micl1.yaml"), "micl1", [...task dirs...])

Each task is written to OUT/<name>/ (task.yaml + <split>.jsonl, LLaVA conversations); its `data_root` is the dataset's
own media folder (absolute), so media stay where they are. Records whose media file is missing are still written and
counted on stderr; `mmcl data validate` lists them. The layouts each adapter reads are in docs/datasets.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from mmcl.data.streams import load_stream

from . import audiocaps, clotho_aqa, flickr30k, msrvtt, msvd_qa, okvqa
from ._common import Source, SourceError, check_limit, write_task

_MODULES = (flickr30k, okvqa, audiocaps, clotho_aqa, msrvtt, msvd_qa)
SOURCES: dict[str, Source] = {m.SOURCE.name: m.SOURCE for m in _MODULES}
ALIASES = {"ok_vqa": "okvqa", "clothoaqa": "clotho_aqa", "msr_vtt": "msrvtt", "msvdqa": "msvd_qa",
           "flickr": "flickr30k"}

__all__ = ["SOURCES", "Source", "SourceError", "convert", "get_source", "list_sources", "write_stream"]


def list_sources() -> list[str]:
    """Names `convert` accepts: flickr30k, okvqa, audiocaps, clotho_aqa, msrvtt, msvd_qa."""
    return list(SOURCES)


def get_source(name: str) -> Source:
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in SOURCES:
        raise SourceError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)}")
    return SOURCES[key]


def convert(name: str, src: Path, out: Path, *, splits: Sequence[str] | None = None,
            limit: int | None = None) -> list[Path]:
    """Convert dataset `name` read from `src` (its published layout) into OUT/<name>/; return the task dirs written.

    `splits`: mmcl split names to write (default: every split whose source files are present; each skipped split is
    noted on stderr). An explicitly requested split whose file is missing is an error. `limit`: at most this many
    records per split, in source order (references of one item are grouped first, so a limit never splits them).
    """
    source = get_source(name)
    src, out = Path(src), Path(out)
    check_limit(limit)
    if not src.is_dir():
        raise source.error(f"{src} not found or not a directory")
    if isinstance(splits, str):
        splits = [splits]
    if splits is not None:
        splits = list(dict.fromkeys(splits))
        unknown = [s for s in splits if s not in source.splits]
        if unknown or not splits:
            raise SourceError(f"{source.name}: unknown split(s) {', '.join(unknown) or '(none given)'}; "
                              f"it has {', '.join(source.splits)}")
    converted = source.read(source, src, splits)
    if limit is not None:
        converted.splits = {s: items[:limit] for s, items in converted.splits.items()}
    return [write_task(source, converted, out)]


def write_stream(out: Path, name: str, task_dirs: Iterable[Path], retention: Iterable[Path] = ()) -> Path:
    """Write a stream file (train tasks in order, then evaluate-only retention tasks) and return its path.

    `out` is the stream file (*.yaml / *.yml) or a directory, in which case OUT/<name>.yaml is written. Task paths are
    stored relative to the stream file, and the stream is loaded back (every task manifest, unique names) before it
    replaces any existing file.
    """
    out = Path(out)
    path = out if out.suffix in (".yaml", ".yml") else out / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tasks, keep = [Path(t) for t in task_dirs], [Path(t) for t in retention]
    if not tasks:
        raise ValueError("write_stream needs at least one train task directory")

    def rel(t: Path) -> str:
        return Path(os.path.relpath(t.resolve(), path.parent.resolve())).as_posix()

    data = {"name": str(name), "tasks": [rel(t) for t in tasks]}
    if keep:
        data["retention"] = [rel(t) for t in keep]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, width=119), encoding="utf-8")
    try:
        load_stream(tmp)
    except Exception:
        tmp.unlink()
        raise
    os.replace(tmp, path)
    return path
