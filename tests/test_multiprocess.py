"""Two CPU processes (gloo): a short DDP training run and a sharded eval whose rows equal the
single-process rows.

accelerate 1.15's `accelerate launch --cpu --num_processes 2` starts ONE process (its multi-CPU mode
needs mpirun), so the processes are started with torchrun, the launcher `accelerate launch --multi_gpu`
wraps; `Accelerator(cpu=True)` then runs as DistributedType.MULTI_CPU. The test checks that it did."""

import os
import subprocess
import sys



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
