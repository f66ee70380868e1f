"""essa_hpc: ESSA (Evolutionary Strategies for Scalable Alignment, arXiv 2507.04453) on MPI/SLURM clusters."""

__version__ = "0.1.0"
