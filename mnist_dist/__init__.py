"""mnist_dist: MNIST-like image classifiers (the record: an MLP) trained with Hugging Face Accelerate on CPUs,
GPUs and cluster nodes."""

import os

# MKL's strict conditional numerical reproducibility: its matrix products give the same bits at any
# thread count (measured: 1 and 2 threads differ without it, and run no slower with it; benchmarks/
# README.md), so that a CPU run's weights do not follow the machine's load. Read when MKL first
# computes, which is after this; a value the user set wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from . import clock  # noqa: E402,F401  the start-up clock is read first, before any heavy import

__version__ = "0.1.0"
