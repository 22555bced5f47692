"""`--data-path graph`: whole epochs of training captured once in a CUDA graph and replayed.

At batch 128 a step is a few dozen tiny kernels; launched one by one from Python, the GPU waits
for the host. A CUDA graph records an epoch's kernels once and replays them with one launch
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs). For that every step must read and
write the same memory: each epoch the normalized training set is shuffled into one static buffer
(the device path's permutation, `data.DeviceBatches`), and step j always reads slice j of it.
Anything but a whole epoch (a resumed epoch's rest, stretches cut by --checkpoint-every) runs the
same step eagerly on the same slices. Before the capture a few warm-up steps do CUDA's lazy set-up
with every update skipped, so the first epoch is already a replay.

The captured step (`graph_step`) computes what the reference step (`steps.train_step`) computes, bit
for bit when both run eagerly on the CPU (tests/test_fast_path.py), in fewer kernels and with no host
sync; tests/test_gpu.py compares a replayed run with the device path's on a GPU. Its tricks, and the
private torch ops they need, live in this module only.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .clock import since_process_start
from .config import ConfigError, TrainConfig
from .data import epoch_order
from .distributed import compiled_with
from .steps import NonFiniteGuard, StepRunner

# the finite check and Adam work on views of this many elements: torch's multi-tensor kernels give a
# thread block one 65,536-element chunk, so whole tensors keep 7 of an H200's 132 multiprocessors busy
VIEW_ELEMENTS = 4096
# eager steps before a capture, all skipped ("a few", torch's CUDA-graph notes)
WARMUP_STEPS = 3


def graph_unsupported(cfg: TrainConfig, device: torch.device, world: int, precision: str,
                      compiled: str = "no") -> str | None:
    """Why this run cannot replay captured epochs, or None when it can. `compiled`: the torch.compile
    backend of the prepared model (`distributed.compiled_with`), "no" for none."""
    reasons = [
        (device.type != "cuda", f"needs a CUDA GPU, and this run is on the {device.type}"),
        (world > 1, f"runs one process, and this launch has {world}: capturing DDP's all-reduce is not supported "
                    "here; --data-path device keeps the data on each GPU without per-step host syncs"),
        (cfg.schedule != "constant", f"needs --schedule constant (got {cfg.schedule!r}): a replayed epoch would "
                                     "repeat the learning rates of the epoch it was captured in"),
        (cfg.gradient_accumulation_steps > 1 or cfg.max_grad_norm is not None,
         f"captures one batch per optimizer step, unclipped, and this run has --gradient-accumulation-steps "
         f"{cfg.gradient_accumulation_steps} --max-grad-norm {cfg.max_grad_norm}: --data-path device runs it"),
        (cfg.optimizer != "adam" or cfg.weight_decay != 0, f"replays plain Adam, and this run has --optimizer "
                                                            f"{cfg.optimizer} --weight-decay {cfg.weight_decay}: "
                                                            "--data-path device runs it"),
        (cfg.model != "mlp", f"replays the MLP without dropout or BatchNorm, and this run has --model {cfg.model} "
                             "(the CNN has both; a model of yours may hold ops a CUDA graph cannot capture): "
                             "--data-path device runs it"),
        (cfg.dropout or cfg.batch_norm, f"replays the MLP without dropout or BatchNorm, and this run has --dropout "
                                        f"{cfg.dropout} --batch-norm {cfg.batch_norm}: the steps that warm the capture "
                                        "up would draw dropout's random numbers and move BatchNorm's statistics; "
                                        "--data-path device runs it"),
        (cfg.augment, "replays each epoch's batches as it captured them, and --augment transforms every batch anew: "
                      "--data-path device runs it"),
        (cfg.eval_every is not None, f"replays whole epochs, and --eval-every {cfg.eval_every} validates inside "
                                     "them: --data-path device runs it"),
        (precision == "fp16", "does not support --mixed-precision fp16, whose grad scaler checks for overflow on "
                              "the host; use bf16 or no"),
        (compiled != "no", f"does not run a model compiled by torch.compile (Accelerate's dynamo_backend is "
                           f"{compiled}): capturing compiled kernels in the epoch's graph is not supported here; "
                           "--data-path device runs it, or launch with --dynamo_backend no"),
    ]
    return next((why for applies, why in reasons if applies), None)


def graph_step(model, adam: torch.optim.Adam, guard: NonFiniteGuard, inputs: torch.Tensor, labels: torch.Tensor,
               scale: torch.Tensor, label_smoothing: float, unit: torch.Tensor) -> torch.Tensor:
    """`steps.train_step` for one process with fused Adam and no grad scaler, with no host sync: `scale`
    (1 / real samples) and `unit` (1) are 0-d float32 tensors on the device, made before any capture.
    Returns the batch's loss sum (0-d, on the device)."""
    logits = model(inputs)
    loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)
    # backward seeded with the scale, not accelerator.backward(loss * scale): 6 kernels a step fewer
    # (benchmarks/step_ops.py); eagerly on one thread of the 2-core CPU VM 76-93 us a step less
    loss_sum.backward(gradient=scale)
    grads = _views([p.grad for group in adam.param_groups for p in group["params"] if p.grad is not None])
    # GradScaler's finite check, 1 kernel against the reference's 8 (step_ops.py); found_inf becomes 1
    # and stays 1. This check and Adam on views, together: 54.1 -> 40.6 ms an epoch on an H200
    torch._amp_foreach_non_finite_check_and_unscale_(grads, guard.found_inf, unit)
    guard.bad_steps += guard.found_inf
    if adam.state:
        adam_step_in_views(adam, guard.found_inf, grads)
    else:  # the first step makes Adam's state; torch's own fused step skips it on found_inf alike
        adam.step()
    adam.zero_grad(set_to_none=True)
    return loss_sum.detach()


