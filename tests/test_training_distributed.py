"""Training as it runs on clusters, on this CPU: stage 1 as two processes (gloo) through `torchrun`, and a
training run killed with SIGKILL after a checkpoint that resumes to the same weights as an uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "train" / "configs" / "tiny-cpu.yaml"

pytestmark = pytest.mark.slow


def stage1_config(tmp_path, **stage1) -> Path:
    """tiny-cpu cut down to stage 1 alone (random cell encoder), small batches."""
    config = yaml.safe_load(TINY.read_text())
    config["pipeline"]["stages"] = ["stage1"]
    config["data"]["max_genes"] = 64
    config["stage1"].update(dict(max_steps=8, per_device_train_batch_size=8, logging_steps=1), **stage1)
    config["stage1"].pop("max_seconds", None)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage1_trains_as_two_cpu_processes_through_torchrun(tmp_path):
    """`torchrun` rather than `accelerate launch`: accelerate starts several CPU processes only through MPI
    (`mpirun`), which is not installed here; under torchrun the same code runs DDP over gloo."""
    from modeling_scmmgpt import ScMMGPTModel

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()),
               "-m", "scmmgpt_train.run", "--config", str(stage1_config(tmp_path)), "--output-dir", str(out),
               "--quiet"]
    proc = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / "stage1" / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["steps"] == 8 and r["global_step"] == 8 for r in ranks)
    assert (out / "stage1" / "COMPLETE.json").is_file()
    model = ScMMGPTModel.from_pretrained(out / "stage1")
    assert model.config.num_query_tokens == 8
    state = json.loads((out / "stage1" / "trainer_state.json").read_text())
    # each logged loss is the mean over both processes' batches; 2 × 8 cells per step
    assert state["global_step"] == 8 and state["train_batch_size"] == 8


def _run(config, out, **kwargs):
    command = [sys.executable, "-m", "scmmgpt_train.run", "--config", str(config), "--output-dir", str(out),
               "--quiet"]
    return subprocess.Popen(command, cwd=config.parent, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _checkpoint_written(folder: Path) -> bool:
    needed = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")
    return all((folder / name).is_file() for name in needed)


def test_killed_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    config = stage1_config(tmp_path, max_steps=30, save_strategy="steps", save_steps=5)

    reference = _run(config, tmp_path / "reference")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-4000:]

    run = tmp_path / "killed"
    victim = _run(config, run)
    checkpoint = run / "stage1" / "checkpoint-10"
    deadline = time.time() + 600
    while not _checkpoint_written(checkpoint):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "stage1" / "COMPLETE.json").exists()  # killed mid-stage

    resumed = _run(config, run)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-4000:]
    state = json.loads((run / "stage1" / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    first_logged = min(entry["step"] for entry in state["log_history"] if "loss" in entry)
    assert first_logged <= 10  # the history carried over from the checkpoint

    expected = load_file(tmp_path / "reference" / "stage1" / "model.safetensors")
    got = load_file(run / "stage1" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
