import csv
import fcntl
import json
import os
from pathlib import Path

import pytest
import torch

from volsynth.config import ExperimentConfig
from volsynth.data.io import write_volume
from volsynth.data.manifest import load_manifest, save_manifest
from volsynth.data.volume import Volume
from volsynth.errors import CheckpointError, ConfigError, DataError, OutputError, TrainingDivergedError
from volsynth.experiment import load_checkpoint, load_config, load_method
from volsynth.methods import build_method
from volsynth.methods.regression_unet import RegressionUNet
from volsynth.training.optim import lr_factor
from volsynth.training.trainer import train
from volsynth.utils import resolve_precision

TINY = {"method": {"name": "regression_unet", "channels": [4, 8], "num_res_units": 1}}


def tiny(manifest: Path, *extra: str) -> ExperimentConfig:
    return load_config(TINY, [
        f"data.manifest={manifest}", "data.sampling.patch_size=[8,8,8]", "data.sampling.per_step=2",
        "train.iterations=6", "train.checkpoint_every=3", "train.val_every=3", "train.log_every=1",
        "train.progress=false", "train.lr=1e-3", "inference.overlap=0.25", "inference.sw_batch_size=8", *extra])


def weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[key]


def test_resume_is_bit_exact_and_time_is_cumulative(cohort: Path, tmp_path: Path) -> None:
    extra = ("train.schedule.kind=multistep", "train.schedule.milestones=[2,4]", "train.grad_clip=1.0")
    train(tiny(cohort, *extra), tmp_path / "straight")
    train(tiny(cohort, *extra, "train.iterations=3"), tmp_path / "resumed")
    train(tiny(cohort, *extra), tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "straight/checkpoints/last.pt"), weights(tmp_path / "resumed/checkpoints/last.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = list(csv.DictReader((tmp_path / "resumed/log.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    straight = list(csv.DictReader((tmp_path / "straight/log.csv").open()))
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight]
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[3] >= seconds[2]  # no restart at 0 after the resume
    validation = list(csv.DictReader((tmp_path / "resumed/validation.csv").open()))
    assert [int(r["iteration"]) for r in validation] == [3, 6] and float(validation[1]["seconds"]) > 0


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
    assert (saved.data.source, saved.data.target) == ("t1", "t2")  # from the manifest
    for name in ("config.yaml", "splits.json", "log.csv", "checkpoints/last.pt"):
        assert oct((tmp_path / "run" / name).stat().st_mode & 0o777) == oct(0o666 & ~_umask()), name


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


