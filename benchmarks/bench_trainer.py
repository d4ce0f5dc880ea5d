"""Training throughput against the Hugging Face `Trainer` (what the peer frameworks train with).

The same backend, model, weights, examples and plan of global batches as `bench_train.py` (`TrainBench`): the
Trainer reads a Dataset whose item i is the examples of global batch i of `global_batches` (in order: a sequential
sampler, batch_size 1), and its data collator unwraps that item and collates it with mmcl's `Collator` (+ the model's
`media_inputs`), i.e. exactly the batches `fit` builds, built inside the timed loop as `fit` builds them. Same
optimizer (our own AdamW + LambdaLR with `fit`'s schedule, given through `optimizers=`), same clipping (`max_grad_norm`),
same loss: `compute_loss` is overridden with mmcl's token cross-entropy summed over the supervised tokens / their count
(`token_cross_entropy_sum`, what `fit` computes), so the two compute the same thing and their per-step losses are
checked to agree. No saving, evaluation, logging, reporting or progress bar (`save_strategy="no"`,
`logging_strategy="no"`, `report_to=[]`, `disable_tqdm`), no data-loader workers, `use_cpu` on a CPU.

Timed: the `fit(...)` call vs the `trainer.train()` call, both including their own per-call set-up (the Accelerator
and the Trainer/optimizer objects are built before the clock starts). Paired rounds as in `bench_train.py`; the
ratio is engine steps/s ÷ Trainer steps/s (above 1: mmcl's loop is faster). There is no goal: it is reported.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402
import benchutil  # noqa: E402
import torch  # noqa: E402

BACKENDS = ("mmcl", "llava", "qwen2_vl", "idefics3", "blip-2", "qwen2_audio")
MODES = {  # as bench_train's, with less time: there is no goal to resolve
    "full": {**bench_train.MODES["full"], "budget_s": 40.0},
    "quick": bench_train.MODES["quick"],
}


class StepBatches(torch.utils.data.Dataset):
    """Item i: the examples of global batch i of the plan (a Trainer batch of size 1 is one global batch)."""

    def __init__(self, examples, plan):
        self.examples, self.plan = examples, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int):
        return [self.examples[j] for j in self.plan[i]]


def trainer_class():
    from transformers import Trainer

    from mmcl.models.losses import token_cross_entropy_sum

    class MMCLLossTrainer(Trainer):
        """The Trainer with mmcl's loss (same math as `fit`); records the per-step losses (kept on the device, read
        once after training) and puts the torch RNG where `fit` has it at its first forward (the Trainer's data
        loader draws a seed first), so dropout masks match too."""

        def __init__(self, *args, rng_state=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.step_losses: list[torch.Tensor] = []
            self.rng_state = rng_state

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.rng_state is not None:
                torch.set_rng_state(self.rng_state)
                self.rng_state = None
            labels = inputs.pop("labels")
            out = model(**inputs)
            n_tokens = (labels[:, 1:] != -100).sum().clamp(min=1)
            loss = token_cross_entropy_sum(out.logits, labels) / n_tokens
            self.step_losses.append(loss.detach())
            return (loss, out) if return_outputs else loss

    return MMCLLossTrainer


def trainer_run(bench: bench_train.TrainBench, scratch: Path):
    """A run function like `TrainBench.engine`: `Trainer.train()` for n steps on the same plan of batches."""
    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from mmcl.engine.train import lr_lambda

    cls = trainer_class()
    model = bench.model

    def collate(items):
        (examples,) = items  # batch_size=1 over global batches
        batch = bench.collator(examples).to(bench.device, bench.dtype)
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels,
                **model.media_inputs(batch.media, batch.input_ids)}

    class Stamps(TrainerCallback):
        """The time at the end of every optimizer step."""

        def __init__(self):
            self.stamps: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.stamps.append(time.perf_counter())

    def run(n_steps: int) -> benchutil.Timed:
        cfg = bench.config(n_steps)
        args = TrainingArguments(
            output_dir=str(scratch / "trainer"), per_device_train_batch_size=1, gradient_accumulation_steps=1,
            max_steps=n_steps, learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
            use_cpu=bench.device.type == "cpu", report_to=[], save_strategy="no", logging_strategy="no",
            eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
            remove_unused_columns=False, train_sampling_strategy="sequential", seed=bench_train.SEED)
        bench.reset()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * n_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, n_steps, warmup))
        stamps = Stamps()
        trainer = cls(model=model, args=args, data_collator=collate, optimizers=(optimizer, scheduler),
                      callbacks=[stamps], rng_state=torch.get_rng_state())
        trainer.remove_callback(PrinterCallback)  # it would print the final metrics dict on stdout
        t, c = time.perf_counter(), time.process_time()
        # the plan of batches is computed inside the clock, as `fit` computes it inside its call
        trainer.train_dataset = StepBatches(bench.examples, bench.plan(n_steps))
        out = trainer.train()
        dt, dc = time.perf_counter() - t, time.process_time() - c
        assert out.global_step == n_steps, out
        losses = torch.stack(trainer.step_losses).tolist()
        assert len(losses) == n_steps
        return benchutil.Timed(n_steps / dt, n_steps / dc, losses, stamps.stamps)

    return run


def run(quick: bool = False, backends: tuple[str, ...] | None = None, log=print) -> dict:
    mode = MODES["quick" if quick else "full"]
    backends = backends or (BACKENDS[:2] if quick else BACKENDS)
    out = bench_train.over_backends("trainer: engine ÷ Trainer", trainer_run, backends, mode, log)
    return {
        "name": "trainer",
        "batch_size": bench_train.BATCH_SIZE,
        "device": next(iter(out.values()))["device"],
        "mode": mode,
        "half_width": bench_train.HALF_WIDTH,
        "backends": out,
        "passed": True,  # reported, no goal
    }


if __name__ == "__main__":
    import json

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    torch.set_num_threads(1)
    print(json.dumps(run("--quick" in sys.argv, tuple(args) or None), indent=2))