def adam_step_in_views(adam: torch.optim.Adam, found_inf: torch.Tensor, grad_views: list[torch.Tensor]) -> None:
    """Exactly `adam.step()` of a fused Adam whose state exists (torch.optim.adam._fused_adam's three
    calls) on views of VIEW_ELEMENTS elements of every parameter, gradient (`grad_views`, cut by
    `_views`, all groups in order) and moment: the same arithmetic, more thread blocks. The views of
    weights and moments are kept and cut again only when a tensor changes (a loaded state dict):
    cutting them costs more host time than a step's kernels, and a capture runs it every step."""
    cache = adam.__dict__.setdefault("_mnist_dist_views", {})  # param group index -> (tensors, views)
    offset = 0
    for index, group in enumerate(adam.param_groups):
        if group["amsgrad"] or group.get("decoupled_weight_decay") or not group["fused"]:
            raise ValueError("adam_step_in_views supports fused Adam without amsgrad or decoupled weight decay")
        params = [p for p in group["params"] if p.grad is not None]
        states = [adam.state[p] for p in params]
        steps = [state["step"] for state in states]
        views = _kept_views(cache, index, params, states)
        count = len(views["params"])
        grads, offset = grad_views[offset:offset + count], offset + count
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(views["params"], grads, views["exp_avgs"], views["exp_avg_sqs"], [], views["steps"],
                           lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                           weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False,
                           maximize=group["maximize"], grad_scale=None, found_inf=found_inf)
        torch._foreach_sub_(steps, [found_inf] * len(steps))  # a skipped step does not count
    if offset != len(grad_views):
        raise ValueError(f"grad_views holds {len(grad_views)} views; the parameters with gradients make {offset}")


def _kept_views(cache: dict, index: int, params: list, states: list) -> dict:
    """The views of one param group's weights and moments, cut again only if a tensor changed."""
    tensors = [t for p, s in zip(params, states) for t in (p, s["exp_avg"], s["exp_avg_sq"], s["step"])]
    key = [(t, t.data_ptr()) for t in tensors]
    kept = cache.get(index)
    if kept is None or len(kept[0]) != len(key) or any(a is not b or pa != pb for (a, pa), (b, pb) in zip(kept[0], key)):
        per_param = [len(range(0, p.numel(), VIEW_ELEMENTS)) for p in params]
        kept = cache[index] = (key, {
            "params": _views([p.detach() for p in params]),
            "exp_avgs": _views([s["exp_avg"] for s in states]),
            "exp_avg_sqs": _views([s["exp_avg_sq"] for s in states]),
            # each view reads its tensor's step count
            "steps": [s["step"] for s, n in zip(states, per_param) for _ in range(n)],
        })
    return kept[1]


