"""Tests of the Triton kernels (kernels/), run under TRITON_INTERPRET=1 on CPU."""
