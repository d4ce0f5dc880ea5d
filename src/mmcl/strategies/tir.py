"""TIR, P3's task-similarity-informed regularization, on top of EWC or MAS (`tir_ewc`, `tir_mas`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mmcl.strategies._importance import ImportanceOptions, ImportanceRegularizer
from mmcl.strategies.registry import register_strategy
from mmcl.strategies.similarity import TaskEncoder, TaskEncoderOptions, similarity_to_earlier, write_similarity

if TYPE_CHECKING:
    from mmcl.engine.context import Context



def reweight(omega: dict[str, torch.Tensor], ids: dict[str, torch.Tensor], similarity: dict[int, float]
             ) -> dict[str, torch.Tensor]:
    """P3's rule Ω ← Ω ⊙ (1 − S(new, Id)): every element's importance scaled by one minus the similarity of the new
    task to the task that supplied it (its Id). Pure; an Id without a similarity is an error."""
    if not ids:
        return dict(omega)
    top = max(int(v.max()) for v in ids.values()) if ids else -1
    missing = sorted({int(i) for v in ids.values() for i in v.unique().tolist()} - set(similarity))
    if missing:
        raise ValueError(f"TIR: no similarity for the task(s) {missing} recorded in the Id map")
    lookup = torch.zeros(top + 1, dtype=torch.float64)
    for k, s in similarity.items():
        if k <= top:
            lookup[k] = s
    out = {}
    for name, o in omega.items():
        keep = (1.0 - lookup.to(o.device)[ids[name].long()]).to(o.dtype)
        out[name] = o * keep
    return out


@dataclass
class TIROptions(ImportanceOptions):
    """EWC/MAS options plus how tasks are embedded for their similarity."""

    similarity: TaskEncoderOptions = field(default_factory=TaskEncoderOptions)
    """Task encoder: max_samples (1000), text_encoder ("auto": MiniLM when its wheel is installed, else the
    model's own token embeddings; or a local encoder directory; or "model"), text_pooling, batch_size."""


class _TIR(ImportanceRegularizer):
    """EWC/MAS whose stored importance is scaled, before each new task, by how unlike the new task is to the task
    that made each element important (see `tir_ewc`)."""

    Config = TIROptions

    def __init__(self, config: TIROptions | None = None):
        super().__init__(config)
        self.embeddings: dict[int, dict[str, torch.Tensor]] = {}  # task index -> kind -> (D,)
        self.names: dict[int, str] = {}
        self.log: list[dict] = []  # per task start: the similarity to each earlier task
        self._encoder: TaskEncoder | None = None

    def on_task_start(self, ctx: Context) -> None:
        if self._encoder is None:
            self._encoder = TaskEncoder(self.config.similarity)
        index = ctx.task_index
        self.embeddings[index] = self._encoder.embed_task(ctx, ctx.task.name)
        self.names[index] = ctx.task.name
        if self.omega is not None and self.ids is not None:
            earlier = sorted(i for i in self.embeddings if i < index)
            kinds = [k for k in self.embeddings[index] if all(k in self.embeddings[i] for i in earlier)]
            s = similarity_to_earlier({k: self.embeddings[index][k] for k in kinds},
                                      {k: torch.stack([self.embeddings[i][k] for i in earlier]) for k in kinds})
            sims = {i: float(v) for i, v in zip(earlier, s)}
            self.omega = reweight(self.omega, self.ids, sims)
            self.log.append({"task": ctx.task.name, "similarity": {self.names[i]: round(v, 6) for i, v in sims.items()},
                             "kinds": kinds})
        self._write(ctx)
        super().on_task_start(ctx)

    def _write(self, ctx: Context) -> None:
        if ctx.accelerator.is_main_process and self._encoder is not None:
            write_similarity(ctx.run_dir, self.names, self.embeddings, self._encoder.text_source, reweighting=self.log)

    # -- state: the importance state plus the task embeddings ---------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state_dict()
        tensors |= {f"emb/{i}/{k}": v for i, e in self.embeddings.items() for k, v in e.items()}
        return tensors, meta | {"names": {str(i): n for i, n in self.names.items()}, "log": self.log}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        own = {k: v for k, v in tensors.items() if not k.startswith("emb/")}
        super().load_state_dict(own, meta)
        self.embeddings = {}
        for key, v in tensors.items():
            if key.startswith("emb/"):
                _, i, kind = key.split("/", 2)
                self.embeddings.setdefault(int(i), {})[kind] = v
        self.names = {int(i): n for i, n in meta.get("names", {}).items()}
        self.log = list(meta.get("log", []))


@register_strategy("tir_ewc")
class TIREWC(_TIR):
    """TIR + EWC, P3's task-similarity-informed regularization ("Continual Instruction Tuning for Large Multimodal
    Models", He et al. 2023; `TIREWCLearner` of its code).

    Rule: EWC as `ewc` (Ω_t = mean g², normalised to sum 1, element-wise max merge with the Id map of the task
    that supplied each max; penalty λ_eff·Σ Ω(θ − θ*)²). Before each task t ≥ 2 the stored importance is scaled
    Ω ← Ω ⊙ (1 − S(t, Id)), S(t, k) = Π_kinds sigmoid(standardised cosine) of the task embeddings (media,
    instruction, answer; `mmcl.strategies.similarity`): parameters that mattered for an old task similar to the
    new one are held less. The scaling is kept (cumulative over tasks, as P3's code overwrites its importance).
    Task embeddings are taken at each task's start on its training records (at most `similarity.max_samples`,
    evenly spaced). INFERRED/chosen: media embedding = mean encoder output (P3: vision CLS); text = MiniLM when
    installed, else the model's token embeddings (P3: BERT-base CLS). State: EWC's, plus each task's embeddings.
    Writes task_similarity.json (matrix, per-task similarities used) to the run directory.
    """

    kind = "ewc"


@register_strategy("tir_mas")
class TIRMAS(_TIR):
    """TIR + MAS, P3's task-similarity-informed regularization with MAS importance (`TIRMASLearner` of its code).

    Rule: as `tir_ewc`, with MAS's importance (mean |∂s/∂θ|, s = mean ‖logits‖² over supervised positions).
    """

    kind = "mas"
