"""Step time of the small model's shape with a frozen image tower, with and without the feature cache.

The model is the `small` model's architecture built from configs with random weights (DINOv2-S/14 at 224 px,
pooled 4x4 to 16 tokens; SmolLM2-135M's Llama shape), so timing needs no download and no prepared weights. The
setting is LLaVA stage 1 (projectors trained, tower and language model frozen). Side a reads every image's
features from a warm cache; side b runs the tower. Both train the same batches from the same weights, so their
losses must be equal. Also measured: the cache's disk cost per image.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_feature_cache.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import benchutil  # noqa: E402


def small_shaped(quick: bool):
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    from mmcl.models.feature_cache import FeatureCache  # noqa: F401  (import check)
    from mmcl.models.mllm import ModalitySpec, MultimodalLM

    torch.manual_seed(0)
    layers = 4 if quick else 30
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=49153, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                      tie_word_embeddings=True, max_position_embeddings=512))
    tower = Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=4 if quick else 12, num_attention_heads=6,
                                     patch_size=14, image_size=224))
    spec = ModalitySpec("<image>", 16, "mlp2x_gelu", pool=4, pool_mode="grid", image_size=224)
    model = MultimodalLM(lm, {"image": tower}, {"image": spec}, {"image": 49152})
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.projectors.parameters():
        p.requires_grad_(True)
    return model.eval()


def run(quick: bool = False, log=print) -> dict:
    from mmcl.models.feature_cache import FeatureCache

    torch.set_num_threads(1)
    model = small_shaped(quick)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(16, 3, 224, 224, generator=g)
    batch, text = 8, 40
    plan = [torch.randperm(16, generator=g)[:batch] for _ in range(64)]
    ids = torch.randint(0, 49152, (batch, text), generator=g)
    ids[:, 2:18] = 49152  # 16 image positions
    start = copy.deepcopy(model.projectors.state_dict())
    scratch = Path(tempfile.mkdtemp(prefix="mmcl-bench-cache-"))
    cache = FeatureCache(scratch / "features")

    def train(steps: int, cached: bool) -> benchutil.Timed:
        model.projectors.load_state_dict(start)
        model.feature_cache = cache if cached else None
        opt = torch.optim.AdamW(model.projectors.parameters(), lr=1e-4)
        losses, stamps = [], []
        t0, c0 = time.perf_counter(), time.process_time()
        for step in range(steps):
            images = pool[plan[step]]
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), media={"image": images}).logits
            loss = torch.nn.functional.cross_entropy(logits[:, 17:-1].flatten(0, 1), ids[:, 18:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            stamps.append(time.perf_counter())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return benchutil.Timed(steps / wall, steps / cpu, losses, stamps)

    model.feature_cache = cache
    with torch.no_grad():
        model.encoder_features("image", pool)  # warm: every image's features on disk
    disk = cache.disk_bytes()
    steps = 2 if quick else 3
    result = benchutil.paired_rounds(lambda n: train(n, True), lambda n: train(n, False), steps=steps,
                                     min_rounds=2 if quick else 6, max_rounds=2 if quick else 20,
                                     budget_s=30 if quick else 420, half_width=0.05, log=log)
    image_bytes = pool[0].numel() * pool[0].element_size()
    out = {"machine": benchutil.machine(), "quick": quick, "lm_layers": model.language_model.config.num_hidden_layers,
           "speedup": result["interval"], "cpu_speedup": result["cpu_interval"], "rounds": result["rounds"],
           "max_loss_diff": result["max_loss_diff"], "cached_steps_per_s": result["a_steps_per_s"]["median"],
           "uncached_steps_per_s": result["b_steps_per_s"]["median"], "disk_bytes_per_image": disk / len(pool),
           "decoded_image_bytes": image_bytes, "goal": 3.0}
    out["passed"] = out["speedup"]["low"] >= out["goal"]
    log(f"feature cache: {out['speedup']['ratio']:.2f}x [{out['speedup']['low']:.2f}, {out['speedup']['high']:.2f}] "
        f"steps/s vs no cache; {out['disk_bytes_per_image'] / 1024:.1f} KiB per image on disk")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer model, 2 rounds: checks the script runs")
    args = parser.parse_args()
    print(json.dumps(run(args.quick), indent=2))
