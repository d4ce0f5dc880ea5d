"""`mmcl similarity STREAM`: P3's task-similarity matrix of a stream's train tasks, with the run's model (its
encoders for the media embedding) and a text encoder; printed, and written as JSON and a heatmap."""

from __future__ import annotations

import json
from pathlib import Path

from mmcl.config import RunConfig
from mmcl.engine.setup import build_context
from mmcl.report.plots import plot_similarity
from mmcl.report.tables import Table, fmt
from mmcl.strategies.similarity import SIMILARITY_FILE, TaskEncoder, TaskEncoderOptions, write_similarity


def stream_similarity(cfg: RunConfig, out: Path, options: TaskEncoderOptions | None = None, log=print) -> Table:
    """Embed every train task of the configured stream, write `out`/task_similarity.json and similarity.png, and
    return the matrix as a table."""
    ctx, _, _ = build_context(cfg, log=log)
    encoder = TaskEncoder(options)
    log(f"embedding {len(ctx.stream.tasks)} tasks (text: {encoder.text_source})")
    embeddings = {i: encoder.embed_task(ctx, t.name) for i, t in enumerate(ctx.stream.tasks)}
    names = {i: t.name for i, t in enumerate(ctx.stream.tasks)}
    out.mkdir(parents=True, exist_ok=True)
    write_similarity(out, names, embeddings, encoder.text_source)
    data = json.loads((out / SIMILARITY_FILE).read_text())
    plot_similarity(data["tasks"], data["matrix"], out / "similarity.png")
    return Table(["task", *data["tasks"]], [[a, *(fmt(v, 3) for v in row)]
                                            for a, row in zip(data["tasks"], data["matrix"])])
