"""mnist_dist: an MNIST MLP trained with Hugging Face Accelerate on CPUs, GPUs and cluster nodes."""

__version__ = "0.1.0"
