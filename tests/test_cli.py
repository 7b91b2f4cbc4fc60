import pytest

from volsynth.cli import main


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("inspect", "phantom", "train", "methods", "predict", "evaluate", "downstream", "report", "demo"):
        assert command in text
        assert main([command, "--help"]) == 0
        assert "Example: volsynth" in capsys.readouterr().out.replace("\n", " ")


def test_usage_errors_exit_2_without_a_traceback(capsys: pytest.CaptureFixture) -> None:
    assert main(["nosuchcommand"]) == 2
    assert main(["report", "--bogus"]) == 2
    assert "No such option: --bogus" in capsys.readouterr().err


def test_known_errors_are_one_line(capsys: pytest.CaptureFixture, tmp_path) -> None:
    assert main(["train", "--config", "no-such-preset", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Config not found") and "Traceback" not in err
