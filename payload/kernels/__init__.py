"""Triton kernels and what runs them: `interpret` lets Triton kernels (Liger's, Ferry's)
run on a CPU through Triton's interpreter, for tests and CPU-only runs."""
