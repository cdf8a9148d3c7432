"""Gluon (Hopper, sm_90) kernels: the second kernel family (issue 16), in progress.

Nothing outside this package contains Gluon code. Not registered as a backend yet:
the kernels here compile for sm_90 (``scripts/compile_sm90.py``) and wait for their
first GPU run (``tests/test_gluon_gpu.py``).
"""
