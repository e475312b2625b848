"""Triton kernels, installed as `minillama.kernels` (never as a top-level `kernels` module,
which would shadow Hugging Face's package of that name)."""
