"""Resuming a run as it was launched: the flags not given are taken from the checkpoint (`continued`),
the global batch stays the checkpoint's on any world size (`Resume.batch_for_world`), and a flag, data or
model that would change the trajectory is refused (`Resume.check_*`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from accelerate.utils import set_seed
from safetensors.torch import load_file

from . import checkpoint, runs
from .config import ConfigError, TrainConfig, flags_where
from .model import WEIGHTS_NAME
from .train_state import STATE_NAME, CheckpointError, TrainState


@dataclass
class Resume:
    """A checkpoint to continue: where it is and its training state (training_state.json, checked)."""

    path: Path
    state: dict

    @classmethod
    def read(cls, path: str | Path) -> "Resume":
        """The checkpoint at `path`, its files checked to be all there (`checkpoint.read_state`; a file
        read before and unchanged since is not parsed again: `train_state.read`)."""
        return cls(Path(path), checkpoint.read_state(path))

    def began_with(self) -> dict:
        """The per-process batch and accumulation steps the run began with, which each of its checkpoints
        keeps: a requeued job's unchanged command line gives them again, whatever the world size is now."""
        return {"batch_size_flag": self.state["batch_size_flag"], "accumulation_flag": self.state["accumulation_flag"]}

    def settings(self, cfg: TrainConfig) -> tuple[TrainConfig, dict]:
        """`cfg` with every flag not given taken from the checkpoint (`TrainConfig.continued`), and what was
        taken; the batch and accumulation steps as the run began (`batch_for_world` cuts them later)."""
        began = self.began_with()
        cfg, taken = cfg.continued({**self.state["config"], "batch_size": began["batch_size_flag"],
                                    "gradient_accumulation_steps": began["accumulation_flag"]})
        try:  # the flags given passed before: what fails came from the checkpoint
            return cfg.validate(), taken
        except ConfigError as err:
            raise CheckpointError(f"{self.path / STATE_NAME}: damaged, a setting it holds fails: {err}") from None

    def for_world(self, cfg: TrainConfig, world: int) -> TrainConfig:
        """`cfg` with the checkpoint's global batch cut into `world` processes x batch x accumulation steps."""
        batch_size, steps = self.batch_for_world(cfg, world)
        return replace(cfg, batch_size=batch_size, gradient_accumulation_steps=steps)

    def batch_for_world(self, cfg: TrainConfig, world: int) -> tuple[int, int]:
        """(per-process batch, accumulation steps) that keep the checkpoint's global batch on `world`
        processes: the same samples in each optimizer step, in the same order, whatever the world size. A
        --batch-size or --gradient-accumulation-steps other than the run began with must make the global
        batch exactly; else each process takes the largest batch up to the one the run began with (its
        memory) that the global batch allows, and accumulates the rest."""
        state, path = self.state, self.path
        global_batch, began = state["global_batch_size"], self.began_with()
        b, n, given = cfg.batch_size, cfg.gradient_accumulation_steps, cfg.given_fields()
        b_new = "batch_size" in given and b != began["batch_size_flag"]
        n_new = "gradient_accumulation_steps" in given and n != began["accumulation_flag"]
        if global_batch % world:
            was_steps = state["config"]["gradient_accumulation_steps"]
            fits = [k for k in range(1, global_batch + 1) if global_batch % k == 0]
            raise CheckpointError(
                f"{path} was trained with a global batch of {global_batch} ({state['world_size']} processes x "
                f"{state['config']['batch_size']}{f' x {was_steps}' if was_steps > 1 else ''}); {world} processes "
                f"cannot split it evenly. Resume on a number of processes that divides it: "
                f"{', '.join(map(str, fits[:12]))}{', ...' if len(fits) > 12 else ''}")
        per_process = global_batch // world
        cuts = [(k, per_process // k) for k in range(per_process, 0, -1) if per_process % k == 0]  # largest first
        if not (b_new or n_new):
            return next((k, m) for k, m in cuts if k <= began["batch_size_flag"])
        fit = [(k, m) for k, m in cuts if (k == b or not b_new) and (m == n or not n_new)]
        if fit:
            return fit[0]
        named = " ".join(f"--{name.replace('_', '-')}={value}" for name, value, new in
                         (("batch_size", b, b_new), ("gradient_accumulation_steps", n, n_new)) if new)
        options = "; ".join(f"--batch-size {k} --gradient-accumulation-steps {m}" for k, m in cuts[:6])
        raise CheckpointError(
            f"{named} on {world} process(es) cannot make the global batch of {global_batch} that {path} was "
            f"trained with; resume with one of: {options}{'; ...' if len(cuts) > 6 else ''}")

    def check_compatible(self, config: dict) -> None:
        """Refuse to resume where the continuation could not be the same run (the batch: `batch_for_world`)."""
        # as the fields declare their roles (config.RESUME_ROLES); the batch: the global batch must match
        scheduled = flags_where(resume="match_scheduled") if config["schedule"] != "constant" else ()
        for name in flags_where(resume="match") + scheduled:
            was = self.state["config"][name]
            if was != config.get(name):
                raise CheckpointError(f"--{name.replace('_', '-')}={config.get(name)!r}, but {self.path} was trained "
                                      f"with {was!r}; resume with the same value")

    def check_data(self, data: dict, config: dict) -> None:
        """Refuse to resume on other data than the checkpoint's (`data.fingerprint` of both)."""
        if self.state["data"] != data:
            was = self.state["config"]
            raise CheckpointError(
                f"{self.path} was trained on other data: --dataset {was['dataset']} --data-dir "
                f"{was['data_dir']} gave {_data_in_words(self.state['data'])}, this run's --dataset {config['dataset']} "
                f"--data-dir {config['data_dir']} gives {_data_in_words(data)}; resume with the data it was trained on")

    def check_model(self, model, named: str) -> None:
        """Refuse a model that is not the checkpoint's network (`named`'s code changed since it was saved, say),
        naming the first weight that differs, before loading it would call the checkpoint damaged."""
        weights = self.path / WEIGHTS_NAME
        try:
            checkpoint.check_same_shapes(weights, load_file(weights), model.state_dict())
        except CheckpointError as err:
            raise CheckpointError(f"the model changed since this checkpoint was saved: --model {named} builds another "
                                  f"network now ({err}); resume with the model's code as it was, or start over in "
                                  "another --output-dir") from None

    def restore(self, accelerator, optimizer, seed: int) -> TrainState:
        """Load the checkpoint into the prepared objects (all processes); return its TrainState."""
        try:
            accelerator.load_state(str(self.path))  # model, optimizer, schedule, sampler, every process's RNG state
        except Exception as err:  # truncated or damaged files: refuse, naming the checkpoint
            raise CheckpointError(f"{self.path}: damaged checkpoint ({type(err).__name__}: {err})") from err
        if accelerator.process_index >= self.state["world_size"]:  # a process the checkpoint has no RNG state for
            set_seed(seed, device_specific=True)  # seed + rank: deterministic, and not another process's stream
        for group in optimizer.param_groups:  # loading restores the saving run's flags; keep this device's
            group["capturable"], group["fused"] = (optimizer.optimizer.defaults[k] for k in ("capturable", "fused"))
        return TrainState.from_checkpoint(self.state, accelerator.process_index, accelerator.num_processes)


def began_with(resumed: Resume | None, cfg: TrainConfig) -> dict:
    """What each checkpoint records of the batch the run began with: a fresh run's are its flags."""
    if resumed is None:
        return {"batch_size_flag": cfg.batch_size, "accumulation_flag": cfg.gradient_accumulation_steps}
    return resumed.began_with()


def continued(cfg: TrainConfig) -> tuple[TrainConfig, dict]:
    """`cfg` as a resume runs it (`Resume.settings`), and what was taken from the checkpoint. Every process
    calls this before the accelerator is built, which needs some of the settings (--cpu, --mixed-precision,
    --timeout); it only reads."""
    path = cfg.resume
    if path == "auto":  # the newest complete checkpoint; `runs.claim` may fall back to an older one (same settings)
        output_dir = runs.chosen_dir(cfg, None)
        found = checkpoint.complete_checkpoints(output_dir) if output_dir is not None else []
        path = found[-1] if found else None
    return Resume.read(path).settings(cfg) if path is not None else (cfg, {})


def _data_in_words(data: dict) -> str:
    return " and ".join(f"{s['samples']} {name} images (sha256 {s['sha256'][:12]})" for name, s in data.items())
