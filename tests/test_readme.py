"""The README's quick start, run as written (only the iteration count is lowered), so it cannot drift again.

Every command is also checked to write only inside its own output: the whole working folder is snapshotted
before and after each command, and any file created, changed or deleted elsewhere fails the test.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip().startswith("volsynth ")]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def allowed_prefix(arguments: list[str]) -> str:
    """Where a command may write: its --out (a file or folder), or RUN/downstream for `downstream`."""
    if arguments[1] == "downstream":
        return str(Path(arguments[arguments.index("--run") + 1]) / "downstream")
    return arguments[arguments.index("--out") + 1]


def test_the_readme_names_only_commands_that_exist() -> None:
    commands = quick_start()
    assert commands, "no quick-start commands found in README.md"
    assert "volsynth train" in " ".join(commands) and "volsynth report" in " ".join(commands)
    for command in commands:
        assert "--out" in command or " downstream " in command, command


@pytest.mark.slow
def test_quick_start_runs_as_written_and_writes_only_inside_each_out(tmp_path: Path) -> None:
    binary = Path(sys.executable).with_name("volsynth")
    volsynth = str(binary) if binary.exists() else shutil.which("volsynth")
    assert volsynth, "the volsynth command is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1"}
    for command in quick_start():
        # The only change: fewer steps. 40, not fewer: the flagship preset's untrained output can lie below 0
        # everywhere (clipped to a flat 0), and `downstream` rightly refuses a flat brain.
        command = re.sub(r"train\.iterations=\d+", "train.iterations=40", command)
        arguments = shlex.split(command)
        before = snapshot(tmp_path)
        result = subprocess.run([volsynth, *arguments[1:]], cwd=tmp_path, capture_output=True, text=True,
                                env=env, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        after = snapshot(tmp_path)
        prefix = allowed_prefix(arguments)
        touched = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        outside = sorted(k for k in touched if not (k == prefix or k.startswith(prefix.rstrip("/") + "/")))
        assert not outside, f"{command} wrote outside {prefix}: {outside[:10]}"
    # What the quick start promises.
    import yaml

    config = yaml.safe_load((tmp_path / "runs/mdagan/config.yaml").read_text())
    assert (config["data"]["source"], config["data"]["target"]) == ("t2", "flair")  # the manifest's task
    assert sorted(p.name for p in (tmp_path / "runs/mdagan/predictions").glob("*.nii.gz")) == [
        f"{s}_synthetic-flair.nii.gz" for s in sorted(yaml.safe_load((tmp_path / "runs/mdagan/splits.json")
                                                                     .read_text())["test"])]
    assert (tmp_path / "report/index.html").is_file()
