#!/usr/bin/env bash
# Prints the Python interpreter metalora's commands use, creating a project virtual environment first where
# the system Python refuses pip (PEP 668: an EXTERNALLY-MANAGED marker, e.g. Debian/Ubuntu's python3).
#   - inside an active virtual environment (or conda): that environment's python3;
#   - else, if ./.venv exists: .venv/bin/python (made by an earlier run);
#   - else, if the system Python is externally managed: python3 -m venv .venv, then .venv/bin/python;
#   - else: python3 (pip installs into it, as on this project's CI machines).
# METALORA_EXTERNALLY_MANAGED=1|0 overrides the marker check (the test uses it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then echo python3; exit 0; fi
if [ -x .venv/bin/python ]; then echo "$PWD/.venv/bin/python"; exit 0; fi
managed=${METALORA_EXTERNALLY_MANAGED:-$(python3 -c '
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
print(int(os.path.exists(marker) and sys.prefix == sys.base_prefix))')}
if [ "$managed" = 1 ]; then
  python3 -m venv .venv >&2 || {
    echo "scripts/python.sh: this system's python3 refuses pip (PEP 668) and cannot make a virtual environment;" \
      "install python3-venv (apt install python3-venv) and run the command again" >&2
    exit 1
  }
  echo "created $PWD/.venv (the system Python refuses pip); activate it with: source .venv/bin/activate" >&2
  echo "$PWD/.venv/bin/python"
else
  echo python3
fi
