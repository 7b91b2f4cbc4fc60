import subprocess
import sys
from pathlib import Path

import pytest

from volsynth.cli import main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("inspect", "phantom", "train", "methods", "predict", "evaluate", "downstream", "report", "demo"):
        assert command in text
        assert main([command, "--help"]) == 0
        assert "Example" in capsys.readouterr().out.replace("\n", " ")


def test_version(capsys: pytest.CaptureFixture) -> None:
    import volsynth

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"volsynth {volsynth.__version__}"


def test_help_and_usage_errors_do_not_import_torch() -> None:
    """`volsynth --help` answers fast because torch and MONAI are imported only by the commands that need them."""
    code = ("import sys; from volsynth.cli import main; rc1 = main(['--help']); rc2 = main(['train', '--help']); "
            "rc3 = main(['predict', '--split', 'testing']); "
            "print(rc1, rc2, rc3, 'torch' in sys.modules, 'monai' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip().splitlines()[-1] == "0 0 2 False False"


def test_usage_errors_exit_2_without_a_traceback(capsys: pytest.CaptureFixture) -> None:
    assert main(["nosuchcommand"]) == 2
    assert main(["report", "--bogus"]) == 2
    assert "No such option: --bogus" in capsys.readouterr().err
    assert main(["predict", "--input", "x", "--out", "y", "--run", "r", "--split", "testing"]) == 2
    assert "'testing' is not one of 'train', 'val', 'test'" in capsys.readouterr().err
    assert main(["predict", "--input", "x", "--out", "y", "--run", "r", "--sw-batch-size", "0"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_known_errors_are_one_line(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["train", "--config", "no-such-preset", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Config not found") and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--set", "train.device=cuda"], "device 'cuda' requested but CUDA is not available"),
    (["--set", "train.device=tpu"], "device 'tpu'"),
    (["--set", "train.iterations=0"], "train.iterations must be >= 1, got 0"),
    (["--set", "train.checkpoint_every=0"], "train.checkpoint_every must be >= 1"),
    (["--set", "data.sampling.patch_size=[-8,16,16]"], "data.sampling.patch_size must be positive"),
    (["--set", "data.sampling.per_step=0"], "data.sampling.per_step must be >= 1"),
    (["--set", "data.source=t9", "--set", "data.override_manifest=true"], "no subject has modality 't9'"),
    (["--set", "data.source=pd"], "data.source is 'pd' but"),
])
def test_bad_training_options_are_one_line_errors_before_any_work(args: list[str], message: str, cohort: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code = main(["train", "--config", "regression_unet-cpu", "--data", str(cohort), "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())  # nothing written for a refused run
