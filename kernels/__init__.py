"""Triton kernels of anygpt_engine, one op family per file.

This folder is installed as the subpackage `anygpt_engine.kernels` (setup.py maps it with
package_dir), so `from anygpt_engine.kernels import rms_norm` works in editable and normal
installs alike. Kernels here take tensors and launch; argument checks live in anygpt_engine.ops.
On a CPU they run under TRITON_INTERPRET=1 (set before the first @triton.jit runs).
"""
