"""The README's main job, end to end at toy size: phantom → train → predict → evaluate → downstream → report."""

import csv
import json
from pathlib import Path

import pytest

from volsynth.cli import main


@pytest.mark.slow
def test_demo_pipeline_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--subjects", "4", "--iterations", "2", "--spacing", "6",
            "--methods", "mdagan,regression_unet", "--seed", "3"]
    code = main(args)
    assert code == 0
    printed = capsys.readouterr().out
    for method in ("mdagan", "regression_unet"):  # one summary line per method, with the ceiling
        summaries = [line for line in printed.splitlines() if line.startswith(f"[demo] {method} ") and "|" in line]
        assert len(summaries) == 1, printed
        line = summaries[0]
        assert "PSNR" in line and "(ceiling" in line and "masked NMSE" in line and "trained in" in line
    assert json.loads((out / "demo.json").read_text())["seed"] == 3
    index = out / "report" / "index.html"
    html = index.read_text(encoding="utf-8")
    assert "mdagan" in html and "regression_unet" in html
    for method in ("mdagan", "regression_unet"):
        run = out / "runs" / method
        rows = list(csv.DictReader((run / "evaluation" / "metrics.csv").open()))
        test_subjects = json.loads((run / "splits.json").read_text())["test"]
        assert sorted(r["subject"] for r in rows) == sorted(test_subjects)
        assert all(0 < float(r["ssim"]) <= 1 for r in rows)
        summary = json.loads((run / "evaluation" / "summary.json").read_text())
        assert summary["ssim"]["n"] == len(test_subjects)
        assert summary["ceiling"]["psnr"]["n"] == len(test_subjects)  # the phantom's ideal, scored the same way
        assert (run / "downstream").is_dir() or method == "mdagan"  # 2 iterations may leave a flat output
    assert json.loads((out / "timings.json").read_text())["total"] > 0

    # Re-entered with the same settings, the finished trainings are reused as they are.
    checkpoint = out / "runs" / "regression_unet" / "checkpoints" / "last.pt"
    stamp = checkpoint.stat().st_mtime_ns
    assert main(args) == 0
    assert checkpoint.stat().st_mtime_ns == stamp
    capsys.readouterr()
    # A finished training whose settings differ from what this version would train (a preset changed since) is
    # refused, not reported as this version's, and left alone.
    import volsynth.experiment as experiment

    real = experiment.load_config

    def changed_preset(source: object, overrides: list[str] | None = None) -> object:
        if isinstance(source, str) and source.endswith("-cpu"):  # the presets, not a checkpoint's saved config
            return real(source, [*(overrides or []), "train.lr=0.123"])
        return real(source, overrides)

    monkeypatch.setattr(experiment, "load_config", changed_preset)
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "train.lr" in error and "0.123" in error, error
    assert checkpoint.stat().st_mtime_ns == stamp


def test_demo_refuses_a_folder_holding_other_settings_or_other_files(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    # A demo folder re-entered with another seed would silently reuse the old phantom and trained models.
    out = tmp_path / "demo"
    out.mkdir()
    recorded = {"demo": True, "seed": 0, "subjects": 8, "spacing": 3.0, "iterations": None,
                "methods": ["mdagan", "regression_unet"], "overrides": ["train.max_seconds=290", "train.time_box=true"],
                "per_method": {}}
    (out / "demo.json").write_text(json.dumps(recorded))
    assert main(["demo", "--out", str(out), "--seed", "1"]) == 2
    error = capsys.readouterr().err
    assert "other settings" in error and "seed 0 → 1" in error and len(error.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["demo.json"]  # nothing written

    other = tmp_path / "data"
    other.mkdir()
    (other / "scan.nii.gz").write_bytes(b"not touched")
    assert main(["demo", "--out", str(other)]) == 2
    assert "not a demo folder" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["scan.nii.gz"]
