#!/usr/bin/env bash
# MeTA-LoRA's own protocol at our scale (issue 19 item 4): train on five tasks (50 examples each; the full
# training splits for lora_full), score on held-out benchmarks only: MMLU 5-shot on every subject (LIMIT
# items each: 18 gives 1,026, stratified by subject; MMLU-math reported as its own group) and the 23 BBH
# subtasks BIG-bench's sdist can build (of 27: not boolean_expressions, multistep_arithmetic_two, web_of_lies,
# dyck_languages; metalora/data/bbh.py) 3-shot. Base model, few-shot LoRA and HydraLoRA, full-data LoRA, MeTA-LoRA
# (n=2, k=3, |S|=|Q|=8) and -STA, 2 seeds. Resumable: run it again after an interruption.
# Results: runs/studies/meta_protocol/compare.{json,md}, plots/. Extra arguments go to metalora compare.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
D=configs/studies/meta_protocol
TASKS=${TASKS:-$(python3 -c "
from metalora.data import mmlu_subjects
from metalora.data.bbh import BBH_TASKS, UNBUILDABLE
print(','.join([f'mmlu:{s}' for s in mmlu_subjects()] + [f'bbh:{t}' for t in BBH_TASKS if t not in UNBUILDABLE]))")}
metalora compare $D/lora_fewshot.yaml $D/meta_lora.yaml $D/meta_lora_sta.yaml $D/hydra_fewshot.yaml $D/lora_full.yaml \
  --tasks "$TASKS" --limit "${LIMIT:-18}" --seeds "${SEEDS:-0,1}" --jobs "${JOBS:-2}" --base --reference lora_fewshot \
  --out "${OUT:-runs/studies/meta_protocol}" "$@"
