"""MAS (Aljundi et al. 2018) as P3's regularization baseline: output-sensitivity importance, max-merged."""

from __future__ import annotations

from mmcl.strategies._importance import ImportanceOptions, ImportanceRegularizer
from mmcl.strategies.registry import register_strategy

MASOptions = ImportanceOptions
"""Options of `mas`: lambda_, scale_by_numel, batch_size, max_samples (documented on ImportanceOptions)."""


@register_strategy("mas")
class MAS(ImportanceRegularizer):
    """Memory Aware Synapses (Aljundi et al. 2018) in P3's form ("Continual Instruction Tuning for Large
    Multimodal Models", He et al. 2023).

    Rule: after task t, one pass over its training examples (eval mode, lr 0) gives Ω_t = mean over batches of
    |∂s/∂θ|, s = mean over the supervised positions of ‖logits‖²₂ (P3 averages over all positions; we leave out
    prompt and padding so the estimate does not depend on batch padding). Ω_t is normalised to sum to 1 and merged
    into Ω by element-wise max (P3's Id map records which task supplied each max; ties keep the older task).
    θ* = the trainable weights at the end of task t. While training task t+1 the loss gains
    λ_eff·Σ_k Ω_k (θ_k − θ*_k)², λ_eff = λ·N with `scale_by_numel` (N = trainable elements), else λ.
    State across tasks: Ω (float32), the Id map (int16) and θ* (weights' dtype), each the size of the trainable
    parameters (≈ 10 bytes per trainable element in float32), plus the list of merged tasks. No labels are needed
    by the surrogate, but the pass runs on the task's training examples. Composition: as `ewc`.
    """

    Config = MASOptions
    kind = "mas"
