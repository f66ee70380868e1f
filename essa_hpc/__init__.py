"""essa_hpc: ESSA (Evolutionary Strategies for Scalable Alignment, arXiv 2507.04453) on MPI/SLURM clusters."""

import logging

__version__ = "0.1.0"

# torchao (int8/int4 for the hf backend) probes optional CUDA kernels when transformers imports it and
# logs one warning per missing kernel on CPU-only builds; they say nothing about this project's runs.
logging.getLogger("torchao").setLevel(logging.ERROR)
