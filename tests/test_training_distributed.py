"""Training as it runs on clusters, on this CPU: stage 1 as two processes (gloo) through `torchrun` and through
`accelerate launch` with the shipped DDP config, ending on the weights of one process at the same global batch; the
stage-1 losses under DDP and FSDP 2 (torch's `fully_shard`) against one process; FSDP through the Trainer where
accelerate allows it; and a training run killed with SIGKILL after a checkpoint that resumes to the same weights as an
uninterrupted run.

This file is also the worker script of the model-level checks: `torchrun ... tests/test_training_distributed.py MODE
OUT` (see `_stage1_worker`)."""

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


def stage1_config(tmp_path, augmentation: bool = True, **stage1) -> Path:
    """tiny-cpu cut down to stage 1 alone (random cell encoder), small batches."""
    config = yaml.safe_load(TINY.read_text())
    config["pipeline"]["stages"] = ["stage1"]
    config["augmentation"]["enabled"] = augmentation
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
    """Plain `torchrun` (what `accelerate launch` with a multi-GPU or FSDP config runs underneath; `accelerate
    launch --cpu` would need MPI for several processes): the pipeline's accelerate state forms a gloo group."""
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
    # a checkpoint every 5 steps, all kept; no best-checkpoint choice (tiny-cpu's evaluates every 50 steps).
    # Augmentation on: each batch's draws are seeded by its cells (augment.batch_seed), so the resumed run replays them
    config = stage1_config(tmp_path, max_steps=30, save_strategy="steps", save_steps=5,
                           save_total_limit=None, eval_strategy="no", load_best_model_at_end=False)

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


# ------------------------------------------------------------------------- the stage-1 losses over ranks, model level
STEPS, GLOBAL_BATCH, LEARNING_RATE = 3, 8, 0.1
# float32 sums in another order (a rank's half batch vs the whole one): measured 7e-7; without the cross-rank
# terms (each rank on its own negatives and tokens) the weights end 0.9 apart
ATOL, RTOL = 1e-5, 1e-4


def _stage1_model():
    from modeling_scmmgpt import ScMMGPTConfig, ScMMGPTModel

    torch.manual_seed(0)
    return ScMMGPTModel(ScMMGPTConfig.tiny(captioning_max_cells=None))


def _stage1_batches(model) -> list[dict]:
    """`STEPS` random global batches of `GLOBAL_BATCH` cells (10-30 genes, padded to the batch's longest) and texts
    (4-12 tokens; three cell types' texts, so identical texts sit on both halves of a batch)."""
    config, g = model.config, torch.Generator().manual_seed(1)
    cell, vocab = config.cell_config, config.qformer_config.vocab_size
    batches = []
    for _ in range(STEPS):
        genes = torch.randint(10, 31, (GLOBAL_BATCH,), generator=g)
        mask = (torch.arange(int(genes.max()) + 1) <= genes[:, None]).long()
        gene_ids = torch.randint(2, cell.vocab_size, mask.shape, generator=g).masked_fill(mask == 0, cell.pad_token_id)
        gene_ids[:, 0] = cell.cls_token_id
        values = (torch.rand(mask.shape, generator=g) * 4).masked_fill(mask == 0, cell.pad_value)
        values[:, 0] = 0.0
        types = [torch.randint(3, vocab, (int(n),), generator=g) for n in torch.randint(4, 13, (3,), generator=g)]
        texts = [types[int(t)] for t in torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)]
        # label negatives (stage1.label_negatives): one type's text, and a text no cell of the batch has
        negatives = [types[0], torch.randint(3, vocab, (7,), generator=g)]
        batches.append(dict(gene_ids=gene_ids, expression_values=values, cell_attention_mask=mask, texts=texts,
                            negatives=negatives))
    return batches


def _rows(batch: dict, rows: slice) -> dict:
    """The model inputs of `rows` of a global batch, texts padded to the longest of those rows (as a collator pads a
    rank's share)."""
    texts = batch["texts"][rows]
    ids, mask = _padded(texts)
    negative_ids, negative_mask = _padded(batch["negatives"])  # every rank has them all
    own = torch.tensor([0 if t is batch["negatives"][0] else -1 for t in texts])  # each cell's label's negative
    return dict(gene_ids=batch["gene_ids"][rows], expression_values=batch["expression_values"][rows],
                cell_attention_mask=batch["cell_attention_mask"][rows], qformer_input_ids=ids,
                qformer_attention_mask=mask, label_text_index=own,
                negative_texts=dict(qformer_input_ids=negative_ids, qformer_attention_mask=negative_mask))


