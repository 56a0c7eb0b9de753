#!/usr/bin/env bash
# MeTA-LoRA's sweeps at our scale (issue 19 item 4; the paper's Table 10: inner steps k, Table 11: support and
# query sizes): the protocol's MeTA-LoRA recipe (n=2, 100 iterations, five training tasks, 50 examples each)
# with k in {1, 2, 3, 4} and |S| = |Q| in {4, 8, 16}, each a recipe variant (RECIPE.yaml@key=value, a row of
# its own), 2 seeds, scored on the protocol's held-out MMLU and BBH items (LIMIT per task). The k=3 and
# |S|=|Q|=8 rows are the protocol's setting. Resumable: run it again after an interruption.
# Results: runs/studies/meta_sweeps/compare.{json,md}, plots/. Extra arguments go to metalora compare.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
R=configs/studies/meta_protocol/meta_lora.yaml
TASKS=${TASKS:-$(python3 -c "
from metalora.data import mmlu_subjects
from metalora.data.bbh import BBH_TASKS, UNBUILDABLE
print(','.join([f'mmlu:{s}' for s in mmlu_subjects()] + [f'bbh:{t}' for t in BBH_TASKS if t not in UNBUILDABLE]))")}
metalora compare "$R@meta.inner_steps=1" "$R@meta.inner_steps=2" "$R@meta.inner_steps=3" "$R@meta.inner_steps=4" \
  "$R@meta.support_size=4@meta.query_size=4" "$R@meta.support_size=16@meta.query_size=16" \
  --tasks "$TASKS" --limit "${LIMIT:-18}" --seeds "${SEEDS:-0,1}" --jobs "${JOBS:-2}" \
  --reference "meta_lora@meta.inner_steps=3" --out "${OUT:-runs/studies/meta_sweeps}" "$@"
