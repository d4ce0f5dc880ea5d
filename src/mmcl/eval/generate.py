"""Batched evaluation: generate answers (greedy, or beam search) for a task's test records and score them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mmcl.data.batching import Collator, encode_records
from mmcl.data.records import Record, Task
from mmcl.eval.scorers import run_scorer
from mmcl.models.base import MLLM, Processor


@dataclass
class TaskResult:
    task: str
    score: float
    predictions: list[dict]  # {"id", "prompt", "prediction", "references", "score"}


@torch.no_grad()
def generate_answers(
    model: MLLM,
    processor: Processor,
    collator: Collator,
    records: Sequence[Record],
    task: str,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Answers in record order, greedy unless `num_beams` > 1. Prompts are grouped by length so batches carry
    little padding."""
    examples = encode_records(records, processor, task, for_generation=True)
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    answers: list[str] = [""] * len(examples)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collator([examples[i] for i in idx]).to(device, dtype)
            new = model.generate_new(
                batch.input_ids,
                batch.attention_mask,
                max_new_tokens,
                **model.media_inputs(batch.media, batch.input_ids),
                pad_token_id=processor.pad_id,
                eos_token_id=processor.eos_ids,
                num_beams=num_beams,
                # only when asked for: HF warns that, with a prompt given as embeddings, it penalises new tokens only
                **({"repetition_penalty": repetition_penalty} if repetition_penalty != 1.0 else {}),
            )
            for i, row in zip(idx, new.tolist()):
                answers[i] = processor.decode_answer(row)
    finally:
        model.train(was_training)
    return answers


def evaluate_task(
    model: MLLM,
    processor: Processor,
    collator: Collator,
    task: Task,
    records: Sequence[Record],
    *,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_new_tokens: int | None = None,
    num_beams: int = 1,
    repetition_penalty: float = 1.0,
    shard: tuple[int, int] = (0, 1),
    gather: Callable[[list], list] | None = None,
) -> TaskResult:
    """Score a task's test records with its scorer; returns the score (0-100 scale) and per-record predictions.
    A scorer that declares a `prompts` parameter (e.g. `option_letter`) also gets each record's prompt.

    With `shard` = (rank, world) > 1 process, this process generates only records rank, rank + world, ... and
    `gather` (every process's list, concatenated in rank order, on every process) brings the answers together, so
    every process scores all records in file order and returns the same result."""
    rank, world = shard
    mine = list(range(rank, len(records), world))
    answers_mine = generate_answers(
        model, processor, collator, [records[i] for i in mine], task.name, max_new_tokens or task.max_new_tokens,
        batch_size, device, dtype, num_beams=num_beams, repetition_penalty=repetition_penalty,
    ) if mine else []
    answers = [""] * len(records)
    pairs = list(zip(mine, answers_mine))
    for i, a in (gather(pairs) if world > 1 and gather is not None else pairs):
        answers[i] = a
    refs = [r.references for r in records]
    prompts = [r.conversations[-2]["value"] for r in records]
    result = run_scorer(task.scorer, answers, refs, prompts=prompts)  # only scorers that declare prompts get them
    preds = [
        {
            "id": r.id,
            "prompt": p,
            "prediction": a,
            "references": ref,
            "score": s,
        }
        for r, p, a, ref, s in zip(records, prompts, answers, refs, result.per_sample)
    ]
    return TaskResult(task.name, float(result.score), preds)


def generation_options(cfg) -> dict:
    """The decoding settings of an `EvalConfig`, as keyword arguments of `generate_answers` / `evaluate_task`."""
    return {"num_beams": cfg.num_beams, "repetition_penalty": cfg.repetition_penalty}
