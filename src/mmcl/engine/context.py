"""What strategies see: the model and its processor, the stream, the current task and step, the few run settings
strategies read (as explicit properties, not the whole run config), and helpers to read task data."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from mmcl.config import RunConfig
from mmcl.data.batching import Batch, Collator, Example, MediaLoader, encode_records
from mmcl.data.records import Record, Stream, Task
from mmcl.eval.generate import TaskResult, evaluate_task, generate_answers, generation_options
from mmcl.models.base import MLLM, Processor


@dataclass
class Context:
    config: RunConfig
    accelerator: Accelerator
    model: MLLM
    processor: Processor
    stream: Stream
    run_dir: Path
    media: MediaLoader
    records: dict[str, dict[str, list[Record]]]  # task name -> split -> validated records
    task_index: int = -1
    step: int = 0  # optimizer steps over the whole run
    task_step: int = 0  # optimizer steps within the current task
    optimizer: torch.optim.Optimizer | None = None
    _examples: dict[str, list[Example]] = field(default_factory=dict)

    # -- where the run is -------------------------------------------------------------------------------------------
    @property
    def task(self) -> Task:
        return self.stream.tasks[self.task_index]

    @property
    def seen_tasks(self) -> list[Task]:
        """Train tasks finished before the current one."""
        return self.stream.tasks[: max(self.task_index, 0)]

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- the run settings strategies read ---------------------------------------------------------------------------
    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def batch_size(self) -> int:
        """The global training batch size."""
        return self.config.train.batch_size

    @property
    def micro_batch_size(self) -> int:
        """Rows per forward pass on this process: the global batch over accumulation steps and processes."""
        train = self.config.train
        return max(1, train.batch_size // (train.grad_accum * self.accelerator.num_processes))

    @property
    def allow_outside_root(self) -> bool:
        """Whether media may live outside a task's data root (for strategies that read task files themselves)."""
        return self.config.data.allow_outside_root

    @property
    def max_new_tokens(self) -> int | None:
        """The run's override of every task's generation budget (None: each task's own)."""
        return self.config.eval.max_new_tokens

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id

    # -- data -------------------------------------------------------------------------------------------------------
    def train_examples(self, task_name: str) -> list[Example]:
        """The tokenized training examples of a task of the stream (cached)."""
        if task_name not in self._examples:
            self._examples[task_name] = encode_records(self.records[task_name]["train"], self.processor, task_name)
        return self._examples[task_name]

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def collator(self, left_pad: bool = False) -> Collator:
        return Collator(self.processor, self.media, left_pad=left_pad)

    def batches(self, examples: list[Example], batch_size: int) -> Iterator[Batch]:
        """Examples in order, in device batches (for passes such as importance estimation)."""
        collate = self.collator()
        for i in range(0, len(examples), batch_size):
            yield collate(examples[i : i + batch_size]).to(self.device, self.dtype)

    # -- the model --------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch, model: MLLM | None = None) -> Any:
        """Run `model` (default: the trained model) on a device batch; returns the HF output with `.logits`."""
        m = model if model is not None else self.model
        return m(batch.input_ids, batch.attention_mask, **m.media_inputs(batch.media, batch.input_ids))

    def generate(self, model: MLLM, records: list[Record], task: str, max_new_tokens: int) -> list[str]:
        """Answers of `model` to `records`, decoded with the run's `eval` settings (batch size, greedy or beams)."""
        return generate_answers(model, self.processor, self.collator(left_pad=True), records, task, max_new_tokens,
                                self.config.eval.batch_size, self.device, self.dtype,
                                **generation_options(self.config.eval))

    def score(self, task: Task, split: str) -> TaskResult:
        """The trained model's score (and predictions) on one split of a task, as the accuracy matrix measures it.
        With several processes each generates its share of the records and every process gets all answers."""
        from accelerate.utils import gather_object

        cfg = self.config.eval
        acc = self.accelerator
        return evaluate_task(self.model, self.processor, self.collator(left_pad=True), task,
                             self.records[task.name][split], batch_size=cfg.batch_size, device=self.device,
                             dtype=self.dtype, max_new_tokens=cfg.max_new_tokens, **generation_options(cfg),
                             shard=(acc.process_index, acc.num_processes), gather=gather_object)
