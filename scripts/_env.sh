# Sourced by scripts/demo.sh and scripts/test.sh: create .venv if missing and install volsynth into it.
# torch is pinned to 2.13.0 (constraints.txt); pip takes the CPU wheel already on this machine kind.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python=$(command -v python3.11 || command -v python3)
    echo "Creating .venv with $python" >&2
    if ! "$python" -m venv .venv; then
        echo "error: could not create a virtual environment; on Debian/Ubuntu: apt-get install python3-venv" >&2
        exit 1
    fi
fi
# Re-install only when the dependency declarations changed (a cheap stamp, so repeated runs start fast).
stamp=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ "$(cat .venv/.install-stamp 2>/dev/null)" != "$stamp" ]; then
    echo "Installing volsynth and its dependencies into .venv (first run only: about 1-2 min where the torch" \
         "wheel is local, longer where it must be downloaded)..." >&2
    .venv/bin/python -m pip install --progress-bar on --disable-pip-version-check -c constraints.txt -e ".[test]" \
        | grep -E "^(Collecting|Installing|Successfully)" >&2 || true
    .venv/bin/python -c "import volsynth, torch, monai" || { echo "error: the installation failed (see above)" >&2; exit 1; }
    echo "$stamp" > .venv/.install-stamp
fi
export PATH="$PWD/.venv/bin:$PATH"
# glibc returns freed tensor memory to the OS by default, which causes page-fault storms in 3D convs
# (see benchmarks/RESULTS.md); keep it mapped instead.
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184}"
export PYTHONUTF8=1  # UTF-8 file I/O even where the locale is C/POSIX (CI)
