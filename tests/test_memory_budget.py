"""Peak process memory stays within the budgets plus the fixed overhead the README states.

A subprocess (fresh peak-RSS counter) loads a checkpoint about three times larger than its device
budget, converts it on first use, streams every layer it cannot hold, and reports its peak RSS
growth over the interpreter-with-torch baseline.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import build_hf_model, save_hf_model

FIXED_OVERHEAD_BYTES = 32 << 20   # the README's figure: runtime buffers outside the budgets

_PROBE = r"""
import json, resource, sys
import psutil, torch
torch.set_num_threads(1)
import tierkv
model, offload, device_mem = sys.argv[1:4]
base = max(psutil.Process().memory_info().rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
engine = tierkv.load(model, device_mem=device_mem, host_mem=0, offload_dir=offload, device="cpu")
result = engine.generate([1, 2, 3, 4, 5, 6], max_new_tokens=8)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - base, "disk_layers": len(engine.plan.disk_layers),
                  "tokens": result.token_ids}))
"""


def test_peak_rss_within_budget_on_a_model_three_times_larger(tmp_path: Path) -> None:
    model = build_hf_model("llama", hidden_size=256, num_hidden_layers=16, intermediate_size=1024,
                           num_attention_heads=4, num_key_value_heads=4, vocab_size=4096,
                           max_position_embeddings=128)
    path = save_hf_model(model, tmp_path / "model")
    model_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    budget = 24 << 20
    assert model_bytes > 3 * budget
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(tmp_path / "off"), str(budget)],
                         capture_output=True, text=True, timeout=300, cwd=root,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["disk_layers"] >= 10
    assert report["growth"] <= budget + FIXED_OVERHEAD_BYTES, report
    import torch

    expected = model.generate(torch.tensor([[1, 2, 3, 4, 5, 6]]), max_new_tokens=8, do_sample=False)[0, 6:].tolist()
    assert report["tokens"] == expected
