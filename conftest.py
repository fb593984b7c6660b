"""Settings for every pytest run (unit tests and the nbval run of the notebooks).

The book's models are tiny; on small or shared CPUs, OpenMP threads cost more than they give (on a
2-vCPU virtual machine we measured notebooks 3-20x slower with 2 threads than with 1). The test run
therefore uses one thread unless OMP_NUM_THREADS is already set. This runs before torch is imported,
and notebook kernels started by nbval inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
