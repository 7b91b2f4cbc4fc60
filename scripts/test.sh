#!/usr/bin/env bash
# Runs the whole test suite (slow end-to-end tests included). Creates .venv if missing.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the quick subset.
source "$(dirname "$0")/_env.sh"
ruff check src tests benchmarks
exec python -m pytest -q "$@"
