import csv
from pathlib import Path

import pytest
import torch

from volsynth.config import ExperimentConfig, load_config
from volsynth.training.checkpoint import CheckpointError, load_checkpoint, load_method
from volsynth.training.trainer import Trainer, train


def tiny(manifest: Path, *extra: str) -> ExperimentConfig:
    return load_config({"method": {"name": "regression_unet", "channels": [4, 8], "num_res_units": 1}}, [
        f"data.manifest={manifest}", "data.patch_size=[8,8,8]", "data.patches_per_step=2", "train.iterations=6",
        "train.checkpoint_every=3", "train.val_every=3", "train.log_every=1", "train.progress=false",
        "train.lr=1e-3", "inference.overlap=0.25", "inference.sw_batch_size=8", *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def test_resume_is_bit_exact(cohort: Path, tmp_path: Path) -> None:
    extra = ("train.schedule.kind=multistep", "train.schedule.milestones=[2,4]", "train.grad_clip=1.0")
    train(tiny(cohort, *extra), tmp_path / "straight")
    first = tiny(cohort, *extra, "train.iterations=3")
    train(first, tmp_path / "resumed")
    train(tiny(cohort, *extra), tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "straight/checkpoints/last.pt"), weights(tmp_path / "resumed/checkpoints/last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = list(csv.DictReader((tmp_path / "resumed/log.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    straight = list(csv.DictReader((tmp_path / "straight/log.csv").open()))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight]


def test_schedule_really_steps_and_log_has_every_loss(cohort: Path, tmp_path: Path) -> None:
    train(tiny(cohort, "train.schedule.kind=multistep", "train.schedule.milestones=[2,4]",
               "train.schedule.gamma=0.1"), tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run/log.csv").open()))
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5])
    assert set(rows[0]) == {"iteration", "seconds", "lr", "loss"}
    val = list(csv.DictReader((tmp_path / "run/validation.csv").open()))
    assert [int(r["iteration"]) for r in val] == [3, 6] and all(-1 <= float(r["ssim"]) <= 1 for r in val)
    for name in ("config.yaml", "splits.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / "run" / name).is_file(), name
    saved = load_config(tmp_path / "run/config.yaml")
    assert saved.data.spacing == [2.0, 2.0, 2.0]  # the cohort's median spacing, frozen into the resolved config


def test_same_seed_same_numbers_different_seed_different(cohort: Path, tmp_path: Path) -> None:
    train(tiny(cohort, "train.iterations=2"), tmp_path / "a")
    train(tiny(cohort, "train.iterations=2"), tmp_path / "b")
    train(tiny(cohort, "train.iterations=2", "seed=1"), tmp_path / "c")
    a, b, c = (weights(tmp_path / f"{n}/checkpoints/last.pt") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bf16_autocast_trains(cohort: Path, tmp_path: Path) -> None:
    result = train(tiny(cohort, "train.iterations=2", "train.precision=bf16"), tmp_path / "run")
    assert result.last_checkpoint.is_file()


def test_refuses_to_overwrite_and_to_resume_nothing(cohort: Path, tmp_path: Path) -> None:
    train(tiny(cohort, "train.iterations=1"), tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(cohort, "train.iterations=1"), tmp_path / "run")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny(cohort), tmp_path / "other", resume=True)
    with pytest.raises(ValueError, match=r"data\.manifest is not set"):
        Trainer(load_config({"method": {"name": "regression_unet"}}), tmp_path / "x")
    with pytest.raises(ValueError, match="multiple of 8"):
        train(tiny(cohort, "data.patch_size=[12,12,12]", "method.channels=[4,8,16,32]"), tmp_path / "y")


def test_corrupt_checkpoint_is_named(cohort: Path, tmp_path: Path) -> None:
    train(tiny(cohort, "train.iterations=1"), tmp_path / "run")
    path = tmp_path / "run/checkpoints/last.pt"
    method, config, _ = load_method(path)
    assert config.method.name == "regression_unet" and not method.training
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt: not a readable checkpoint"):
        load_method(path)
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(CheckpointError, match="not a volsynth checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
