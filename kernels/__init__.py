"""The @triton.jit kernels of elman-triton, installed as the package elman_triton.kernels."""
