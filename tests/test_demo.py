"""The README's main job, ``metalora demo --quick``, end to end on the real embedded SmolLM2 (CI smoke test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def test_quick_demo_writes_report_plots_and_a_peft_adapter(tmp_path):
    out = tmp_path / "runs" / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "metalora.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "## Held-out evaluation" in report and "| arc_easy |" in report
    assert "## Efficiency counters" in report and "| optimizer_steps | 2 |" in report
    for png in ("accuracy.png", "loss.png"):
        assert (out / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation["after"]) == set(evaluation["base"]) == {"arc_easy", "csqa", "siqa", "sst2"}
    counters = json.loads((out / "counters.json").read_text())
    # 4 tasks per iteration, k=1 inner step on |S|=4, |Q|=4: n·(k·|S|+|Q|) = 32 samples per iteration
    assert counters["samples"] == 2 * 32

    import peft

    from metalora.models import load_base

    base, tok = load_base("smollm2-135m")
    peft_model = peft.PeftModel.from_pretrained(base, str(out / "peft_adapter")).eval()
    ids = tok(["Question: which is a mammal?\nA. shark\nB. whale\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        adapted = peft_model(**ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(**ids).logits
    assert not torch.allclose(adapted, plain), "the exported adapter changes nothing"
