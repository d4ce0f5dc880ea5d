"""MoInCL (P4, Pian et al., arXiv 2412.13050): pseudo targets, KD on them, instruction-based KD, optional fusion."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmcl.data.batching import Batch, Example
from mmcl.data.overlap import ExtraData
from mmcl.data.records import Record, Task
from mmcl.models.losses import token_cross_entropy_sum
from mmcl.seeding import task_seed
from mmcl.strategies._instructions import BUILTIN, builtin_instructions, load_instructions
from mmcl.strategies._teacher import (
    TeacherOptions,
    make_teacher,
    module_bytes,
    teacher_generate,
    teacher_logits,
)
from mmcl.strategies.base import Strategy
from mmcl.strategies.lwf import distillation_loss
from mmcl.strategies.registry import register_strategy

if TYPE_CHECKING:
    from mmcl.engine.context import Context

QA_TYPES = frozenset({"qa", "mcq", "classification"})
CAPTION_TYPES = frozenset({"caption"})
PSEUDO_PREFIX = "moincl-pseudo"
IKD_PREFIX = "moincl-ikd"
SEED_PSEUDO = 5
"""`task_seed` purpose of the choice of inputs that get a pseudo example and of the sampled questions."""
SEED_IKD = 6
"""`task_seed` purpose of the per-micro-batch sample of text-only instructions."""


@dataclass
class MoInCLOptions:
    pseudo: bool = True
    """PTGM: mix in pseudo examples made by the previous-task model (pseudo captions on QA tasks, pseudo QA on
    captioning tasks) and distil the previous model on them."""
    pseudo_num: int = 4
    """Pseudo examples per global batch (P4's `pseudo_num`; order 1 uses 4, 1, 4): the task gets
    round(n_examples · pseudo_num / train.batch_size) pseudo examples, shuffled into its batches."""
    lambda_kl: float = 1.0
    """Weight λ_KL of the KD term on pseudo examples (P4's `lambda_kl`; order 1 uses 1.0, 0.5, 0.1)."""
    temperature: float = 5.0
    """Softmax temperature T of both KD terms; each KL is multiplied by T² (P4: T = 5)."""
    ikd: bool = True
    """IKD: distil the previous model into the current one on text-only instructions, every micro-batch."""
    text_instruct_num: int = 4
    """Text-only instructions per micro-batch for IKD (P4's `text_instruct_num`, 4)."""
    ikd_mode: str = "kl"
    """How IKD keeps the previous model's behaviour on the instructions: 'kl' distils its softened token
    distributions (P4's default `text_instruct_constraint_type`), 'pseudo' trains with cross-entropy on its
    answers (P4's alternative; decoded with the run's `eval` settings)."""
    ikd_max_new_tokens: int = 32
    """Longest previous-model answer to an instruction with `ikd_mode: pseudo`."""
    instructions: str | None = None
    """A JSONL or JSON-list file of text-only instructions for IKD: strings, objects with `conversations`, or
    objects with `prompt`/`instruction`/`definition`/`text` (+ optional `input`). Default (null): the built-in
    instruction set (`mmcl.data.synth.instructions`, 512 instructions of other skills than the retention tasks',
    disjoint from every evaluated record; P4 uses Natural Instructions, not available offline). Every run checks
    the pool against the evaluated records first (`mmcl.data.overlap`)."""
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    """Dtype and device of the previous-task model: `{dtype: bfloat16}` halves an fp32 copy, `{device: cpu}` keeps
    it off the accelerator (see `strategies/_teacher.py`)."""
    fusion_alpha: float | None = None
    """Weight fusion on tasks t ≥ 1: θ ← (1−α)·θ_old + α·θ for the trainable language-model parameters, θ_old the
    previous-task model (P4's TMLR code; 0.1 / 0.5 in order 1); None: off."""
    fusion_every: str = "epoch"
    """When fusion runs: after every epoch, training going on from the fused weights (P4's code), or once at the
    end of the task ('task')."""

    def __post_init__(self) -> None:
        for name in ("pseudo", "ikd"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.ikd_mode not in ("kl", "pseudo"):
            raise ValueError(f"ikd_mode must be 'kl' or 'pseudo', got {self.ikd_mode!r}")
        for name in ("pseudo_num", "text_instruct_num", "ikd_max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                off = {"pseudo_num": " (turn the part off with pseudo=false)",
                       "text_instruct_num": " (turn the part off with ikd=false)"}.get(name, "")
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}{off}")
        if not (math.isfinite(self.lambda_kl) and self.lambda_kl >= 0):
            raise ValueError(f"lambda_kl must be a finite number >= 0, got {self.lambda_kl}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        if self.fusion_every not in ("epoch", "task"):
            raise ValueError(f"fusion_every must be 'epoch' or 'task', got {self.fusion_every!r}")
        if self.fusion_alpha is not None and not (0.0 < self.fusion_alpha <= 1.0):
            raise ValueError(f"fusion_alpha must be in (0, 1] (1 leaves the weights unchanged) or null for no "
                             f"fusion, got {self.fusion_alpha}")
        if self.instructions is not None:
            if not str(self.instructions).strip():
                raise ValueError("instructions must name a JSONL/JSON file, got an empty string")
            if not Path(self.instructions).expanduser().is_file():
                raise ValueError(f"instructions: file not found: {self.instructions}")


@register_strategy("moincl")
class MoInCL(Strategy):
    """MoInCL, "Modality-Inconsistent Continual Learning of Multimodal Large Language Models" (P4, Pian et al.,
    arXiv 2412.13050; code weiguoPian/MICL_TMLR): pseudo targets from the previous model (PTGM), KD on them,
    instruction-based KD (IKD) on text-only instructions, and optional weight fusion.

    Rules, each a switch for P4's ablations:
    1. Teacher: at the start of task index ≥ 1 the model is deep-copied as a frozen teacher (eval, no grad), in the
       model's dtype and device or, with `teacher: {dtype: bfloat16, device: cpu}`, smaller or off the accelerator.
    2. PTGM (`pseudo`): on a QA task (type qa/mcq/classification) after a captioning task of the same modality, the
       teacher generates (as `ctx.generate`: the run's decoding, greedy unless `eval.num_beams` > 1; P4: beam 5,
       `eval.repetition_penalty` 1.15; `eval.max_new_tokens` or the caption task's max), a caption for chosen training
       inputs of the current task, prompted by the earlier caption task's own first human turn; on a captioning task
       after a QA task of the same modality, the teacher answers a question sampled (seeded) from that QA task's
       training records on each chosen input (P4 loads pseudo QA pairs pre-made by another model from files; mmcl
       generates them with the previous model). The most recent such earlier task is used; otherwise no pseudo
       examples. A pseudo example has the input's media, the prompt, and the teacher's text as answer. P4 duplicates
       `pseudo_num` samples of each batch of 8 into pseudo samples and appends them; here round(n · pseudo_num /
       train.batch_size) pseudo examples (inputs drawn uniformly without replacement, seeded) join the task's examples
       in `train_examples`, so about `pseudo_num` per global batch are pseudo, and the loss stays the exact token mean
       of the global batch (appending per batch would break the engine's normaliser). They join the CE.
    3. KD on pseudo examples: for the rows of a micro-batch that are pseudo examples, λ_KL·T²·KL(softmax(z_old/T)
       ‖ softmax(z_new/T)), averaged over their supervised positions (P4 includes all positions, prompt and
       padding too; mmcl distils the answers the pseudo target is about), teacher under no_grad, LwF's KD function.
    4. IKD (`ikd`): for every micro-batch of a task index ≥ 1, `text_instruct_num` text-only instructions
       (sampled without replacement, seeded by run seed, task, step, micro-batch and process) are encoded prompt
       only and appended to the micro-batch as rows with no supervised label (so the task loss is unchanged and
       the student runs them in its one forward pass, DDP-safe); T²·KL(teacher ‖ student) averaged over every
       non-pad position of those rows is added with weight 1 (P4: `batchmean` over all positions, padding too).
       Instructions: the `instructions` file, else the built-in instruction set (P4 samples Natural Instructions,
       not available offline); before training, `mmcl.data.overlap` refuses a pool (and pseudo inputs) holding
       an evaluated record, since distilling on the retention tasks' own prompts would confound their scores.
       With `ikd_mode: pseudo` (P4's alternative), the teacher's answer to each sampled instruction
       (cached per instruction for the task: the teacher is fixed) is the target of a cross-entropy term, the mean
       over those answer tokens, weight 1; the rows stay out of the task loss.
    5. Fusion (`fusion_alpha`, off by default): on task index ≥ 1, after every epoch (P4's TMLR code; or once at
       the task's end with `fusion_every: task`), θ ← (1−α)·θ_old + α·θ for every trainable parameter of the
       language model, θ_old the teacher (adapters of the modality encoders/projectors are not fused, as without
       P4's `--projection_fusion`). The optimizer's moments are kept, as in P4's code.
    Every option but `instructions` can take another value per task (`per_task`, P4's per-step table).
    Total: CE(task ∪ pseudo) + λ_KL·L_KD + L_IKD. State: none in the checkpoint — the teacher is the model at the
    task boundary (rebuilt by `on_task_start`) and pseudo examples are regenerated deterministically (greedy or beam
    decoding, seeded choices), so a boundary resume is exact; mid-task resume is not supported. Memory: one
    extra model copy during tasks ≥ 2 (`state_bytes`); compute: generation before the task (counted in cost.json's
    strategy time), a teacher forward per micro-batch.
    """

    reads_parameters = True  # a teacher copy of the model

    Config = MoInCLOptions
    # P4's run scripts set these per step (configs/micl/order1_moincl_p4.yaml); `instructions` is read once
    task_options = frozenset({"pseudo", "pseudo_num", "lambda_kl", "temperature", "ikd", "text_instruct_num",
                              "ikd_mode", "ikd_max_new_tokens", "fusion_alpha", "fusion_every"})
    needs_teacher = True
    supports_mid_task_resume = False  # teacher and pseudo examples are rebuilt at task start, not checkpointed

    def __init__(self, config: MoInCLOptions | None = None):
        super().__init__(config)
        self.teacher: torch.nn.Module | None = None
        self.pseudo_ids: set[str] = set()
        self.pseudo_source: str | None = None  # the earlier task whose prompts made the pseudo examples
        self._instructions: list[list[dict]] | None = None
        self._ikd_examples: list[Example] = []
        self._ikd_answered: dict[int, Example] = {}  # ikd_mode pseudo: instruction index -> teacher-answered example
        self._ikd_targets: dict[str, torch.Tensor] = {}  # ikd_mode pseudo: row id -> labels of the current rows
        self._micro = (-1, 0)  # (task_step, micro-batch counter) for IKD seeding

    # -- setup ------------------------------------------------------------------------------------------------------
    def instruction_conversations(self, ctx: Context | None = None) -> list[list[dict]]:
        """IKD's pool: the `instructions` file, else the built-in instruction set."""
        if self.config.instructions is not None:
            return load_instructions(self.config.instructions)
        return builtin_instructions()

    def extra_training_data(self, ctx: Context) -> list[ExtraData]:
        """What MoInCL trains on besides each task's train split, for the pre-flight leak check: the IKD pool,
        and for every task that gets pseudo examples the prompts they use paired with the task's inputs."""
        out = []
        configs = [self.task_configs.get(t.name, self.base_config) for t in ctx.stream.tasks]
        if len(ctx.stream.tasks) > 1 and any(c.ikd for c in configs[1:]):
            path = self.config.instructions
            convs = self.instruction_conversations(ctx)
            where = [f"{path}: item {i + 1}" for i in range(len(convs))] if path else []
            out.append(ExtraData.pool(f"IKD instructions ({path or BUILTIN})",
                                      [" ".join(t["value"] for t in c if t["from"] == "human") for c in convs], where))
        for index, (task, cfg) in enumerate(zip(ctx.stream.tasks, configs)):
            plan = self._plan(task, ctx.stream.tasks[:index]) if index and cfg.pseudo else None
            if plan is None:
                continue
            kind, source = plan
            prompts = [r.conversations[0]["value"] for r in ctx.records[source.name]["train"]]
            prompts = prompts[:1] if kind == "caption" else list(dict.fromkeys(prompts))
            media = tuple(r.media for r in ctx.records[task.name]["train"])
            out.append(ExtraData(f"pseudo {kind} inputs of {task.name} (prompts of {source.name})", tuple(prompts),
                                 media))
        return out

    def state_bytes(self) -> dict[str, int]:
        """Memory held now: the teacher copy (during tasks ≥ 2) and the encoded instruction pool."""
        pool = sum(len(e.input_ids) * 8 for e in self._ikd_examples)  # token ids as Python ints, roughly
        return {"teacher": module_bytes(self.teacher), "instructions": pool}

    def prepare_model(self, ctx: Context) -> None:
        if self.config.ikd and len(ctx.stream.tasks) > 1:
            self._instructions = self.instruction_conversations(ctx)

    def on_task_start(self, ctx: Context) -> None:
        self.teacher, self.pseudo_ids, self.pseudo_source, self._micro = None, set(), None, (-1, 0)
        if ctx.task_index >= 1:
            self.teacher = make_teacher(ctx, self.config.teacher)
            if self.config.ikd:
                if self._instructions is None:
                    self._instructions = self.instruction_conversations(ctx)
                self._ikd_examples = [
                    Example(f"{IKD_PREFIX}-{i}", *ctx.processor.encode(c, for_generation=True), {}, IKD_PREFIX)
                    for i, c in enumerate(self._instructions)
                ]
                self._ikd_answered = {}

    # -- PTGM -------------------------------------------------------------------------------------------------------
    def pseudo_plan(self, ctx: Context) -> tuple[str, Task] | None:
        """('caption' | 'qa', the earlier task whose prompts are used), or None when PTGM makes nothing."""
        return self._plan(ctx.task, ctx.seen_tasks)

    @staticmethod
    def _plan(task: Task, seen: list[Task]) -> tuple[str, Task] | None:
        if task.type in QA_TYPES:
            want, kind = CAPTION_TYPES, "caption"
        elif task.type in CAPTION_TYPES:
            want, kind = QA_TYPES, "qa"
        else:
            return None
        earlier = [t for t in seen if t.type in want and t.modality == task.modality]
        return (kind, earlier[-1]) if earlier else None

    def train_examples(self, ctx: Context, examples: list[Example]) -> list[Example]:
        if self.teacher is None or not self.config.pseudo:
            return examples
        plan = self.pseudo_plan(ctx)
        if plan is None:
            return examples
        kind, source = plan

        count = round(len(examples) * self.config.pseudo_num / ctx.batch_size)
        inputs = ctx.records[ctx.task.name]["train"]
        if count == 0 or not inputs:
            return examples
        g = torch.Generator().manual_seed(task_seed(ctx.seed, ctx.task_index, SEED_PSEUDO))
        chosen: list[int] = []
        while len(chosen) < count:  # without replacement, cycling if more pseudo examples than inputs are asked for
            chosen += torch.randperm(len(inputs), generator=g).tolist()[: count - len(chosen)]
        source_records = ctx.records[source.name]["train"]
        if kind == "caption":
            prompts = [source_records[0].conversations[0]["value"]] * count
        else:
            picks = torch.randint(len(source_records), (count,), generator=g).tolist()
            prompts = [source_records[j].conversations[0]["value"] for j in picks]
        queries = [
            Record(f"{PSEUDO_PREFIX}-{k}:{inputs[i].id}",
                   [{"from": "human", "value": p}], [], inputs[i].media,
                   f"pseudo from {source.name}")
            for k, (i, p) in enumerate(zip(chosen, prompts))
        ]
        budget = ctx.max_new_tokens or source.max_new_tokens
        answers = teacher_generate(ctx, self.teacher, queries, ctx.task.name, budget)
        pseudo = []
        for q, a in zip(queries, answers):
            conv = [q.conversations[0], {"from": "gpt", "value": a}]
            pseudo.append(Example(q.id, *ctx.processor.encode(conv), q.media, ctx.task.name))
        self.pseudo_ids = {e.id for e in pseudo}
        self.pseudo_source = source.name
        return list(examples) + pseudo

    # -- IKD rows ---------------------------------------------------------------------------------------------------
    def ikd_examples(self, ctx: Context) -> list[Example]:
        """This micro-batch's instructions: a seeded sample, new for every micro-batch of every step."""

        step, k = self._micro
        self._micro = (ctx.task_step, k + 1 if step == ctx.task_step else 0)
        n = len(self._ikd_examples)
        seed = task_seed(ctx.seed, ctx.task_index, SEED_IKD)
        seed = (seed + 1_000_003 * ctx.task_step + 7919 * self._micro[1] + 104_729 * ctx.accelerator.process_index)
        g = torch.Generator().manual_seed(seed % 2**32)
        chosen = torch.randperm(n, generator=g)[: self.config.text_instruct_num].tolist()
        if self.config.ikd_mode == "pseudo":
            return self.answered(ctx, chosen)
        return [self._ikd_examples[i] for i in chosen]

    def answered(self, ctx: Context, chosen: list[int]) -> list[Example]:
        """The instructions `chosen` with the teacher's answers as supervised targets (generated once each)."""

        todo = [i for i in dict.fromkeys(chosen) if i not in self._ikd_answered]
        if todo:
            queries = [Record(f"{IKD_PREFIX}-{i}", self._instructions[i], [], {}, IKD_PREFIX) for i in todo]
            answers = teacher_generate(ctx, self.teacher, queries, IKD_PREFIX, self.config.ikd_max_new_tokens)
            for i, q, a in zip(todo, queries, answers):
                conv = [*q.conversations, {"from": "gpt", "value": a}]
                self._ikd_answered[i] = Example(q.id, *ctx.processor.encode(conv), {}, IKD_PREFIX)
        return [self._ikd_answered[i] for i in chosen]

    def transform_batch(self, ctx: Context, batch: Batch) -> Batch:
        if self.teacher is None or not self.config.ikd or not self._ikd_examples:
            return batch
        extra = ctx.collator()(self.ikd_examples(ctx)).to(batch.input_ids.device)
        # the instruction rows never join the task loss; in pseudo mode their targets are kept for extra_loss
        # (one pad column more than the longest instruction, so every real position has a successor slot)
        width = max(batch.input_ids.shape[1], extra.input_ids.shape[1] + 1)
        extra = extra.widen(width, ctx.pad_id)
        self._ikd_targets = dict(zip(extra.ids, extra.labels)) if self.config.ikd_mode == "pseudo" else {}
        extra.labels = torch.full_like(extra.labels, -100)
        return Batch.concat([batch, extra], ctx.pad_id, width)

    # -- losses -----------------------------------------------------------------------------------------------------
    def extra_loss(self, ctx: Context, batch: Batch, outputs: Any) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        ids = batch.ids
        pseudo = [i for i, x in enumerate(ids) if x in self.pseudo_ids] if self.config.lambda_kl > 0 else []
        ikd = [i for i, x in enumerate(ids) if x.startswith(IKD_PREFIX)]
        if not pseudo and not ikd:
            return None
        total = outputs.logits.sum() * 0.0
        if ikd and self.config.ikd_mode == "pseudo":
            total = total + self._ikd_cross_entropy(outputs.logits, ids, ikd)
            ikd = []
        rows = pseudo + ikd  # the rows the teacher must see
        if not rows:
            return total
        sub = batch.select(rows)
        old = teacher_logits(ctx, self.teacher, sub)
        index = torch.tensor(rows, device=outputs.logits.device, dtype=torch.long)
        student_logits = outputs.logits.index_select(0, index)
        temperature = self.config.temperature
        n_p = len(pseudo)
        if pseudo:
            kd = distillation_loss(student_logits[:n_p], old[:n_p], sub.labels[:n_p], temperature)
            total = total + self.config.lambda_kl * kd
        if ikd:
            mask = sub.attention_mask[n_p:]
            labels = torch.full_like(mask, -100)  # position j counts iff it is a real token: labels[j + 1] != -100
            labels[:, 1:] = torch.where(mask[:, :-1] == 1, 0, -100)
            total = total + distillation_loss(student_logits[n_p:], old[n_p:], labels, temperature)
        return total

    def _ikd_cross_entropy(self, logits: torch.Tensor, ids: list[str], rows: list[int]) -> torch.Tensor:
        """Mean next-token cross-entropy of the instruction rows on the teacher's answers (`ikd_mode: pseudo`)."""
        width = logits.shape[1]  # a later strategy may have widened the batch further
        targets = [self._ikd_targets[ids[r]] for r in rows]
        labels = torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[0]), value=-100) for t in targets])
        index = torch.tensor(rows, device=logits.device, dtype=torch.long)
        n = int((labels[:, 1:] != -100).sum())
        return token_cross_entropy_sum(logits.index_select(0, index), labels) / max(n, 1)

    # -- fusion and task end ---------------------------------------------------------------------------------------
    def fuse(self, ctx: Context) -> None:
        """θ ← (1−α)·θ_old + α·θ for the trainable language-model parameters (a no-op without teacher or α)."""
        alpha = self.config.fusion_alpha
        if self.teacher is None or alpha is None or alpha == 1.0:
            return
        old = dict(self.teacher.named_parameters())
        language = ctx.model.language_model_parameter_names()
        with torch.no_grad():
            for name, p in ctx.trainable_parameters():
                if name in language and name in old and old[name].shape == p.shape:
                    # p + (1-α)(old - p) = (1-α)·old + α·p
                    p.lerp_(old[name].to(device=p.device, dtype=p.dtype), 1.0 - alpha)

    def on_epoch_end(self, ctx: Context) -> None:
        if self.config.fusion_every == "epoch":
            self.fuse(ctx)

    def on_task_end(self, ctx: Context) -> None:
        if self.config.fusion_every == "task":
            self.fuse(ctx)
        self.teacher = None  # free the copy before evaluation
        self._ikd_examples, self._ikd_answered, self._ikd_targets = [], {}, {}
