"""Launched on N CPU processes by test_distributed.py: DDP with the CPU gradient syncs against DDP's all-reduce.

    exchange.py OUT.safetensors     train and write the weights
    exchange.py --peer-exits        the last process leaves before its first gradient sync

Three copies of the same MLP train for a few SGD steps, each process on its own random batches: one
averages gradients with DDP's all-reduce (gloo's ring), one with `exchange_gradients`, one with
`shared_memory_gradients`. Process 0 writes every process's final weights of each, and how many
buckets the exchange saw and how many times the shared-memory hook ran.
"""

import os
import sys

import torch
import torch.distributed as dist
from accelerate.utils import gather
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from mnist_dist.config import TrainConfig
from mnist_dist.distributed import (
    GradientExchange, SharedGradients, build_accelerator, exchange_gradients, setup_gradient_sync,
    shared_memory_gradients,
)
from mnist_dist.model import MLP

STEPS = 5


def train(model, rank: int, steps: int = STEPS) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.Generator().manual_seed(100 + rank)  # each process its own batches
    for _ in range(steps):
        inputs, labels = torch.randn(64, 784, generator=data), torch.randint(0, 10, (64,), generator=data)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()


def main() -> None:
    accelerator = build_accelerator(TrainConfig(cpu=True).validate())
    world, rank = accelerator.num_processes, accelerator.process_index
    if sys.argv[1] == "--peer-exits":
        model = DistributedDataParallel(MLP(hidden_size=16))
        shared, why_not = SharedGradients.open(model)
        assert shared is not None, why_not
        model.register_comm_hook(shared, shared_memory_gradients)
        if rank == world - 1:
            os._exit(0)  # as a crashed process would: no goodbye, its pipes close
        train(model, rank)
        return
    weights, exchange, shared = {}, GradientExchange(), None
    for mode in ("allreduce", "exchange", "shared-memory"):
        torch.manual_seed(0)
        # a wider layer and 1 MB buckets: the first step syncs two buckets; DDP then rebuilds them
        # into one of another size, which the hooks' buffers must follow
        model = DistributedDataParallel(MLP(hidden_size=1024), bucket_cap_mb_list=[1])
        if mode == "exchange":
            model.register_comm_hook(exchange, exchange_gradients)
        if mode == "shared-memory":
            shared, why_not = SharedGradients.open(model)
            assert shared is not None, why_not
            model.register_comm_hook(shared, shared_memory_gradients)
        train(model, rank)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        weights[mode] = gather(flat[None]).contiguous()  # [world, parameters]: every process's weights
    auto = setup_gradient_sync(accelerator, DistributedDataParallel(MLP(hidden_size=4)), "auto")
    if rank == 0:
        save_file({**weights, "world": torch.tensor(world), "buckets": torch.tensor(len(exchange.buffers)),
                   "shared_calls": torch.tensor(shared.calls)}, sys.argv[1])
        print(f"--gradient-sync auto: {auto}")
    dist.barrier()


if __name__ == "__main__":
    main()