def _padded(texts: list) -> tuple:
    length = max(len(t) for t in texts)
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        ids[i, : len(t)], mask[i, : len(t)] = t, 1
    return ids, mask


def _train_stage1(model, batches, shares: list[slice]):
    """`STEPS` SGD steps (plain SGD: the update is the gradient, so a gradient off by a factor shows; Adam would
    normalise it away). Each step averages the gradients of `shares` of the batch, as data parallelism averages
    ranks'."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    torch.manual_seed(2)  # the matching loss draws its hard negatives
    model.train()
    for batch in batches:
        for rows in shares:
            (model(**_rows(batch, rows)).loss / len(shares)).backward()
        optimizer.step()
        optimizer.zero_grad()


def _stage1_worker(mode: str, out: str):
    """One rank of `mode` ("ddp": `DistributedDataParallel`; "fsdp": FSDP 2, every cell-encoder and Q-Former layer
    its own shard unit, as train/accelerate/fsdp.yaml wraps them) training on its half of each global batch; rank 0
    writes the full weights to `out`."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _stage1_model()
    batches = _stage1_batches(model)
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if type(module).__name__ in ("CellEncoderLayer", "QFormerLayer"):
                fully_shard(module)
        wrapped = fully_shard(model)
    share = GLOBAL_BATCH // world
    _train_stage1(wrapped, batches, [slice(rank * share, (rank + 1) * share)])
    state = {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone().contiguous()
             for name, value in model.state_dict().items()}
    if rank == 0:
        save_file(state, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_stage1_losses_over_two_ranks_train_like_one_process(tmp_path, mode):
    """The contrastive and matching losses gather every rank's features (gradient-correct, as BLIP-2's official code)
    and the captioning loss averages over the global batch's tokens, so 2 ranks × 4 cells take the steps of 1 process
    × 8 cells; without the gathering each rank's loss would see only its own negatives (checked to differ here)."""
    out = tmp_path / "ranks.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(Path(__file__).resolve()), mode, str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    one = _stage1_model()
    initial = {name: value.detach().clone() for name, value in one.state_dict().items()}
    _train_stage1(one, _stage1_batches(one), [slice(0, GLOBAL_BATCH)])
    expected = one.state_dict()
    got = load_file(out)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=RTOL, msg=name)
    assert max(float((expected[n] - initial[n]).abs().max()) for n in expected) > 1e-2  # the steps moved the weights

    # what the ranks would train without cross-rank terms: each half batch's own loss, gradients averaged
    local = _stage1_model()
    half = GLOBAL_BATCH // 2
    _train_stage1(local, _stage1_batches(local), [slice(0, half), slice(half, GLOBAL_BATCH)])
    assert max(float((local.state_dict()[n] - expected[n]).abs().max()) for n in expected) > 100 * ATOL


# ------------------------------------------------------------------------- the pipeline under accelerate launch
PIPELINE_STEPS, PER_DEVICE_BATCH = 4, 8


def equivalence_config(tmp_path, name: str, batch: int, **stage1) -> Path:
    """Stage 1 of tiny-cpu made deterministic for comparing runs: no augmentation, dropout 0, every cell captioned,
    plain SGD without clipping (the update is the gradient: a gradient off by a factor shows, Adam or clipping would
    normalise it away), no mid-run evaluation; `batch` cells per process."""
    config = yaml.safe_load(TINY.read_text())
    config["pipeline"]["stages"] = ["stage1"]
    config["data"].update(max_genes=64, validation_size=0)
    config["augmentation"]["enabled"] = False
    config["model"]["qformer_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config["stage1"] = {**dict(max_steps=PIPELINE_STEPS, per_device_train_batch_size=batch, captioning_max_cells=None,
                               optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", weight_decay=0.0,
                               max_grad_norm=0.0, logging_steps=1, seed=0), **stage1}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _accelerate_launch(accelerate_config: str, *program, options=(), cwd=None) -> subprocess.CompletedProcess:
    """`accelerate launch` on 2 processes as the README documents it (`program`: a script or `-m module`, and its
    arguments); mixed precision off (the shipped configs say bf16: on a CPU, bf16 autocast, unlike the fp32
    reference)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "train" / "accelerate" / accelerate_config), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
               *options, *map(str, program)]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)


def _launch_stage1(accelerate_config: str, config: Path, out: Path, options=()) -> subprocess.CompletedProcess:
    return _accelerate_launch(accelerate_config, "-m", "scmmgpt_train.run", "--config", config, "--output-dir", out,
                              "--quiet", options=options, cwd=config.parent)


def _one_process_reference(tmp_path) -> Path:
    """Stage 1 as one process at the global batch (2 × PER_DEVICE_BATCH)."""
    out = tmp_path / "one"
    config = equivalence_config(tmp_path, "one", 2 * PER_DEVICE_BATCH)
    proc = subprocess.run([sys.executable, "-m", "scmmgpt_train.run", "--config", str(config), "--output-dir",
                           str(out), "--quiet"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out / "stage1"


def _assert_same_training(two: Path, one: Path):
    """Same weights after the last step (and the steps moved them far beyond the tolerance), and the same loss at
    every step (the Trainer logs the mean over processes, which the cross-rank losses make the global batch's)."""
    expected, got = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=ATOL, rtol=RTOL, msg=name)
    from modeling_scmmgpt import ScMMGPTConfig, ScMMGPTModel

    torch.manual_seed(yaml.safe_load(TINY.read_text())["pipeline"]["seed"])  # as stages._stage1 seeds its build
    initial = ScMMGPTModel(ScMMGPTConfig.from_pretrained(one)).state_dict()
    assert max(float((expected[n] - initial[n]).abs().max()) for n in expected) > 1000 * ATOL

    def losses(folder):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    assert len(losses(two)) == PIPELINE_STEPS
    assert losses(two) == pytest.approx(losses(one), abs=2e-4)  # logged rounded to 4 decimals


