"""The README's memory guarantee holds with several sequences at once: four ~2K-token prompts (one
generate() call, or four threads streaming at once) on a model three times larger than its device
budget, every layer streamed from disk.

README ("Memory guarantee"): peak process memory stays within ``device_mem + host_mem + 32 MiB`` on
top of the Python+torch runtime, whatever the prompt length. As in ``test_memory_budget``'s long-
prompt case, a subprocess runs under a real memory cap (``/work/shared/tools/memcap``: a cgroup,
page cache included) a little above runtime + budgets + overhead, must not be killed, and the memory
it allocates (anonymous + shared pages, sampled every half millisecond) may grow by at most the
budgets + 32 MiB. Four sequences of ~2K tokens hold 4x the KV of one, all of it beyond the device
room: with the step scheduler they are live together, so their KV must spill to disk, not grow RSS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_memory_budget import (CAP_SLACK_BYTES, FIXED_OVERHEAD_BYTES, MEMCAP, PROBE_PRELUDE, _memcap, _runtime_bytes,
                                streaming_model)

LENGTHS = (2048, 1990, 2020, 1960)     # ragged, ~2K tokens each
NEW_TOKENS = 3

_PROBE = PROBE_PRELUDE + r"""
model, offload, device_mem, lengths = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
base = anon_bytes()
threading.Thread(target=sample, daemon=True).start()
engine = tierkv.load(model, device_mem=device_mem, host_mem=0, offload_dir=offload, device="cpu",
                     kv_device_tokens=512)
prompts = [[(7 * i + 13 * s) % 4000 + 3 for i in range(n)] for s, n in enumerate(map(int, lengths.split(",")))]
new_tokens, mode = int(sys.argv[5]), sys.argv[6]
if mode == "batch":                     # one generate() call with the four prompts, in this thread
    results = engine.generate(prompts, max_new_tokens=new_tokens, ignore_eos=True)
else:                                   # four threads streaming at once
    streams = [engine.stream(p, max_new_tokens=new_tokens, ignore_eos=True) for p in prompts]
    barrier = threading.Barrier(len(streams))

    def consume(stream):
        barrier.wait()
        for _ in stream:
            pass

    threads = [threading.Thread(target=consume, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [s.results[0] for s in streams]
growth = max(peak[0], anon_bytes()) - base
stop.set()
print(json.dumps({"growth": growth, "disk_layers": len(engine.plan.disk_layers), "summary": engine.plan.summary(),
                  "tokens": [r.token_ids for r in results], "batch_sizes": [r.stats.batch_size for r in results],
                  "kv": [{k: r.stats.kv.get(k) for k in ("device_bytes", "host_bytes", "disk_bytes")}
                         for r in results]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["batch", "threads"])   # threads: every step runs on the one engine thread
def test_four_concurrent_2k_sequences_stay_within_the_memory_guarantee(tmp_path: Path, mode: str) -> None:
    if not MEMCAP.is_file():
        pytest.skip(f"{MEMCAP} is not on this machine")
    model, path = streaming_model(tmp_path / "model")
    budget = 22 << 20
    assert sum(f.stat().st_size for f in path.glob("*.safetensors")) > 3 * budget
    root = Path(__file__).resolve().parent.parent
    cap = _runtime_bytes(root) + budget + FIXED_OVERHEAD_BYTES + CAP_SLACK_BYTES
    args = ["-c", _PROBE, str(path), str(tmp_path / "off"), str(budget), ",".join(map(str, LENGTHS)), str(NEW_TOKENS),
            mode]
    out = _memcap(cap, args, root)
    assert out.returncode == 0, f"killed or failed under a {cap >> 20} MiB cap: {out.stderr[-2000:]}"
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"growth {report['growth'] / 2**20:.1f} MiB of {(budget + FIXED_OVERHEAD_BYTES) / 2**20:.0f} allowed, cap "
          f"{cap / 2**20:.0f} MiB, batch sizes {report['batch_sizes']}, kv {report['kv']}")   # shown with -s
    assert report["disk_layers"] >= 8, report["summary"]
    assert report["growth"] <= budget + FIXED_OVERHEAD_BYTES, report
    kv_bytes = 2 * 12 * 1 * 64 * 4                        # fp32 K and V per token: 12 layers, 1 KV head of 64
    assert sum(LENGTHS) * kv_bytes > budget                # the four sequences' KV alone is beyond the budgets
    import torch

    for s, (n, tokens) in enumerate(zip(LENGTHS, report["tokens"])):   # streamed and tiered: the resident tokens
        ids = [(7 * i + 13 * s) % 4000 + 3 for i in range(n)]
        with torch.no_grad():
            expected = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, n:].tolist()
        assert tokens == expected, s
