"""Two CPU processes (gloo): a short DDP training run and a sharded eval whose rows equal the
single-process rows.

accelerate 1.15's `accelerate launch --cpu --num_processes 2` starts ONE process (its multi-CPU mode
needs mpirun), so the processes are started with torchrun, the launcher `accelerate launch --multi_gpu`
wraps; `Accelerator(cpu=True)` then runs as DistributedType.MULTI_CPU. The test checks that it did."""

import os
import subprocess
import sys

import pytest

from tiny_pipelines import tiny_sd3_dir  # noqa: F401


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, launch=False, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    pre = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "cdmbench.cli"] if launch else [sys.executable, "-m", "cdmbench.cli"]
    res = subprocess.run([*pre, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_ddp_training_and_sharded_eval_match_single_process(tmp_path):
    from cdmbench.eval.results import read_results

    ws = str(tmp_path / "ws")
    _cli("train", "cdm", "--steps-budget", "2", "--batch-size", "2", "--set", "warmup=0", "--set",
         "max_rollout_steps=2", "--workspace", ws, "--quiet", launch=True)
    assert (tmp_path / "ws" / "runs" / "cdm-toy" / "done.json").exists()
    import json

    cfg = json.loads((tmp_path / "ws" / "runs" / "cdm-toy" / "config.json").read_text())
    assert cfg["world_size"] == 2  # really two processes
    common = ["eval", "--steps", "1,2", "--teacher-steps", "2", "--num-prompts", "6", "--seeds", "0",
              "--metrics", "attr_acc,clip", "--workspace", ws, "--quiet"]
    _cli(*common, "--out", str(tmp_path / "sharded"), launch=True)
    _cli(*common, "--out", str(tmp_path / "single"))
    key = ["run", "steps", "metric"]
    a = read_results(tmp_path / "sharded" / "results.csv").sort_values(key).reset_index(drop=True)
    b = read_results(tmp_path / "single" / "results.csv").sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) > 0
    assert (a[key] == b[key]).all().all()
    assert ((a.value - b.value).abs() <= 1e-4 * b.value.abs().clip(lower=1)).all()


@pytest.mark.slow
def test_dmd_pairs_are_made_once_across_two_processes_on_tiny_sd3(tmp_path, tiny_sd3_dir):  # noqa: F811
    """Vanilla DMD under two gloo processes: each teacher pair is generated once in total (3 + 2 of 5), the set
    lives in the run folder, and no checkpoint holds it; a resume reads it back instead of regenerating."""
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\na blue car\na cat in a hat\na green lake\n")
    ws = tmp_path / "ws"
    common = ["train", "dmd", "--arch", "sd3", "--model", str(tiny_sd3_dir), "--batch-size", "2", "--workspace", str(ws),
              "--quiet", "--set", "backbone.resolution=32", "--set", "backbone.max_sequence_length=16",
              "--set", "train.prompts=" + str(prompts), "--set", "num_pairs=5", "--set", "pair_steps=2",
              "--set", "regression_distance=mse", "--set", "warmup=0", "--set", "train.checkpoint_every=1",
              "--set", "train.mixed_precision=no", "--set", "backbone.gradient_checkpointing=false"]
    _cli(*common, "--steps-budget", "1", launch=True)
    run = ws / "runs" / "dmd-sd3"
    rec = json.loads((run / "pairs" / "pairs.json").read_text())
    assert rec["generated_by_process"] == {"0": 3, "1": 2} and rec["num_pairs"] == 5
    assert json.loads((run / "config.json").read_text())["as_run"]["world_size"] == 2
    stamp = (run / "pairs" / "pairs.safetensors").stat().st_mtime_ns
    _cli(*common, "--steps-budget", "2", "--resume", launch=True)
    assert (run / "pairs" / "pairs.safetensors").stat().st_mtime_ns == stamp  # read back, not made again
    for ckpt in (run / "checkpoints").glob("step_*"):
        assert not (ckpt / "method_state.safetensors").exists()
