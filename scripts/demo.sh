#!/usr/bin/env bash
# The main job: phantom cohort -> train -> predict -> evaluate -> report. Creates .venv if missing.
# Extra arguments go to `volsynth demo` (see `volsynth demo --help`).
source "$(dirname "$0")/_env.sh"
exec volsynth demo "$@"
