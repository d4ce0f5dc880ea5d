"""EWC (Kirkpatrick et al. 2017) as P3's regularization baseline: squared-gradient importance, max-merged."""

from __future__ import annotations

from mmcl.strategies._importance import ImportanceOptions, ImportanceRegularizer
from mmcl.strategies.registry import register_strategy

EWCOptions = ImportanceOptions
"""Options of `ewc`: lambda_, scale_by_numel, batch_size, max_samples (documented on ImportanceOptions)."""


@register_strategy("ewc")
class EWC(ImportanceRegularizer):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017) in P3's form ("Continual Instruction Tuning for
    Large Multimodal Models", He et al. 2023).

    Rule: after task t, one pass over its training examples (eval mode, lr 0) gives Ω_t = mean over batches of g²,
    g = ∂(token-mean cross-entropy)/∂θ for the trainable parameters; Ω_t is normalised to sum to 1 and merged into
    Ω by element-wise max (P3's Id map records which task supplied each max; ties keep the older task). θ* = the
    trainable weights at the end of task t. While training task t+1 the loss gains
    λ_eff·Σ_k Ω_k (θ_k − θ*_k)², λ_eff = λ·N with `scale_by_numel` (N = trainable elements), else λ.
    State across tasks: Ω (float32), the Id map (int16) and θ* (weights' dtype), each the size of the trainable
    parameters (≈ 10 bytes per trainable element in float32), plus the list of merged tasks. Extra compute: one
    forward+backward pass over each task's data at its end; the penalty is four fused foreach kernels per step.
    Composition: put `ewc` after strategies that change weights at task end (ema); use LoRA in `carry` mode.
    """

    Config = EWCOptions
    kind = "ewc"
