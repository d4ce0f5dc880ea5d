"""AudioCaps audio captioning from the official CSVs; the captions of one clip are grouped as its references."""

from __future__ import annotations

from pathlib import Path

from ._common import Converted, Item, Source, read_csv

LAYOUT = """\
SRC/
├── train.csv          # audiocap_id,youtube_id,start_time,caption   (also accepted under SRC/dataset/)
├── val.csv
├── test.csv
└── audio/
    ├── train/{youtube_id}.wav   # or {audiocap_id}.wav
    ├── val/...
    └── test/...
"""
PROMPT = "Describe the audio briefly."
COLUMNS = ("audiocap_id", "youtube_id", "start_time", "caption")


def _csv_dir(src: Path) -> Path:
    return src / "dataset" if not (src / "train.csv").is_file() and (src / "dataset").is_dir() else src


def read(source: Source, src: Path, requested: list[str] | None) -> Converted:
    csvs = _csv_dir(src)
    chosen, notes = source.pick_splits(requested, {s: [csvs / f"{s}.csv"] for s in source.splits})
    audio = source.require(src / "audio", "folder")
    out: dict[str, list[Item]] = {}
    for split in chosen:
        rows = read_csv(source, csvs / f"{split}.csv", COLUMNS)
        folder = source.require(audio / split, "folder")
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in rows:  # one clip = (youtube_id, start_time); val/test clips carry five captions
            groups.setdefault((row["youtube_id"], row["start_time"]), []).append(row)
        items = []
        for (ytid, start), group in groups.items():
            captions = [r["caption"] for r in group if r["caption"]]
            if not captions:
                continue
            names = [f"{ytid}.wav"] + [f"{r['audiocap_id']}.wav" for r in group]
            name = next((n for n in names if (folder / n).is_file()), names[0])
            items.append(Item(f"{ytid}_{start}", f"{split}/{name}", PROMPT, captions[0], captions))
        out[split] = items
    return Converted(audio, out, notes)


SOURCE = Source(
    name="audiocaps", modality="audio", type="caption", scorer="cider", splits=("train", "val", "test"),
    layout=LAYOUT, read=read,
    description="AudioCaps audio captioning; references are every caption of a clip (youtube_id, start_time).",
)
