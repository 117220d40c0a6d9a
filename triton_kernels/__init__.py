"""Triton kernels for hyperfused, importable on their own (they never import hyperfused).

Each op's module holds its @triton.jit kernels and the thin launcher/driver around them; the torch.library
registration lives in hyperfused/ops. On a machine without a GPU the kernels run under the Triton
interpreter (TRITON_INTERPRET=1), which the tests use.
"""
