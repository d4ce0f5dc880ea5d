"""EProj, P3's expansion baseline: per-task projector experts with learned routing keys, and P3's (inferred)
task-similarity-informed expansion."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from mmcl.data.batching import encode_records
from mmcl.models.experts import ExpertProjector
from mmcl.seeding import task_seed
from mmcl.strategies.base import Strategy
from mmcl.strategies.registry import register_strategy
from mmcl.strategies.similarity import (
    TaskEncoder,
    TaskEncoderOptions,
    evenly_spaced_records,
    similarity_to_earlier,
    write_similarity,
)

if TYPE_CHECKING:
    from mmcl.engine.context import Context

SEED_KEYS = 7
EPROJ_FILE = "eproj.json"
"""Written to the run directory: the slot-to-expert map, the expansion decisions and the routing accuracy."""


@dataclass
class EProjOptions:
    key_steps: int = 200
    """Steps of the key pre-training before each task (P3: 2,000 on real data; the pull loss converges in far fewer
    on the built-in world)."""
    key_lr: float = 1e-2
    """Learning rate of the keys (P3: 1e-2, Adam)."""
    key_batch_size: int = 32
    key_samples: int = 1000
    """Training samples per task whose queries the keys are pulled towards (evenly spaced)."""
    expand: Literal["always", "similarity"] = "always"
    """always: a new expert per task (P3's EProj). similarity: INFERRED rule for P3's similarity-informed
    expansion — when the new task's similarity to an earlier task is at least `threshold`, the new task uses
    (`reuse`) or starts from (`init`) that task's expert instead of a fresh copy of the pretrained projector."""
    threshold: float = 0.3
    """Similarity above which an earlier task's expert is reused (expand=similarity); S is a product of three
    sigmoids, so 0.125 is the value of a task pair exactly at the mean of every kind."""
    reuse: Literal["reuse", "init"] = "reuse"
    """reuse: the similar task's expert is trained further for the new task (no new parameters); init: a new
    expert, initialised from the similar task's expert."""
    similarity: TaskEncoderOptions = field(default_factory=TaskEncoderOptions)
    """How tasks are embedded for expand=similarity (see tir_ewc)."""

    def __post_init__(self) -> None:
        if self.key_steps < 0 or self.key_lr <= 0 or self.key_batch_size < 1 or self.key_samples < 1:
            raise ValueError("key_steps >= 0, key_lr > 0, key_batch_size >= 1 and key_samples >= 1 are required")


@register_strategy("eproj")
class EProj(Strategy):
    """EProj, the expandable projection of P3 ("Continual Instruction Tuning for Large Multimodal Models", He et al.
    2023; `EprojLearner` / `ExpandableProjection` of its code).

    Rule: each modality's projector becomes a set of experts, one slot per task, initialised from the pretrained
    projector. Before task t, slot t's keys (media key, instruction key) are trained alone with P3's pull loss
    0.1·Σ[(1 − cos(q_feat, K_feat[t])) + (1 − cos(q_inst, K_inst[t]))] on the task's training queries (detached);
    then only slot t's expert trains (the rest of the model is frozen). At evaluation every sample is routed, in
    batches, to the slot k maximising cos(q_feat, K_feat[k]) + cos(q_inst, K_inst[k]). Chosen: q_feat = the mean of
    the projector's input features over tokens (P3: vision CLS, or CLS + patches for LLaVA); q_inst = the mean of a
    frozen snapshot of the language model's input embeddings over the prompt tokens (P3: BERT CLS of the
    instruction), so routing runs inside the model's forward with no second model. With expand=similarity
    (INFERRED, P3 gives no rule): a task whose similarity to an earlier one reaches `threshold` reuses (or starts
    from) that task's expert. Routing accuracy per task (test records routed to the task's own expert) and every
    expansion decision go to eproj.json in the run directory and to the report. State: the experts and keys live
    in the model's checkpoint; the slot-to-expert map and the logs in the strategy's JSON. Needs a backend whose
    projectors mmcl calls itself (the composition).
    """

    reads_parameters = True  # expert copies of the projector

    Config = EProjOptions
    requires_model = frozenset({"routable_projectors"})
    supports_peft = False  # it freezes everything but the current expert, an adapter included

    def __init__(self, config: EProjOptions | None = None):
        super().__init__(config)
        self.slot_expert: list[int] = []
        self.decisions: list[dict] = []
        self.routing: list[dict] = []
        self._embeddings: dict[int, dict[str, torch.Tensor]] = {}
        self._encoder: TaskEncoder | None = None

    # -- set-up ---------------------------------------------------------------------------------------------------
    def _projectors(self, ctx: Context) -> dict[str, ExpertProjector]:
        return {m: p for m, p in ctx.model.projectors.items() if isinstance(p, ExpertProjector)}

    def prepare_model(self, ctx: Context) -> None:
        model = ctx.model
        used = {t.modality for t in ctx.stream.tasks} & set(model.modalities)
        table = model.language_model.get_input_embeddings().weight
        ignore = [ctx.pad_id, *(ctx.processor.placeholder_id(m) for m in model.modalities),
                  *(model.token_ids.values())]
        n = len(ctx.stream.tasks)
        for m in sorted(used):
            base = model.projectors[m]
            feat_dim = model.encoder_features(m, self._blank(model, m)).shape[-1]
            model.projectors[m] = ExpertProjector(base, n, feat_dim, table, ignore).to(table.device)
        self.slot_expert = list(range(n))

    @staticmethod
    @torch.no_grad()
    def _blank(model, modality: str) -> torch.Tensor:
        spec = model.modalities[modality]
        p = next(model.encoder_for(modality).parameters())
        if modality == "audio":
            x = torch.zeros(1, spec.n_mels, spec.seconds * 100)
        else:
            x = torch.zeros(1, 3, spec.image_size, spec.image_size)
            if spec.frames:
                x = x[:, None].expand(1, spec.frames, 3, spec.image_size, spec.image_size)
        return x.to(p.device, p.dtype)

    # -- before a task: expansion decision, key pre-training, only the expert trains ------------------------------------
    def on_task_start(self, ctx: Context) -> None:
        t, task = ctx.task_index, ctx.task
        projectors = self._projectors(ctx)
        if task.modality in projectors:
            self._decide(ctx, t)
            self._train_keys(ctx, t, projectors[task.modality])
        self._sync(ctx, active=t)
        for p in ctx.model.parameters():
            p.requires_grad_(False)
        if task.modality in projectors:
            for p in projectors[task.modality].experts[self.slot_expert[t]].parameters():
                p.requires_grad_(True)

    def _sync(self, ctx: Context, active: int | None) -> None:
        """The projectors' routing tables from the strategy's state: the slot-to-expert map, the slots of the tasks
        seen so far (up to the current one) per modality, and the expert in training (None: route)."""
        seen = ctx.stream.tasks[: ctx.task_index + 1]
        for m, proj in self._projectors(ctx).items():
            proj.slot_expert = list(self.slot_expert)
            proj.slots_in_use = [i for i, task in enumerate(seen) if task.modality == m]
            proj.active = active

    def _decide(self, ctx: Context, t: int) -> None:
        cfg = self.config
        decision = {"task": ctx.task.name, "slot": t, "expert": t, "decision": "new"}
        if cfg.expand == "similarity":
            if self._encoder is None:
                self._encoder = TaskEncoder(cfg.similarity)
            self._embeddings[t] = self._encoder.embed_task(ctx, ctx.task.name)
            earlier = [i for i in sorted(self._embeddings) if i < t
                       and ctx.stream.tasks[i].modality == ctx.task.modality]
            if earlier:
                kinds = [k for k in self._embeddings[t] if all(k in self._embeddings[i] for i in earlier)]
                s = similarity_to_earlier({k: self._embeddings[t][k] for k in kinds},
                                          {k: torch.stack([self._embeddings[i][k] for i in earlier]) for k in kinds})
                best = int(s.argmax())
                k_star, s_star = earlier[best], float(s[best])
                decision |= {"most_similar": ctx.stream.tasks[k_star].name, "similarity": round(s_star, 6)}
                if s_star >= cfg.threshold:
                    source = self.slot_expert[k_star]
                    if cfg.reuse == "reuse":
                        self.slot_expert[t] = source
                        decision |= {"expert": source, "decision": "reuse"}
                    else:
                        for proj in self._projectors(ctx).values():
                            proj.experts[t].load_state_dict(proj.experts[source].state_dict())
                        decision |= {"decision": "init", "from_expert": source}
        self.decisions = [d for d in self.decisions if d["slot"] != t] + [decision]
        self._write(ctx)

    @torch.no_grad()
    def _queries(self, ctx: Context, records: list, task_name: str, proj: ExpertProjector
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_feat, q_inst) of `records` exactly as routing computes them at evaluation (prompt only)."""
        model = ctx.model
        feats, insts = [], []
        examples = encode_records(records, ctx.processor, task_name, for_generation=True)
        collate = ctx.collator(left_pad=True)
        for i in range(0, len(examples), self.config.key_batch_size):
            batch = collate(examples[i : i + self.config.key_batch_size]).to(ctx.device, ctx.dtype)
            for m in sorted({m for row in batch.media for m in row}):
                values = torch.stack([row[m]["values"] for row in batch.media if m in row])
                rows = [r for r, row in enumerate(batch.media) if m in row]
                feats.append(proj.feat_query(model.encoder_features(m, values)))
                insts.append(proj.inst_query(batch.input_ids[rows]))
        return torch.cat(feats), torch.cat(insts)

    def _train_keys(self, ctx: Context, t: int, proj: ExpertProjector) -> None:
        """P3's key pre-training: only slot t's two keys move, towards the task's (detached) queries."""
        cfg = self.config
        records = evenly_spaced_records(ctx.records[ctx.task.name]["train"], cfg.key_samples)
        q_feat, q_inst = self._queries(ctx, records, ctx.task.name, proj)
        key_feat = proj.key_feat[t].detach().clone().requires_grad_(True)
        key_inst = proj.key_inst[t].detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([key_feat, key_inst], lr=cfg.key_lr)
        g = torch.Generator().manual_seed(task_seed(ctx.seed, t, SEED_KEYS))
        cos = torch.nn.functional.cosine_similarity
        for _ in range(cfg.key_steps):
            idx = torch.randint(len(q_feat), (min(cfg.key_batch_size, len(q_feat)),), generator=g).to(q_feat.device)
            loss = 0.1 * ((1 - cos(q_feat[idx], key_feat[None], -1)) + (1 - cos(q_inst[idx], key_inst[None], -1))).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            proj.key_feat[t] = key_feat.detach().to(proj.key_feat.dtype)
            proj.key_inst[t] = key_inst.detach().to(proj.key_inst.dtype)

    # -- after a task: routing from now on, and its accuracy on every seen task ----------------------------------------
    def on_task_end(self, ctx: Context) -> None:
        projectors = self._projectors(ctx)
        self._sync(ctx, active=None)
        row = {"after": ctx.task.name, "accuracy": {}}
        for i, task in enumerate(ctx.stream.tasks[: ctx.task_index + 1]):
            proj = projectors.get(task.modality)
            if proj is None:
                continue
            q_feat, q_inst = self._queries(ctx, ctx.records[task.name]["test"], task.name, proj)
            slots = torch.tensor(proj.slots_in_use)
            cf = torch.nn.functional.cosine_similarity(q_feat[:, None], proj.key_feat[slots][None].float(), -1)
            ci = torch.nn.functional.cosine_similarity(q_inst[:, None], proj.key_inst[slots][None].float(), -1)
            chosen = slots[(cf + ci).argmax(1).cpu()]
            experts = torch.tensor([self.slot_expert[int(s)] for s in chosen])
            row["accuracy"][task.name] = round(100.0 * float((experts == self.slot_expert[i]).float().mean()), 4)
        self.routing.append(row)
        self._write(ctx)

    def _write(self, ctx: Context) -> None:
        if not ctx.accelerator.is_main_process:
            return
        data = {"slot_expert": self.slot_expert, "decisions": self.decisions, "routing_accuracy": self.routing}
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
        (ctx.run_dir / EPROJ_FILE).write_text(json.dumps(data, indent=2) + "\n")
        if self._embeddings and self._encoder is not None:
            names = {i: ctx.stream.tasks[i].name for i in self._embeddings}
            write_similarity(ctx.run_dir, names, self._embeddings, self._encoder.text_source)

    # -- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"emb/{i}/{k}": v for i, e in self._embeddings.items() for k, v in e.items()}
        return tensors, {"slot_expert": self.slot_expert, "decisions": self.decisions, "routing": self.routing}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        self.slot_expert = list(meta.get("slot_expert", self.slot_expert))
        self.decisions = list(meta.get("decisions", []))
        self.routing = list(meta.get("routing", []))
        self._embeddings = {}
        for key, v in tensors.items():
            _, i, kind = key.split("/", 2)
            self._embeddings.setdefault(int(i), {})[kind] = v
