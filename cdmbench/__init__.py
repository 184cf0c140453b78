"""cdmbench: a benchmark suite for few-step diffusion distillation. No heavy imports here."""

__version__ = "0.1.0"
