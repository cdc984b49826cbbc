"""qvec_jax: zero-shot quantization via weight-space arithmetic (arXiv 2604.03420)."""
