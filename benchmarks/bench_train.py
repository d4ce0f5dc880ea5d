"""Training throughput: `mmcl.engine.train.fit` against a bare hand-written PyTorch loop, on every backend.

For each backend (the built-in composition and each native Hugging Face family, on its tiny model) both sides run
the same model (reset to the same weights and the same torch seed before every run), the same TrainConfig, the same
plan of global batches (`global_batches`) collated by the same `Collator`, and the same loss (token cross-entropy
summed over the global batch's supervised tokens / their count), clipping, AdamW and LambdaLR schedule; the
trained parts are the engine's default (projectors of the task's modality + language model).

After a warm-up of each, paired rounds follow: an engine run and a bare run back to back, the order flipping every
round, until the 95% t-interval of the geometric mean of the per-round ratios (engine steps/s ÷ bare steps/s) is
narrower than ±3% of the ratio, or the round cap / time budget is reached (`benchutil.paired_rounds`). Both loops
see identical batches from identical weights, so their per-step losses must agree: that is checked too.

`TrainBench` (one backend's model, data and the two timed runs) is what `bench_trainer.py` times against the
Hugging Face `Trainer` as well.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchutil  # noqa: E402
import torch  # noqa: E402

GOAL = 0.95
HALF_WIDTH = 0.03
BATCH_SIZE = 16
SEED = 1234

# mode -> seconds per timed run (sets the steps of a run from the warm-up's rate), min/max steps per run, warm-up
# steps, min/max rounds, and the time budget of the paired rounds per backend on average (seconds; shared: what a
# backend whose interval is narrow early leaves unused goes to the backends after it). The rounds of a backend stop
# once the 95% interval is within ±HALF_WIDTH, or at max_rounds, or when its budget is spent.
MODES = {
    "full": dict(run_s=0.8, min_steps=8, max_steps=60, warm_steps=8, min_rounds=10, max_rounds=60, budget_s=55.0),
    "quick": dict(run_s=0.25, min_steps=4, max_steps=12, warm_steps=3, min_rounds=2, max_rounds=4, budget_s=6.0),
}


def bare_loop(model, examples, collator, cfg, plan, device, dtype, stamps: list | None = None) -> list[float]:
    """The reference: what a user would write by hand, one host sync at the end. With `stamps`, the time at the end
    of every step is appended to it."""
    from mmcl.engine.train import lr_lambda
    from mmcl.models.losses import token_cross_entropy_sum

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_ratio * len(plan))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.schedule, len(plan), warmup))
    model.train()
    losses = []
    for idx in plan:
        batch = collator([examples[i] for i in idx]).to(device, dtype)
        labels = batch.labels
        n_tokens = (labels[:, 1:] != -100).sum().clamp(min=1)
        out = model(batch.input_ids, batch.attention_mask, **model.media_inputs(batch.media, batch.input_ids))
        loss = token_cross_entropy_sum(out.logits, labels) / n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if stamps is not None:
            stamps.append(time.perf_counter())
    return torch.stack(losses).tolist()


@dataclass
class TrainBench:
    """One backend ready to train: its model (trainable parts set as the engine does), examples of its task, the
    collator, and the initial weights every timed run starts from."""

    name: str
    model: torch.nn.Module
    processor: object
    collator: object
    examples: list
    task: str
    modality: str
    device: torch.device
    dtype: torch.dtype
    init: dict = field(default_factory=dict)

    def config(self, n_steps: int):
        from mmcl.config import TrainConfig

        return TrainConfig(epochs=1000, max_steps=n_steps, batch_size=BATCH_SIZE, lr=1e-3, warmup_ratio=0.03)

    def plan(self, n_steps: int) -> list[list[int]]:
        from mmcl.engine.train import global_batches

        return global_batches(len(self.examples), self.config(n_steps), SEED)

    def reset(self) -> None:
        """Same weights, no gradients, same torch RNG state (dropout masks), garbage collected: before every run."""
        self.model.load_state_dict(self.init)
        self.model.zero_grad(set_to_none=True)
        gc.collect()
        torch.manual_seed(SEED)

    def engine(self, n_steps: int) -> benchutil.Timed:
        """`fit` for `n_steps` steps (the time at each step's end taken by its `on_step` callback)."""
        from accelerate import Accelerator

        from mmcl.engine.train import fit

        cfg = self.config(n_steps)
        accelerator = Accelerator(cpu=self.device.type == "cpu", mixed_precision="no")
        stamps: list[float] = []
        self.reset()
        t, c = time.perf_counter(), time.process_time()
        res = fit(self.model, self.examples, self.collator, cfg, accelerator, seed=SEED, label="bench", progress=False,
                  on_step=lambda step, loss: stamps.append(time.perf_counter()))
        dt, dc = time.perf_counter() - t, time.process_time() - c
        assert res.steps == n_steps, res
        return benchutil.Timed(n_steps / dt, n_steps / dc, res.losses, stamps)

    def bare(self, n_steps: int) -> benchutil.Timed:
        """`bare_loop` over the same plan of batches."""
        cfg = self.config(n_steps)
        stamps: list[float] = []
        self.reset()
        t, c = time.perf_counter(), time.process_time()
        plan = self.plan(n_steps)
        losses = bare_loop(self.model, self.examples, self.collator, cfg, plan, self.device, self.dtype, stamps)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        assert len(losses) == n_steps
        return benchutil.Timed(n_steps / dt, n_steps / dc, losses, stamps)

    def sizes(self) -> dict:
        return {
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "trainable_parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "tokens_per_row": self.collator([self.examples[0]]).input_ids.shape[1],
        }


def load_bench(name: str, world: Path, model_path: Path, scratch: Path) -> TrainBench:
    """Backend `name` on its tiny model, training the engine's default parts on the built-in world's task of the
    modality it reads (`benchutil.TASK_FOR_MODALITY`)."""
    from mmcl.config import ModelConfig
    from mmcl.data.batching import Collator, encode_records
    from mmcl.engine.setup import set_trainable

    benchutil.quiet_hf()
    model, processor, media = benchutil.load(benchutil.backend_model_path(name, model_path, scratch))
    modality = benchutil.backend_modality(processor)
    task = benchutil.TASK_FOR_MODALITY[modality]
    set_trainable(model, ModelConfig().train, {modality})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    dtype = next(model.parameters()).dtype
    _, recs = benchutil.records(world, task, "train")
    bench = TrainBench(name, model, processor, Collator(processor, media), encode_records(recs, processor, task),
                       task, modality, device, dtype)
    bench.init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # every example's media decoded into the loader's cache now, outside any timing: a warm-up shorter than an
    # epoch would otherwise leave the rest to the first timed run (the engine's, in round 0)
    for i in range(0, len(bench.examples), BATCH_SIZE):
        bench.collator(bench.examples[i : i + BATCH_SIZE])
    return bench


def warm_and_size(bench: TrainBench, runs, mode: dict) -> int:
    """Warm both sides up (allocator and kernels warm, lazy imports done; `load_bench` filled the media cache) and
    return the steps of a timed run: about `run_s` seconds of steps at the slower side's warm-up loop rate (its
    per-call set-up left out, so a side with a large set-up does not shorten the runs), within the mode's bounds."""
    rates = []
    for run in runs:
        run(mode["warm_steps"])
        timed = run(mode["warm_steps"])
        rates.append(timed.loop_rate or timed.rate)
    return max(mode["min_steps"], min(mode["max_steps"], round(mode["run_s"] * min(rates))))


def measure(bench: TrainBench, baseline, mode: dict, budget_s: float, log=None) -> dict:
    """Engine vs `baseline` (a run function like `TrainBench.bare`) on one backend: warm-up, then paired rounds until
    the interval is within ±HALF_WIDTH (or max_rounds, or `budget_s` seconds of rounds)."""
    steps = warm_and_size(bench, (bench.engine, baseline), mode)
    r = benchutil.paired_rounds(bench.engine, baseline, steps=steps, min_rounds=mode["min_rounds"],
                                max_rounds=mode["max_rounds"], budget_s=budget_s, half_width=HALF_WIDTH, log=log)
    r.update(task=bench.task, modality=bench.modality, warmup_steps=mode["warm_steps"], **bench.sizes())
    return r


def over_backends(label: str, baseline_of, backends, mode: dict, log=print) -> dict[str, dict]:
    """`measure` for each backend against `baseline_of(bench, scratch)` (a run function), the rounds' time budget
    shared: each backend gets the rest of the total (mode budget_s x backends) over the backends still to go."""
    world, model_path = benchutil.world_and_model_paths()
    out: dict[str, dict] = {}
    total, spent = mode["budget_s"] * len(backends), 0.0
    with tempfile.TemporaryDirectory(prefix="mmcl-bench-") as scratch:
        for k, name in enumerate(backends):
            t = time.perf_counter()
            bench = load_bench(name, world, model_path, Path(scratch))
            budget = max(0.0, total - spent) / (len(backends) - k)
            r = measure(bench, baseline_of(bench, Path(scratch)), mode, budget)
            spent += r["seconds"]
            r["device"] = str(bench.device)
            out[name] = r
            ci = r["interval"]
            if log:
                log(f"[{label}] {name}: {ci['ratio']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"
                    f" ±{100 * ci['rel_half_width']:.1f}% over {r['rounds']} rounds of {r['steps_per_round']} steps"
                    f" ({time.perf_counter() - t:.0f} s), max loss diff {r['max_loss_diff']:.1e}", flush=True)
            del bench
            gc.collect()
    return out


def run(quick: bool = False, backends: tuple[str, ...] = benchutil.BACKENDS, log=print) -> dict:
    mode = MODES["quick" if quick else "full"]
    out = over_backends("train: engine ÷ bare", lambda bench, scratch: bench.bare, backends, mode, log)
    for r in out.values():
        r["goal"] = GOAL
        r["passed"] = r["interval"]["ratio"] >= GOAL
    return {
        "name": "train",
        "batch_size": BATCH_SIZE,
        "device": next(iter(out.values()))["device"],
        "mode": mode,
        "half_width": HALF_WIDTH,
        "goal": GOAL,
        "backends": out,
        "passed": all(r["passed"] for r in out.values()),
    }


if __name__ == "__main__":
    import json

    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    torch.set_num_threads(1)
    print(json.dumps(run("--quick" in sys.argv, tuple(args) or benchutil.BACKENDS), indent=2))
