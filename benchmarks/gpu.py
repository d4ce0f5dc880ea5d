"""GPU benchmark: LoRA training of a ~1.1B Llama-style model (random weights, built from a config, nothing downloaded)
in bf16 with activation checkpointing, through mmcl's own training loop (`mmcl.engine.train.fit`, what `mmcl run`
trains with) and through Hugging Face's `Trainer`, plus batched vs batch-1 generation. One run, < 8 minutes on one
H100/H200; it writes the section between `<!-- bench:gpu -->` markers of BENCHMARKS.md, naming the machine.

    python benchmarks/gpu.py               # on a CUDA machine: measures and writes BENCHMARKS.md
    python benchmarks/gpu.py --dry-run     # anywhere (CPU or GPU): a tiny config, a few steps of each measurement

Measured: tokens/s of `fit` (after a warm-up call; both loops timed from the end of their first step to the end of
their last, see StepClock), model FLOPs utilisation = 6·N·tokens/s ÷
the GPU's peak dense bf16 FLOP/s (PEAK_BF16 below; N = all parameters, the PaLM convention: 2N forward + 4N
backward; with LoRA and activation checkpointing the executed matmul work is also ~6N (forward, recomputed forward,
input gradients), attention's sequence-length term is left out), peak allocated memory; the same model, data, batch,
steps, optimizer and checkpointing through `Trainer` (tokens/s ratio); greedy generation of the same prompts one at
a time vs in one batch (time-per-prompt ratio). Goals, printed beside the results: MFU >= 40 %, >= 1.2x Trainer,
batched generation >= 10x.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GOALS = {"mfu": 0.40, "vs_trainer": 1.2, "batched_eval": 10.0}
PEAK_BF16 = [  # (substring of torch.cuda.get_device_name(), dense bf16 FLOP/s from the vendor's data sheet)
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12), ("RTX 4090", 165e12),
]


@dataclass
class Setup:
    """Model and workload sizes; FULL is the GPU run, DRY the CPU check of the same code."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    seq: int
    batch: int
    steps: int
    warm_steps: int
    lora_r: int
    prompts: int
    single_prompts: int
    new_tokens: int


FULL = Setup(hidden=2048, layers=16, heads=16, kv_heads=8, intermediate=8192, vocab=32000, seq=1024, batch=8,
             steps=40, warm_steps=3, lora_r=16, prompts=64, single_prompts=8, new_tokens=32)
DRY = Setup(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256, seq=32, batch=2, steps=3,
            warm_steps=1, lora_r=4, prompts=4, single_prompts=2, new_tokens=2)


def peak_flops(name: str) -> float | None:
    """The dense bf16 peak of the GPU named `name` (first matching table row), None if not in the table."""
    return next((f for key, f in PEAK_BF16 if key in name), None)


