"""vitdiff: from the Vision Transformer to diffusion models, built from scratch and tested."""

__version__ = "0.1.0"
