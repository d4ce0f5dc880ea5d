"""MSVD-QA video question answering from `{train,val,test}_qa.json`."""

from __future__ import annotations

import re
from pathlib import Path

from ._common import SHORT_ANSWER, Converted, Item, Source, read_json

LAYOUT = """\
SRC/
├── train_qa.json          # [{"question", "answer", "video_id": 1 | "video": "vid1", "id"?}, ...]
├── val_qa.json
├── test_qa.json
├── youtube_mapping.txt    # optional: "<youtube clip name> vid<id>" per line
└── YouTubeClips/          # or video/
    ├── -4wsuPCjDBc_5_15.avi   # the mapped name, or
    └── vid1.avi               # vid{id}.avi without a mapping
"""


def _mapping(src: Path) -> dict[str, str]:
    """vidN -> YouTube clip name, from youtube_mapping.txt (empty if absent)."""
    path = src / "youtube_mapping.txt"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[1]] = parts[0]
    return out


def _vid(entry: dict) -> str:
    """The entry's video as 'vidN' (or the clip name as given)."""
    v = entry["video_id"] if "video_id" in entry else entry["video"]
    v = str(v).strip()
    if re.fullmatch(r"\d+", v):
        return f"vid{int(v)}"
    return v[:-4] if v.endswith(".avi") else v


def read(source: Source, src: Path, requested: list[str] | None) -> Converted:
    files = {s: [src / f"{s}_qa.json"] for s in source.splits}
    chosen, notes = source.pick_splits(requested, files)
    root = next((src / d for d in ("YouTubeClips", "video") if (src / d).is_dir()), None)
    if root is None:
        raise source.error(f"{src / 'YouTubeClips'} not found (nor {src / 'video'})")
    mapping = _mapping(src)
    out: dict[str, list[Item]] = {}
    for split in chosen:
        data = read_json(source, files[split][0])
        if not isinstance(data, list):
            raise source.error(f"{files[split][0]} must hold a list of question entries")
        items = []
        for k, entry in enumerate(data):
            try:
                question, answer, vid = str(entry["question"]).strip(), str(entry["answer"]).strip(), _vid(entry)
            except (KeyError, TypeError) as e:
                raise source.error(f"{files[split][0]}: entry {k} lacks question, answer or video_id/video ({e!r})")
            if not answer:
                continue
            names = [f"{mapping[vid]}.avi"] if vid in mapping else []
            names.append(f"{vid}.avi")
            name = next((n for n in names if (root / n).is_file()), names[0])
            key = str(entry.get("id", k))
            items.append(Item(key, name, f"{question}\n{SHORT_ANSWER}", answer, [answer]))
        out[split] = items
    return Converted(root, out, notes)


SOURCE = Source(
    name="msvd_qa", modality="video", type="qa", scorer="exact_match", splits=("train", "val", "test"),
    layout=LAYOUT, read=read,
    description="MSVD-QA video question answering (one answer per question).",
)