@pytest.mark.parametrize(("kind", "factors"), [
    ("cosine", [1.0, 0.5 * (1 + 0.5 ** 0.5), 0.5, 0.5 * (1 - 0.5 ** 0.5), 0.0]),
    ("linear_decay", [1.0, 0.75, 0.5, 0.25, 0.0]),
])
def test_schedules_are_the_closed_forms(kind: str, factors: list[float]) -> None:
    from volsynth.config import ScheduleConfig

    schedule = ScheduleConfig(kind=kind)  # type: ignore[arg-type]
    assert [lr_factor(schedule, it, 4) for it in range(5)] == pytest.approx(factors)
    warm = ScheduleConfig(kind="constant", warmup=4)
    assert [lr_factor(warm, it, 10) for it in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


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


def test_time_box_anneals_a_run_the_clock_stops_and_changes_nothing_otherwise(cohort: Path, tmp_path: Path
                                                                            ) -> None:
    never = ("train.val_every=1000000", "train.checkpoint_every=1000000", "train.schedule.kind=cosine")
    for name, extra in (("boxed", ("train.time_box=true",)), ("cut", ())):
        train(tiny(cohort, "train.iterations=1000000", "train.max_seconds=1.5", *never, *extra), tmp_path / name)
    boxed, cut = ([float(r["lr"]) for r in csv.DictReader((tmp_path / f"{n}/log.csv").open())]
                  for n in ("boxed", "cut"))
    assert 3 < len(boxed) < 1000000 and 3 < len(cut) < 1000000  # both stopped by the clock
    assert cut[-1] > 0.99e-3  # without the time box the cosine has barely begun when the clock stops it
    assert boxed[-1] < 0.05e-3 and boxed == sorted(boxed, reverse=True)  # with it, the cosine ran its course
    # A run that finishes its iterations well inside the budget is bit-identical with and without the time box.
    train(tiny(cohort, "train.max_seconds=600", "train.time_box=true"), tmp_path / "roomy")
    train(tiny(cohort), tmp_path / "plain")
    a, b = weights(tmp_path / "roomy/checkpoints/last.pt"), weights(tmp_path / "plain/checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match=r"train\.time_box"):
        tiny(cohort, "train.time_box=true")  # nothing to follow without max_seconds


def test_auto_precision_is_fp32_on_a_cpu_and_fp16_on_cuda() -> None:
    # A CPU with native bf16 must still train in fp32 under `auto` (torch 2.13's CPU bf16 conv3d backward gave
    # the flagship NaN weight gradients within 6 steps); an explicit choice is kept, and fp16 needs CUDA.
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_weight_average_is_the_closed_form(cohort: Path, tmp_path: Path) -> None:
    decay = 0.8
    torch.manual_seed(0)
    trajectory = [build_method(tiny(cohort).method).state_dict()]  # w0: the initial weights
    for n in (1, 2, 3):
        train(tiny(cohort, f"train.iterations={n}"), tmp_path / f"w{n}")
        trajectory.append(weights(tmp_path / f"w{n}/checkpoints/last.pt"))
    train(tiny(cohort, "train.iterations=3", f"train.ema.decay={decay}"), tmp_path / "ema")
    averaged = weights(tmp_path / "ema/checkpoints/last.pt", "model_ema")
    live = weights(tmp_path / "ema/checkpoints/last.pt")
    for key, value in trajectory[0].items():
        if not value.is_floating_point() or "running" in key:
            continue
        expected = value.double()
        for step in trajectory[1:]:
            expected = decay * expected + (1 - decay) * step[key].double()
        torch.testing.assert_close(averaged[key].double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(live[key], trajectory[3][key])  # the live weights are untouched by averaging
    method, _, _ = load_method(tmp_path / "ema/checkpoints/last.pt")  # predict uses the average
    assert all(torch.equal(method.state_dict()[k], averaged[k]) for k in averaged)


def test_init_from_starts_with_the_other_runs_weights(cohort: Path, tmp_path: Path) -> None:
    train(tiny(cohort, "train.iterations=2"), tmp_path / "first")
    train(tiny(cohort, "train.iterations=1", "train.lr=1e-12", f"train.init_from={tmp_path / 'first'}"),
          tmp_path / "second")
    a, b = weights(tmp_path / "first/checkpoints/last.pt"), weights(tmp_path / "second/checkpoints/last.pt")
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), atol=1e-9, rtol=0)
    other = load_config("mdagan-cpu", [f"data.manifest={cohort}", "train.iterations=1",
                                                         f"train.init_from={tmp_path / 'first'}",
                                                         "data.sampling.patch_size=[8,8,8]", "train.progress=false"])
    with pytest.raises(CheckpointError, match="holds a 'regression_unet' model, this run trains 'mdagan'"):
        train(other, tmp_path / "third")


def test_refuses_to_overwrite_and_to_resume_nothing(cohort: Path, tmp_path: Path) -> None:
    train(tiny(cohort, "train.iterations=1"), tmp_path / "run")
    splits = (tmp_path / "run/splits.json").read_text()
    with pytest.raises(OutputError, match="--resume"):
        train(tiny(cohort, "train.iterations=1", "data.split.mode=paper", "data.split.fold=2"), tmp_path / "run")
    assert (tmp_path / "run/splits.json").read_text() == splits  # a refused run touches nothing
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tiny(cohort), tmp_path / "other", resume=True)
    with pytest.raises(ConfigError, match=r"data\.manifest is not set"):
        train(load_config(TINY), tmp_path / "x")


def test_a_folder_with_other_files_is_never_used(cohort: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "log.csv").write_text("my,own,log\n")
    (folder / "config.yaml").write_text("keep: me\n")
    with pytest.raises(OutputError):
        train(tiny(cohort), folder)
    assert (folder / "log.csv").read_text() == "my,own,log\n" and (folder / "config.yaml").read_text() == "keep: me\n"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "log.csv"]


@pytest.mark.parametrize(("change", "key"), [
    ("data.split.fold=1", "data.split.fold"),
    ("train.lr=0.5", "train.lr"),
    ("data.sampling.patch_size=[16,16,16]", "data.sampling.patch_size"),
])
def test_resume_refuses_changed_data_split_or_optimiser(change: str, key: str, cohort: Path, tmp_path: Path) -> None:
    train(tiny(cohort, "train.iterations=2", "data.split.mode=paper", "data.override_manifest=true"),
          tmp_path / "run")
    before = (tmp_path / "run/config.yaml").read_text()
    with pytest.raises(ConfigError, match=f"--resume would change {key}"):
        train(tiny(cohort, "train.iterations=4", "data.split.mode=paper", "data.override_manifest=true", change),
              tmp_path / "run", resume=True)
    assert (tmp_path / "run/config.yaml").read_text() == before
    # what may change: how long it runs and how it reports
    train(tiny(cohort, "train.iterations=4", "data.split.mode=paper", "data.override_manifest=true",
               "train.log_every=2"), tmp_path / "run", resume=True)
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["iteration"] == 4


