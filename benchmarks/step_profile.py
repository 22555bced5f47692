"""Where a captured epoch's time goes on a GPU: variants of the graph path's step side by side, in one process.

    python benchmarks/step_profile.py --data-dir /usr/share/datasets/fashion-mnist --dataset fashion_mnist [--profile] [--compile]

Each variant builds the recipe of record's model and fused Adam and, as training does, warms up,
captures epoch 1 in a CUDA graph (`mnist_dist.graphs.EpochGraph`, the `--data-path graph` runner)
and replays it every epoch; it prints one JSON line with the first epoch (warm-up, capture, replay)
and the median of the later epochs in ms and us per step. `--profile` adds torch.profiler's kernel
table for one replayed epoch of the first two variants.
Variants: the finite check and Adam on whole tensors, or on views of `graphs.VIEW_ELEMENTS` elements
(what the graph path does); then with TF32 matmuls and with bf16 autocast; with `--compile`, with the
model's forward compiled by Inductor (both batch shapes compiled before the capture). Without a GPU
every stretch runs eagerly (no capture), which only checks that the script works.
"""

import argparse
import json
import statistics
import time

import torch
from accelerate import Accelerator

from mnist_dist import data, graphs, sources
from mnist_dist.graphs import EpochGraph
from mnist_dist.model import MLP
from mnist_dist.steps import NonFiniteGuard, make_optimizer


def variant(args, accelerator, inputs, labels, name, views=True, tf32=False, bf16=False, compiled=False,
            profile=False) -> None:
    cuda, device = accelerator.device.type == "cuda", accelerator.device
    torch.backends.cuda.matmul.allow_tf32 = tf32
    graphs.VIEW_ELEMENTS = 4096 if views else 2**62  # one view per tensor: the whole tensor
    torch.manual_seed(0)
    model = MLP()
    model, optimizer = accelerator.prepare(model, make_optimizer(model.parameters(), 1e-3, device))
    forward = torch.compile(model, dynamic=False) if compiled else model
    if bf16:
        forward = Autocast(forward, device)
    compile_s = 0.0
    if compiled:  # both batch shapes, before any capture: a capture cannot compile
        began = time.perf_counter()
        for real in {128, len(labels) % 128 or 128}:
            forward(inputs[:real]).sum().backward()
        optimizer.zero_grad(set_to_none=True)
        compile_s = time.perf_counter() - began
    runner = EpochGraph(forward, optimizer, NonFiniteGuard(accelerator, optimizer), inputs, labels, 128, 0,
                        capture=cuda)
    seconds = []
    for epoch in range(args.epochs):
        runner.begin_epoch(epoch)
        _sync(cuda)
        began = time.perf_counter()
        runner.run(0, runner.steps)  # epoch 1: warm-up and capture first
        _sync(cuda)
        seconds.append(time.perf_counter() - began)
    steady = statistics.median(seconds[1:])
    print(json.dumps({"variant": name, "compile_s": round(compile_s, 2), "first_epoch_s": round(seconds[0], 4),
                      "capture_s": round(runner.capture_seconds, 4), "ms_per_epoch": round(1000 * steady, 2),
                      "us_per_step": round(1e6 * steady / runner.steps, 1),
                      "last_loss_sum": runner.losses[-2].item()}), flush=True)
    if profile and cuda:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        runner.begin_epoch(args.epochs)
        _sync(cuda)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.run(0, runner.steps)
            _sync(cuda)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


class Autocast:
    """`model` with its forward under bf16 autocast, as Accelerate's --mixed-precision bf16 runs it."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __call__(self, x):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False):
            return self.model(x)


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the four IDX files (gzip or not)")
    parser.add_argument("--dataset", default="mnist", help="what the files are: mnist or fashion_mnist")
    parser.add_argument("--epochs", type=int, default=6, help="per variant; the median is over epochs 2 on")
    parser.add_argument("--profile", action="store_true", help="print a kernel table per variant (GPU)")
    parser.add_argument("--compile", action="store_true", help="also a variant with the forward through Inductor")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    train = sources.load_splits(args.dataset, args.data_dir)["train"]
    inputs, labels = data.normalize(train.images.to(accelerator.device)), train.labels.to(accelerator.device)
    common = (args, accelerator, inputs, labels)
    variant(*common, "finite check and fused Adam on whole tensors", views=False, profile=args.profile)
    variant(*common, "... on 4,096-element views (the graph path)", profile=args.profile)
    variant(*common, "... views, TF32 matmuls", tf32=True)
    variant(*common, "... views, bf16 autocast", bf16=accelerator.device.type == "cuda")
    if args.compile:
        variant(*common, "... views, forward compiled (Inductor)", compiled=True, profile=args.profile)


if __name__ == "__main__":
    main()
