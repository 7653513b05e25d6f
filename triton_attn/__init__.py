"""Hand-written Triton kernels (attention.py: fused attention forward + backward; bench_attention.py: its benchmark)."""