def _views(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor, flattened and cut into views of at most VIEW_ELEMENTS elements (sharing its storage)."""
    return [view for t in tensors for view in t.view(-1).split(VIEW_ELEMENTS)]


class EpochGraph(StepRunner):
    """One process's training steps over a static, per-epoch shuffled copy of the training set.
    `run(0, steps)` (a whole epoch) is captured in a CUDA graph the first time, after `warm_up`, and
    replayed from then on; other stretches, and all of them with `capture=False` (the CPU, in tests),
    run eagerly. Each step's loss sum goes to `losses[step]`, on the device."""

    logs_live = False  # a whole epoch is one launch: its log windows are written after it
    on_step = staticmethod(lambda: None)

    def __init__(self, model, optimizer, guard: NonFiniteGuard, inputs: torch.Tensor, labels: torch.Tensor,
                 batch_size: int, seed: int, label_smoothing: float = 0.0, capture: bool = True):
        self.model, self.adam, self.guard, self.label_smoothing = model, optimizer.optimizer, guard, label_smoothing
        self.inputs, self.labels = inputs, labels  # inputs: normalized, on the device
        self.shuffled_inputs, self.shuffled_labels = torch.empty_like(inputs), torch.empty_like(labels)
        self.n, self.batch_size, self.seed, self.capture = len(labels), batch_size, seed, capture
        self.steps = math.ceil(self.n / batch_size)
        device = inputs.device
        self.losses = torch.zeros(self.steps, device=device)
        self.unit = torch.ones((), device=device)
        # 1 / real samples of each batch size an epoch has (full, and a shorter last one), made before any capture
        self.scales = {real: torch.full((), 1 / real, device=device) for real in {batch_size, self.n - (self.steps - 1) * batch_size}}
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_seconds = 0.0
        self.seconds_to_first_step: float | None = None

    def begin_epoch(self, epoch: int, start: int = 0) -> None:
        """Shuffle into the static buffers: the permutation torch.randperm draws from seed + epoch on the CPU."""
        order = epoch_order(self.n, self.seed, epoch).to(self.inputs.device)
        torch.index_select(self.inputs, 0, order, out=self.shuffled_inputs)
        torch.index_select(self.labels, 0, order, out=self.shuffled_labels)

    def run(self, start: int, stop: int) -> None:
        """Steps [start, stop) of the current epoch."""
        self.on_step()  # and each eager step's own (_eager): a replayed epoch is one launch
        if not (self.capture and (start, stop) == (0, self.steps)):
            self._eager(start, stop)
        else:
            if self.graph is None:
                began = time.perf_counter()
                self.warm_up()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):  # records the kernels, runs none of them
                    self._eager(0, self.steps)
                self.capture_seconds = time.perf_counter() - began
            self.graph.replay()
        if self.seconds_to_first_step is None:
            self.seconds_to_first_step = since_process_start()

    def step_losses(self, start: int, stop: int) -> list[float]:
        """The loss sums of steps [start, stop) (a host sync)."""
        return self.losses[start:stop].tolist()

    def step_norms(self) -> list[float]:
        """None kept: the replayed step's finite check computes no total norm (train/grad_norm is not logged)."""
        return []

    def warm_up(self) -> None:
        """Run the first steps of the current epoch eagerly with every update skipped (`found_inf` set):
        their kernels run, and weights, moments and step counts stay as they were."""
        found_inf, bad_steps = self.guard.found_inf.clone(), self.guard.bad_steps.clone()
        self.guard.found_inf.fill_(1)
        self._eager(0, min(WARMUP_STEPS, self.steps))
        self.guard.found_inf.copy_(found_inf)
        self.guard.bad_steps.copy_(bad_steps)

    def _eager(self, start: int, stop: int) -> None:
        for j in range(start, stop):
            self.on_step()
            lo, hi = j * self.batch_size, min((j + 1) * self.batch_size, self.n)
            loss = graph_step(self.model, self.adam, self.guard, self.shuffled_inputs[lo:hi], self.shuffled_labels[lo:hi],
                              self.scales[hi - lo], self.label_smoothing, self.unit)
            self.losses[j].copy_(loss)


def resolve_data_path(cfg: TrainConfig, accelerator) -> str:
    """The --data-path this run uses: 'auto' is 'graph' where it can run (one CUDA process, constant
    schedule, precision no or bf16, no torch.compile), else 'device': the same batches as the
    DataLoader (the reference), and faster on a CPU too (benchmarks/README.md)."""
    why_not = graph_unsupported(cfg, accelerator.device, accelerator.num_processes, accelerator.mixed_precision,
                                compiled_with(accelerator))
    if cfg.data_path == "graph" and why_not:
        raise ConfigError(f"--data-path graph {why_not}")
    if cfg.data_path != "auto":
        return cfg.data_path
    if why_not is None:
        return "graph"
    return "device"
