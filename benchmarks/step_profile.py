"""Where a captured epoch's time goes on a GPU: variants of the training step side by side, in one process.

    python benchmarks/step_profile.py --data-dir /usr/share/datasets/fashion-mnist [--profile]

Each variant builds the recipe of record's model and fused Adam and, as training does, warms up,
captures epoch 1 in a CUDA graph (`mnist_dist.graphs.EpochGraph`, the `--data-path graph` runner)
and replays it every epoch; it prints one JSON line with the first epoch (warm-up, capture, replay)
and the median of the later epochs in ms and µs per step.
`--profile` adds torch.profiler's kernel table for one replayed epoch of the first two variants.
Variants: Adam and the non-finite check on whole tensors, or on 4,096-element views (what the
graph path does); then with TF32 matmuls and with bf16 autocast; with `--compile`, with the forward
pass and the loss compiled by Inductor (fused element-wise work around the matmuls, and in their
backward), captured the same way. Without a GPU every stretch runs eagerly (no capture), which
only checks that the script works.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from mnist_dist import data
from mnist_dist.distributed import StepHealth, backward, optimizer_step
from mnist_dist.graphs import ADAM_VIEW_ELEMENTS, EpochGraph
from mnist_dist.model import MLP
from mnist_dist.train import make_optimizer, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the four IDX files (gzip or not)")
    parser.add_argument("--epochs", type=int, default=6, help="per variant; the median is over epochs 2 on")
    parser.add_argument("--profile", action="store_true", help="print a kernel table per variant (GPU)")
    parser.add_argument("--compile", choices=["default", "max-autotune"],
                        help="also a variant with forward and loss through torch.compile (Inductor); max-autotune "
                             "adds one with Triton matmul templates (minutes of autotuning on a cold cache)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda)
    device = accelerator.device
    train = data.load_splits("mnist", args.data_dir)["train"]
    inputs, labels = data.normalize(train.images.to(device)), train.labels.to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def variant(name, views=False, tf32=False, bf16=False, compile_mode=None, profile=False):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.manual_seed(0)
        model = MLP()
        optimizer = make_optimizer(model.parameters(), 1e-3, device)
        model, optimizer = accelerator.prepare(model, optimizer)
        health = StepHealth(device)
        steps = -(-len(labels) // 128)
        losses = torch.zeros(steps, device=device)

        def forward(x):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
                return model(x)

        scales = {real: torch.full((), 1 / real, device=device) for real in {128, len(labels) - (steps - 1) * 128}}

        def step(x, y, real, index):
            train_step(accelerator, forward, optimizer, None, health, x, y, scales[real], 0.0, losses[index],
                       ADAM_VIEW_ELEMENTS if views else None)

        compile_s = 0.0
        if compile_mode:  # forward and loss (and so their backward) through Inductor; Adam as train_step runs it
            def loss_sum(x, y):
                return F.cross_entropy(forward(x).float(), y, reduction="sum")

            compiled = torch.compile(loss_sum, mode=compile_mode, dynamic=False)

            def compiled_step(x, y, real, index):  # train_step's body, with the compiled loss
                loss = compiled(x, y)
                backward(accelerator, loss, scales[real])
                optimizer_step(accelerator, optimizer, health, ADAM_VIEW_ELEMENTS if views else None)
                optimizer.optimizer.zero_grad(set_to_none=True)
                losses[index].copy_(loss.detach())

            began = time.perf_counter()  # both batch shapes, before any capture: a capture cannot compile
            for real in scales:
                backward(accelerator, compiled(inputs[:real], labels[:real]), scales[real])
                optimizer.optimizer.zero_grad(set_to_none=True)
            sync()
            compile_s = time.perf_counter() - began
            step = compiled_step

        runner = EpochGraph(step, inputs, labels, 128, 0, health, capture=cuda)
        seconds = []
        for epoch in range(args.epochs):
            runner.begin_epoch(epoch)
            sync()
            began = time.perf_counter()
            runner.run(0, runner.steps)  # epoch 1: warm-up and capture first
            sync()
            seconds.append(time.perf_counter() - began)
        steady = statistics.median(seconds[1:])
        print(json.dumps({"variant": name, "compile_s": round(compile_s, 2), "first_epoch_s": round(seconds[0], 4),
                          "capture_s": round(runner.capture_seconds, 4),
                          "ms_per_epoch": round(1000 * steady, 2), "us_per_step": round(1e6 * steady / runner.steps, 1),
                          "last_loss_sum": losses[-2].item()}), flush=True)
        if profile and cuda:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            runner.begin_epoch(args.epochs)
            sync()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                runner.run(0, runner.steps)
                sync()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))

    variant("fused Adam and finite check on whole tensors", profile=args.profile)
    variant(f"... on {ADAM_VIEW_ELEMENTS}-element views (the graph path)", views=True, profile=args.profile)
    variant("... views, TF32 matmuls", views=True, tf32=True)
    variant("... views, bf16 autocast", views=True, bf16=cuda)
    if args.compile:
        variant("... views, forward and loss compiled (Inductor)", views=True, compile_mode="default", profile=args.profile)
    if args.compile == "max-autotune":
        variant("... views, compiled with max-autotune (Triton matmuls)", views=True,
                compile_mode="max-autotune-no-cudagraphs", profile=args.profile)


if __name__ == "__main__":
    main()
