"""Model builders: the built-in tiny MLLM, mmcl model directories and LLaVA checkpoints."""
