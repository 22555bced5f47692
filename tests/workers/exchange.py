"""Launched on N CPU processes by test_distributed.py: the CPU gradient syncs against DDP's all-reduce.

    exchange.py OUT.safetensors     train and write the weights
    exchange.py --peer-exits        a parameter without a gradient is named; then the last process
                                    leaves before its first gradient sync

Three copies of the same MLP train for a few SGD steps, each process on its own random batches: one
averages gradients with DDP's all-reduce (gloo's ring), one with `exchange_gradients` (a DDP hook),
one with `SharedGradients.average` after backward, outside DDP. Process 0 writes every process's final
weights of each, how many buckets the exchange saw and how many times the shared memory averaged.
"""

import os
import sys
from contextlib import nullcontext
from unittest import mock

import torch
import torch.distributed as dist
from accelerate.utils import gather
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from mnist_dist.config import ConfigError, TrainConfig
from mnist_dist.distributed import (
    GradientExchange, SharedGradients, build_accelerator, exchange_gradients, setup_gradient_sync,
)
from mnist_dist.model import MLP

STEPS = 5


def train(model, rank: int, average=None, steps: int = STEPS) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.Generator().manual_seed(100 + rank)  # each process its own batches
    for _ in range(steps):
        inputs, labels = torch.randn(64, 784, generator=data), torch.randint(0, 10, (64,), generator=data)
        optimizer.zero_grad(set_to_none=True)  # as the training loop: fresh gradient tensors each step
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        if average is not None:
            average()
        optimizer.step()


def main() -> None:
    # bf16: only models the accelerator prepares run under its autocast, here the last one
    accelerator = build_accelerator(TrainConfig(cpu=True, mixed_precision="bf16").validate())
    world, rank = accelerator.num_processes, accelerator.process_index
    if sys.argv[1] == "--peer-exits":
        model = MLP(hidden_size=16)
        model.unused = torch.nn.Parameter(torch.zeros(3))  # takes no part in the forward pass
        shared, why_not = SharedGradients.open(model)
        assert shared is not None, why_not
        try:
            train(model, rank, shared.average, steps=1)
        except RuntimeError as e:
            print(f"process {rank}: {e}", flush=True)
        model = MLP(hidden_size=16)
        shared, why_not = SharedGradients.open(model)
        assert shared is not None, why_not
        if rank == world - 1:
            os._exit(0)  # as a crashed process would: no goodbye, its pipes close
        train(model, rank, shared.average)
        return
    weights, exchange, shared = {}, GradientExchange(), None
    for mode in ("allreduce", "exchange", "shared-memory"):
        torch.manual_seed(0)
        # a wider layer and 1 MB buckets: the first step syncs two buckets; DDP then rebuilds them
        # into one of another size, which the hooks' buffers must follow
        model = DistributedDataParallel(MLP(hidden_size=1024), bucket_cap_mb_list=[1])
        if mode == "exchange":
            model.register_comm_hook(exchange, exchange_gradients)
        if mode == "shared-memory":  # DDP only set up the weights: the step runs the module itself
            model = model.module
            shared, why_not = SharedGradients.open(model)
            assert shared is not None, why_not
        train(model, rank, shared.average if mode == "shared-memory" else None)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        weights[mode] = gather(flat[None]).contiguous()  # [world, parameters]: every process's weights
    sync = setup_gradient_sync(accelerator, accelerator.prepare(MLP(hidden_size=4)), "auto")
    # a model Accelerate compiled (dynamo_backend) is torch.compile's wrapper around DDP; nothing compiles here,
    # as nothing calls it
    compiled = setup_gradient_sync(accelerator, torch.compile(accelerator.prepare(MLP(hidden_size=4))), "auto")
    dtypes = []  # the module the step runs outside DDP must keep Accelerate's autocast
    sync.model.fc1.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    sync.model(torch.zeros(1, 784))
    # the last process says it is on another machine: auto must fall back to the exchange, saying why,
    # and an explicit shared-memory must be refused
    with mock.patch("socket.gethostname", return_value="another-node") if rank == world - 1 else nullcontext():
        apart = setup_gradient_sync(accelerator, accelerator.prepare(MLP(hidden_size=4)), "auto")
        compiled_apart = setup_gradient_sync(accelerator, torch.compile(accelerator.prepare(MLP(hidden_size=4))), "auto")
        try:
            setup_gradient_sync(accelerator, accelerator.prepare(MLP(hidden_size=4)), "shared-memory")
            refused = "not refused"
        except ConfigError as e:
            refused = str(e)
    if rank == 0:
        save_file({**weights, "world": torch.tensor(world), "buckets": torch.tensor(len(exchange.buffers)),
                   "shared_calls": torch.tensor(shared.calls)}, sys.argv[1])
        print(f"--gradient-sync auto: {sync.mode}, {type(sync.model).__name__} forward in {dtypes[0]}")
        print(f"--gradient-sync auto on two hosts: {apart.mode}, {type(apart.model).__name__}")
        print(f"--gradient-sync shared-memory on two hosts: {refused}")
        for name, s in (("one host", compiled), ("two hosts", compiled_apart)):
            print(f"compiled, --gradient-sync auto on {name}: {s.mode}, {type(s.model).__name__} of "
                  f"{type(s.model._orig_mod).__name__}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main()
