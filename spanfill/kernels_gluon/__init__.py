"""Gluon (Hopper, sm_90) kernels: the second kernel family (issue 16).

Nothing outside this package contains Gluon code. The backend registry reaches it
through ``spanfill/backends/gluon.py``; CI compiles it for sm_90
(``scripts/compile_sm90.py``) and the GPU suite runs it (``tests/test_gluon_gpu.py``).
"""
