"""Accelerate's dynamo_backend (torch.compile on the prepared model): a compiled run trains the same
function as a plain one and leaves files that plain PyTorch, `mnist_dist.evaluate` and a resume read."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mnist_dist import checkpoint, evaluate
from mnist_dist.model import MLP

from .helpers import check, in_process, results, train_cli

pytestmark = pytest.mark.slow  # the quick loop (-m "not slow") leaves these out
# one epoch of the 5,000 bundled digits: 39 batches of 128 and one of 8, so the compiled model meets two
# batch shapes; checkpoints at steps 20 and 40
FLAGS = ("--dataset", "mnist-5k", "--cpu", "--data-path", "device", "--max-steps", "40", "--checkpoint-every", "20",
         "--report-to", "none")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{backend: (output dir, finished process)} for Accelerate's dynamo_backend inductor and no."""
    base = tmp_path_factory.mktemp("compile")
    return {
        backend: (base / backend, check(train_cli(*FLAGS, "--output-dir", str(base / backend), timeout=900,
                                                  env={"ACCELERATE_DYNAMO_BACKEND": backend.upper()})))
        for backend in ("inductor", "no")
    }


def test_a_compiled_run_says_so_and_records_it(runs):
    (compiled, proc), (plain, plain_proc) = runs["inductor"], runs["no"]
    assert "precision no, torch.compile inductor, data path device" in proc.stdout
    assert "torch.compile" not in plain_proc.stdout
    assert results(compiled)["torch_compile"] == "inductor" and results(plain)["torch_compile"] == "no"


def test_a_compiled_run_ends_with_the_weights_of_a_plain_run(runs):
    compiled, plain = (load_file(runs[b][0] / "model.safetensors") for b in ("inductor", "no"))
    # the plain module's names: not torch.compile's "_orig_mod.fc1.weight"
    assert compiled.keys() == plain.keys() == MLP().state_dict().keys()
    for name in plain:  # Inductor's kernels may add in another order: float32 rounding apart, no more
        torch.testing.assert_close(compiled[name], plain[name], rtol=1e-5, atol=1e-6)
    assert results(runs["inductor"][0])["test_accuracy"] == results(runs["no"][0])["test_accuracy"]


def test_evaluate_reads_a_compiled_runs_model_and_its_checkpoints(runs, tmp_path):
    out = runs["inductor"][0]
    halfway, last = checkpoint.complete_checkpoints(out)
    for name, model in (("model", out), ("last", last), ("halfway", halfway)):
        check(in_process(evaluate.main, "--model", str(model), "--cpu", "--output-dir", str(tmp_path / name)))
    evaluation = {name: json.loads((tmp_path / name / "evaluation.json").read_text()) for name in ("model", "last", "halfway")}
    assert evaluation["model"]["test_accuracy"] == evaluation["last"]["test_accuracy"] == results(out)["test_accuracy"]
    assert evaluation["halfway"]["test_accuracy"] != evaluation["last"]["test_accuracy"]


def test_a_compiled_run_resumes_from_its_checkpoint_to_the_same_weights(runs, tmp_path):
    out = runs["inductor"][0]
    halfway = checkpoint.complete_checkpoints(out)[0]
    check(train_cli(*FLAGS, "--output-dir", str(tmp_path / "resumed"), "--resume", str(halfway), timeout=900,
                    env={"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}))
    resumed, uninterrupted = load_file(tmp_path / "resumed" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in uninterrupted:
        assert torch.equal(resumed[name], uninterrupted[name]), name
