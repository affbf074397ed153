#!/usr/bin/env bash
# Sets up, builds, and runs Strata on the default model (stories15M from
# ../shared/data unless --model or STRATA_MODEL says otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh
tools/build.sh strata
exec build/strata generate "$@"