def test_stage1_ddp_through_accelerate_launch_matches_one_process(tmp_path):
    """`accelerate launch --config_file train/accelerate/multi_gpu.yaml --num_processes 2` on this CPU (accelerate
    starts the processes through torchrun; the pipeline's state forms a gloo group): 2 processes × 8 cells end on the
    weights of 1 process × 16 cells. The Trainer's seeded sampler deals consecutive per-process batches of one
    permutation to the ranks in turn, so each step's union over ranks is the one-process batch."""
    out = tmp_path / "two"
    proc = _launch_stage1("multi_gpu.yaml", equivalence_config(tmp_path, "two", PER_DEVICE_BATCH), out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / "stage1" / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [(r["world_size"], r["steps"], r["distributed_type"]) for r in ranks] == [
        (2, PIPELINE_STEPS, "MULTI_CPU")] * 2
    _assert_same_training(out / "stage1", _one_process_reference(tmp_path))


FSDP_PROBE = """
from accelerate import Accelerator
from scmmgpt_train.pipeline import _state

_state()  # the pipeline's process group: gloo where there is no GPU
print("distributed_type", Accelerator().distributed_type.value)
"""


def test_stage1_fsdp_through_accelerate_launch_matches_one_process(tmp_path):
    """The shipped FSDP config through the Trainer, where accelerate runs it. accelerate 1.x enables FSDP only on
    GPU-type devices (`AcceleratorState` sets `DistributedType.FSDP` from MULTI_GPU / NPU / XPU / ..., never from
    MULTI_CPU): launched on a CPU, the FSDP settings are dropped and the Trainer wraps plain DDP. That refusal is
    probed first and skips the test; FSDP 2 itself runs on CPU and is checked by
    `test_stage1_losses_over_two_ranks_train_like_one_process[fsdp]`."""
    import accelerate

    probe = tmp_path / "probe.py"
    probe.write_text(FSDP_PROBE)
    proc = _accelerate_launch("fsdp.yaml", probe, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    kinds = {line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("distributed_type")}
    if kinds != {"FSDP"}:
        pytest.skip(f"accelerate {accelerate.__version__} does not run FSDP on CPU: `accelerate launch --config_file "
                    f"train/accelerate/fsdp.yaml` gives distributed_type {sorted(kinds)} (FSDP is enabled only from "
                    "a GPU-type MULTI_* state), so the Trainer would train plain DDP")
    out = tmp_path / "fsdp"
    proc = _launch_stage1("fsdp.yaml", equivalence_config(tmp_path, "fsdp", PER_DEVICE_BATCH), out,
                          options=["--fsdp_state_dict_type", "FULL_STATE_DICT"])  # one model.safetensors at the end
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / "stage1" / "ranks" / f"rank-{i}.json").read_text()) for i in range(2)]
    assert {r["distributed_type"] for r in ranks} == {"FSDP"}
    _assert_same_training(out / "stage1", _one_process_reference(tmp_path))


if __name__ == "__main__":  # a rank of test_stage1_losses_over_two_ranks_train_like_one_process
    _stage1_worker(sys.argv[1], sys.argv[2])
