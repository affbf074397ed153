#!/usr/bin/env bash
# Installs Strata's build and test dependencies from Debian's packages.
# Idempotent: does nothing when everything is already installed.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config ccache git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libabsl-dev
  prometheus-cpp-dev libgloo-dev libgmock-dev libgtest-dev nlohmann-json3-dev
  libspdlog-dev libfmt-dev libcli11-dev libopenblas-dev libopenblas-openmp-dev
  bazel-bootstrap
  python3 python3-numpy python3-sentencepiece python3-grpcio python3-grpc-tools
)
# Extra packages for the observability and deployment tests.
if [[ "${STRATA_SETUP_EXTRA:-}" != "" ]]; then
  read -r -a extra <<<"${STRATA_SETUP_EXTRA}"
  PACKAGES+=("${extra[@]}")
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "setup: all ${#PACKAGES[@]} packages present"
  exit 0
fi
echo "setup: installing ${missing[*]}"
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
