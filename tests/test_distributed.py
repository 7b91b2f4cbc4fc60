"""Data-parallel training with torchrun on 2 gloo ranks (CPU): correctness, one checkpoint, resume, a dead rank.

Each test launches real processes (``torchrun --standalone --nproc_per_node=2 --no-python volsynth train …``),
as a user would; the single-process reference runs in this process with the same items.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from volsynth.experiment import load_checkpoint, load_config
from volsynth.training import trainer as trainer_module
from volsynth.training.trainer import iteration_seed, train

pytestmark = pytest.mark.slow

TINY = ["method.channels=[4,8]", "method.strides=[2]", "method.num_res_units=1", "method.norm=null",
        "data.sampling.patch_size=[8,8,8]", "train.log_every=1", "train.val_every=100", "train.lr=1e-3",
        "train.progress=false", "inference.overlap=0.25", "train.distributed_timeout=60"]


def torchrun() -> str:
    path = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(path).exists():
        pytest.skip("torchrun is not installed")
    return path


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "VOLSYNTH_BACKEND": "gloo", "PYTHONUTF8": "1"}


def run_ranks(cohort: Path, out: Path, *extra: str, resume: bool = False, timeout: float = 240
              ) -> subprocess.CompletedProcess:
    command = [torchrun(), "--standalone", "--nproc_per_node=2", "--no-python", "volsynth", "train", "--config",
               "regression_unet-cpu", "--data", str(cohort), "--out", str(out),
               *(f"--set={o}" for o in [*TINY, *extra])]
    if resume:
        command.append("--resume")
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment())


def test_two_ranks_equal_one_process_with_both_ranks_items(cohort: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_ranks(cohort, tmp_path / "ddp", "train.iterations=3", "data.sampling.per_step=1",
                       "train.checkpoint_every=1")  # weights compared across ranks after every step
    assert result.returncode == 0, result.stderr[-3000:]
    # one writer: one last.pt and one best.pt, no temporary files from a second rank
    assert sorted(p.name for p in (tmp_path / "ddp/checkpoints").iterdir()) == ["best.pt", "last.pt"]

    # Reference: one process whose every step holds rank 0's and rank 1's items together.
    config = load_config("regression_unet-cpu", [f"data.manifest={cohort}", *TINY, "train.iterations=3",
                                                 "data.sampling.per_step=1"])
    original = trainer_module.build_sampler

    def both_ranks(sampling, subjects, *, paired):  # type: ignore[no-untyped-def]
        base = original(sampling, subjects, paired=paired)

        class Both:
            iteration = 0

            def sample(self, rng: np.random.Generator) -> dict:
                Both.iteration += 1
                parts = [base.sample(np.random.default_rng(iteration_seed(config.seed, Both.iteration, rank)))
                         for rank in (0, 1)]
                return {k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts]) for k in parts[0]}

        return Both()

    monkeypatch.setattr(trainer_module, "build_sampler", both_ranks)
    train(config, tmp_path / "single")
    ddp = load_checkpoint(tmp_path / "ddp/checkpoints/last.pt")["model"]
    single = load_checkpoint(tmp_path / "single/checkpoints/last.pt")["model"]
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=0, atol=1e-5, msg=key)
    changed = load_checkpoint(tmp_path / "ddp/checkpoints/last.pt")
    assert changed["iteration"] == 3


def test_resume_under_two_ranks_equals_an_uninterrupted_run(cohort: Path, tmp_path: Path) -> None:
    assert run_ranks(cohort, tmp_path / "straight", "train.iterations=4", "train.checkpoint_every=2").returncode == 0
    first = run_ranks(cohort, tmp_path / "resumed", "train.iterations=2", "train.checkpoint_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_ranks(cohort, tmp_path / "resumed", "train.iterations=4", "train.checkpoint_every=2", resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    a = load_checkpoint(tmp_path / "straight/checkpoints/last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed/checkpoints/last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = (tmp_path / "resumed/log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # rank 0 alone logs, once per iteration


def test_a_dead_rank_ends_the_job_with_an_error_not_a_hang(cohort: Path, tmp_path: Path) -> None:
    port = 29500 + os.getpid() % 1000
    command = [sys.executable, "-m", "volsynth.cli", "train", "--config", "regression_unet-cpu", "--data",
               str(cohort), "--out", str(tmp_path / "run"),
               *(f"--set={o}" for o in [*TINY, "train.iterations=100000", "train.checkpoint_every=100000",
                                        "train.distributed_timeout=20"])]
    processes = []
    for rank in (0, 1):
        env = {**environment(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run/log.csv").is_file():  # both ranks are training
            assert time.time() < deadline, "training never started"
            assert all(p.poll() is None for p in processes), processes[0].communicate()[1][-2000:]
            time.sleep(0.5)
        processes[1].send_signal(signal.SIGKILL)
        killed_at = time.time()
        _, stderr = processes[0].communicate(timeout=90)
        assert processes[0].returncode != 0
        assert time.time() - killed_at < 60  # within the timeout, not a hang
        assert "error: rank 0: another rank stopped answering or died" in stderr, stderr[-2000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
