#!/usr/bin/python3
"""Creates (once) the Python environment the reference scripts in tests/tools
need beyond Debian's packages: PyPI `tokenizers` (bpe_reference.py) and
`gguf` (bpe_reference.py, smollm2_reference.py), in a venv that also sees
Debian's numpy. Prints the interpreter path on stdout.

  /usr/bin/python3 tests/tools/make_reference_venv.py
  -> ~/.cache/strata/venv/bin/python   (STRATA_REF_VENV overrides the folder)

Tests look for the interpreter in $STRATA_REF_PYTHON, then this venv, then
/usr/bin/python3, and skip with a message naming this script when the
modules are missing.
"""
import os
import subprocess
import sys
import venv

PACKAGES = ["tokenizers==0.23.3", "gguf==0.19.0"]


def main() -> int:
    home = os.path.expanduser("~")
    root = os.environ.get("STRATA_REF_VENV") or os.path.join(home, ".cache", "strata", "venv")
    python = os.path.join(root, "bin", "python")
    if not os.path.exists(python):
        venv.EnvBuilder(system_site_packages=True, with_pip=True).create(root)
    probe = subprocess.run([python, "-c", "import tokenizers, gguf, numpy"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if probe.returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "--quiet", *PACKAGES],
                       check=True, stdout=sys.stderr)
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
