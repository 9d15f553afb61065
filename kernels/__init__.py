"""Triton kernels of bimatting_triton, installed as ``bimatting_triton.kernels``.

Each op lives in its own module beside the plain-PyTorch reference it must equal.
Under ``TRITON_INTERPRET=1`` (set before import) the kernels run on the CPU.
"""