def test_two_trainings_cannot_share_a_folder(cohort: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)  # another `volsynth train` holding the run
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(OutputError, match="another `volsynth train` is writing into this run"):
            train(tiny(cohort), folder)
    finally:
        os.close(fd)
    assert not any(folder.iterdir())


def test_the_manifest_is_the_truth(cohort: Path, tmp_path: Path) -> None:
    manifest = load_manifest(cohort)
    manifest.source, manifest.target = "t2", "t1"  # what `inspect --source t2 --target t1` would have written
    splits = {"sub00": "test", "sub01": "train", "sub02": "val", "sub03": None}  # sub03 failed inspect's QC
    for subject in manifest.subjects:
        subject.split = splits[subject.subject]
    path = save_manifest(manifest, cohort.parent / "inspected.json")
    train(tiny(path, "train.iterations=1"), tmp_path / "run")
    saved = load_config(tmp_path / "run/config.yaml")
    assert (saved.data.source, saved.data.target) == ("t2", "t1")
    assert json.loads((tmp_path / "run/splits.json").read_text()) == {"train": ["sub01"], "val": ["sub02"],
                                                                       "test": ["sub00"]}
    with pytest.raises(ConfigError, match=r"data.source is 't1' but .* says source 't2'"):
        train(tiny(path, "data.source=t1"), tmp_path / "other")
    with pytest.raises(ConfigError, match=r"data.split.mode is 'paper' but .* already has a split"):
        train(tiny(path, "data.split.mode=paper"), tmp_path / "other")
    train(tiny(path, "train.iterations=1", "data.source=t1", "data.target=t2", "data.override_manifest=true"),
          tmp_path / "explicit")
    assert load_config(tmp_path / "explicit/config.yaml").data.source == "t1"


@pytest.mark.parametrize("content", ["zero", "constant"])
def test_training_refuses_empty_or_constant_scans(content: str, cohort: Path, tmp_path: Path) -> None:
    manifest = load_manifest(cohort)
    victim = next(s for s in manifest.subjects if s.subject == "sub01")
    path = write_volume(Volume(torch.zeros(24, 24, 24).numpy() + (0 if content == "zero" else 7), (2, 2, 2),
                               (-20.0, 10.0, 5.0)), tmp_path / f"{content}.nii.gz")
    victim.images["t1"] = path
    bad = save_manifest(manifest, cohort.parent / "bad.json")
    with pytest.raises(DataError, match=f"{content}.nii.gz: .*(all-zero|constant).*refusing to train on it"):
        train(tiny(bad, "data.split.mode=random", "data.split.test_fraction=0", "data.split.val_fraction=0"),
              tmp_path / "run")


def test_a_non_finite_loss_names_the_iteration_and_keeps_the_last_checkpoint(
        cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = RegressionUNet.train_step

    def diverging(self, batch, ctx):  # type: ignore[no-untyped-def]
        losses = original(self, batch, ctx)
        return {"loss": float("nan")} if ctx.iteration == 4 else losses

    monkeypatch.setattr(RegressionUNet, "train_step", diverging)
    with pytest.raises(TrainingDivergedError, match=r"non-finite loss at iteration 4 \(loss=nan\).*last\.pt "
                                                    r"\(iteration 3\)"):
        train(tiny(cohort), tmp_path / "run")
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["iteration"] == 3


def test_corrupt_checkpoint_is_named(cohort: Path, tmp_path: Path) -> None:
    train(tiny(cohort, "train.iterations=1"), tmp_path / "run")
    path = tmp_path / "run/checkpoints/last.pt"
    method, config, _ = load_method(path)
    assert config.method.name == "regression_unet" and not method.training
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.pt: not a readable volsynth checkpoint") as error:
        load_method(path)
    assert "weights_only" not in str(error.value)  # never suggest loading untrusted pickles
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(CheckpointError, match="not a volsynth checkpoint"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    evil = tmp_path / "evil.pt"
    torch.save({"format": "volsynth-checkpoint", "x": os.system}, evil)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(evil)
    assert "weights_only" not in str(error.value)
