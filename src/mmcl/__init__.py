"""mmcl: continual instruction tuning of multimodal LLMs, with every published method and honest forgetting metrics."""

__version__ = "0.1.0"