def mfu(n_params: int, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation: 6·N FLOPs per token (forward 2N + backward 4N) at `tokens_per_s`, over `peak`."""
    return 6 * n_params * tokens_per_s / peak


class StepClock:
    """Timestamps at the end of every optimizer step (after a device sync); tokens/s is measured from the end of
    the first step to the end of the last, so neither loop's per-call set-up nor its first step counts."""

    def __init__(self, device: str):
        self.device, self.times = device, []

    def tick(self, *_) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def tokens_per_s(self, tokens_per_step: int) -> float:
        return tokens_per_step * (len(self.times) - 1) / (self.times[-1] - self.times[0])


def build_model(s: Setup, device: str):
    """A Llama-style causal LM from a config (seeded random weights, bf16), LoRA on every attention and MLP
    projection through PEFT, activation checkpointing on."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                      num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate, vocab_size=s.vocab,
                      max_position_embeddings=max(2048, s.seq + s.new_tokens), pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        lm = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n_params = sum(p.numel() for p in lm.parameters())
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(lm, LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, target_modules=targets))
    return model, n_params


class CausalLM(torch.nn.Module):
    """The PEFT model behind the interface `fit` trains (forward(ids, mask) -> .logits; no media inputs)."""

    def __init__(self, peft_model):
        super().__init__()
        self.inner = peft_model

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    def media_inputs(self, media, input_ids) -> dict:
        return {}


def examples(s: Setup, n: int):
    """n random token sequences of length `seq`, every next token supervised (mmcl's Example)."""
    from mmcl.data.batching import Example

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, s.vocab, (n, s.seq), generator=g).tolist()
    return [Example(f"x{i}", row, list(row), {}, "bench") for i, row in enumerate(ids)]


def train_config(s: Setup, steps: int):
    from mmcl.config import TrainConfig

    return TrainConfig(epochs=1, max_steps=steps, batch_size=s.batch, lr=1e-4, warmup_ratio=0.0, schedule="constant",
                       precision="bf16", activation_checkpointing=True)


def bench_mmcl(model, s: Setup, device: str) -> dict:
    from mmcl.config import RunConfig
    from mmcl.data.batching import Collator
    from mmcl.engine.setup import make_accelerator
    from mmcl.engine.train import fit

    accelerator = make_accelerator(RunConfig(train=train_config(s, s.steps)))  # as `mmcl run` makes it
    collator = Collator(type("Pad", (), {"pad_id": 0})(), media=None)
    net = CausalLM(model)
    fit(net, examples(s, s.batch * s.warm_steps), collator, train_config(s, s.warm_steps), accelerator, seed=0,
        progress=False)  # warm-up: kernels, allocator, autotuning
    data = examples(s, s.batch * s.steps)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock(device)
    result = fit(net, data, collator, train_config(s, s.steps), accelerator, seed=0, progress=False,
                 on_step=clock.tick)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return {"tokens_per_s": clock.tokens_per_s(s.batch * s.seq), "peak_memory_gib": peak / 2**30,
            "loss_first": result.losses[0], "loss_last": result.losses[-1], "steps": result.steps}


def bench_trainer(model, s: Setup, device: str, out_dir: Path) -> dict:
    """The same model, data, batch and steps through `Trainer` (its own loop, bf16 autocast, checkpointing on)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    clock = StepClock(device)

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    data = [{"input_ids": torch.tensor(e.input_ids), "labels": torch.tensor(e.labels),
             "attention_mask": torch.ones(s.seq, dtype=torch.long)} for e in examples(s, s.batch * s.steps)]
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=s.batch, max_steps=s.steps,
                             learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, bf16=True,
                             activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
                             logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True,
                             dataloader_num_workers=0, use_cpu=device == "cpu", max_grad_norm=1.0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Tick()]).train()
    assert len(clock.times) == s.steps, f"the Trainer ran {len(clock.times)} steps, not {s.steps}"
    return {"tokens_per_s": clock.tokens_per_s(s.batch * s.seq)}


def bench_generation(model, s: Setup, device: str) -> dict:
    """Greedy generation of `new_tokens` tokens (exactly: min_new_tokens) for prompts of half the sequence length:
    the first `single_prompts` one at a time, then all `prompts` in one left-padded batch; seconds per prompt."""
    model.eval()
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, s.vocab, (s.prompts, s.seq // 2), generator=g).to(device)
    kw = dict(max_new_tokens=s.new_tokens, min_new_tokens=s.new_tokens, do_sample=False, pad_token_id=0,
              use_cache=True)

    def timed(ids) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(prompts[:1])  # warm-up
    single = sum(timed(prompts[i : i + 1]) for i in range(s.single_prompts)) / s.single_prompts
    batched = timed(prompts) / s.prompts
    model.train()
    return {"single_s_per_prompt": single, "batched_s_per_prompt": batched, "ratio": single / batched}


def render(r: dict) -> list[str]:
    s, mfu = r["setup"], r["mfu"]

    def goal(ok: bool | None) -> str:
        return "–" if ok is None else ("met" if ok else "not met")

    mfu_text = f"{100 * mfu:.1f} %" if mfu is not None else "– (GPU not in the peak table)"
    return [
        "## GPU: LoRA training and generation of a 1B-class model",
        "",
        f"Machine: {r['machine']}; torch {r['torch']}, transformers {r['transformers']}, peft {r['peft']}. "
        f"Llama-style model from a config (random weights): {r['params'] / 1e6:,.1f} M parameters (hidden "
        f"{s['hidden']}, {s['layers']} layers, {s['heads']} heads / {s['kv_heads']} KV heads, vocabulary {s['vocab']}), "
        f"LoRA r={s['lora_r']} on every projection, bf16 weights and autocast, activation checkpointing; batch "
        f"{s['batch']} × {s['seq']} tokens, {s['steps']} steps after {s['warm_steps']} warm-up steps (timed from the end of the first step to the end of the last). "
        f"Reproduce: `python benchmarks/gpu.py` ({r['wall_s']:.0f} s).",
        "",
        "| measure | result | goal | |",
        "|---|---|---|---|",
        f"| mmcl `fit` tokens/s | {r['mmcl']['tokens_per_s']:,.0f} | | |",
        f"| model FLOPs utilisation (6·N·tokens/s ÷ {r['peak_tflops'] or '?'} TFLOP/s) | {mfu_text} | ≥ 40 % | "
        f"{goal(None if mfu is None else mfu >= GOALS['mfu'])} |",
        f"| peak memory (allocated) | {r['mmcl']['peak_memory_gib']:.1f} GiB | | |",
        f"| Hugging Face `Trainer` tokens/s | {r['trainer']['tokens_per_s']:,.0f} | | |",
        f"| mmcl ÷ Trainer | {r['vs_trainer']:.2f}× | ≥ 1.2× | {goal(r['vs_trainer'] >= GOALS['vs_trainer'])} |",
        f"| generation, batch 1 (s per prompt, {s['new_tokens']} new tokens) | {r['gen']['single_s_per_prompt']:.3f} | | |",
        f"| generation, batch {s['prompts']} (s per prompt) | {r['gen']['batched_s_per_prompt']:.4f} | | |",
        f"| batched ÷ batch-1 speed | {r['gen']['ratio']:.1f}× | ≥ 10× | "
        f"{goal(r['gen']['ratio'] >= GOALS['batched_eval'])} |",
    ]


def splice(text: str, lines: list[str]) -> str:
    """`text` with the gpu section (between its markers) replaced, or appended when it has none."""
    block = "\n".join(["<!-- bench:gpu -->", *lines, "<!-- /bench:gpu -->"])
    pattern = re.compile(r"<!-- bench:gpu -->.*?<!-- /bench:gpu -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text)
    return text.rstrip("\n") + "\n\n" + block + "\n"


def run(s: Setup, device: str, out_dir: Path, peak: float | None = None) -> dict:
    import peft
    import transformers

    t0 = time.perf_counter()
    machine = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    machine += " (dry run)" if s is DRY else ""
    model, n_params = build_model(s, device)
    mmcl = bench_mmcl(model, s, device)
    trainer = bench_trainer(model, s, device, out_dir)
    gen = bench_generation(model, s, device)
    peak = peak or (peak_flops(machine) if device == "cuda" else None)
    return {"machine": machine, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "setup": vars(s), "params": n_params, "mmcl": mmcl, "trainer": trainer,
            "gen": gen, "mfu": mfu(n_params, mmcl["tokens_per_s"], peak) if peak else None, "peak_tflops": peak / 1e12 if peak else None,
            "vs_trainer": mmcl["tokens_per_s"] / trainer["tokens_per_s"], "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="a tiny config, a few steps of each measurement (runs on a "
                   "CPU too)")
    p.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md",
                   help="file whose <!-- bench:gpu --> section is written (default BENCHMARKS.md; a dry run writes "
                        "only when given)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for a GPU not in PEAK_BF16")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/mmcl-gpu-bench"), help="the Trainer's output_dir")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU and found none; `--dry-run` checks the set-up on CPU",
              file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r = run(DRY if args.dry_run else FULL, device, args.work_dir, args.peak_tflops and args.peak_tflops * 1e12)
    lines = render(r)
    print("\n".join(lines))
    if not args.dry_run or "--markdown" in (argv if argv is not None else sys.argv[1:]):
        path = args.markdown
        path.write_text(splice(path.read_text() if path.exists() else "", lines))
        print(f"wrote the gpu section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
