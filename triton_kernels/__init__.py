"""Triton kernels of topv (only @triton.jit code); installed as topv.triton_kernels."""
