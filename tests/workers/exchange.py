"""Launched on N CPU processes by test_distributed.py: DDP with exchange_gradients against DDP's all-reduce.

    exchange.py OUT.safetensors

Two copies of the same MLP train for a few SGD steps, each process on its own random batches: one
averages gradients with DDP's all-reduce (gloo's ring), the other with `exchange_gradients`. Process 0
writes every process's final weights of both, and how many buckets the exchange saw.
"""

import sys

import torch
import torch.distributed as dist
from accelerate.utils import gather
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from mnist_dist.config import TrainConfig
from mnist_dist.distributed import GradientExchange, build_accelerator, exchange_gradients, setup_gradient_sync
from mnist_dist.model import MLP

STEPS = 5


def main() -> None:
    out = sys.argv[1]
    accelerator = build_accelerator(TrainConfig(cpu=True).validate())
    world, rank = accelerator.num_processes, accelerator.process_index
    weights, exchange = {}, GradientExchange()
    for mode in ("allreduce", "exchange"):
        torch.manual_seed(0)
        # a wider layer and 1 MB buckets: the first step sends two buckets; DDP then rebuilds them
        # into one of another size, which the exchange's buffers must follow
        model = DistributedDataParallel(MLP(hidden_size=1024), bucket_cap_mb_list=[1])
        if mode == "exchange":
            model.register_comm_hook(exchange, exchange_gradients)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        data = torch.Generator().manual_seed(100 + rank)  # each process its own batches
        for _ in range(STEPS):
            inputs, labels = torch.randn(64, 784, generator=data), torch.randint(0, 10, (64,), generator=data)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), labels).backward()
            optimizer.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        weights[mode] = gather(flat[None]).contiguous()  # [world, parameters]: every process's weights
    auto = setup_gradient_sync(accelerator, DistributedDataParallel(MLP(hidden_size=4)), "auto")
    if rank == 0:
        save_file({**weights, "world": torch.tensor(world), "buckets": torch.tensor(len(exchange.buffers))}, out)
        print(f"--gradient-sync auto: {auto}")
    dist.barrier()


if __name__ == "__main__":
    main()
