"""mnist_dist: MNIST-like image classifiers (the record: an MLP) trained with Hugging Face Accelerate on CPUs,
GPUs and cluster nodes."""

from . import clock  # noqa: F401  the start-up clock is read first, before any heavy import

__version__ = "0.1.0"
