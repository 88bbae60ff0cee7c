"""perta-lightning: unlearning in LLMs by per-parameter task arithmetic (PerTA)."""

__version__ = "0.1.0"
