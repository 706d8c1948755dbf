#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench/router_targets.py against a committed grid whose counts are known, and against rows made to miss each target."""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "bench", "router_targets.py")


def run(path):
    out = subprocess.run([sys.executable, TOOL, path], check=True, capture_output=True, text=True).stdout
    return out.splitlines()


def counts(lines):
    return {l.split(":")[0]: l.split(": ", 1)[1] for l in lines if not l.startswith((" ", "#"))}


def expect(cond, what):
    if not cond:
        print("FAILED: " + what)
        sys.exit(1)


# The grid at ba0a58c (router v71): the counts bench/NOTES.md gives for it.
got = counts(run(os.path.join(ROOT, "bench", "results", "router-h100-2026-12-06-ba0a58c.json")))
want = {
    "2x TE": "7 of 7",
    "fused bitmap faster than indices + convert": "96 of 96",
    "bitmap no slower than bytemap": "190 of 192",
    "75% of the floor by the launch time": "16 of 28",
    "75% of the floor by the batch time": "21 of 28",
    "recompute faster than saved (bf16)": "39 of 48",
}
expect(got == want, "ba0a58c's counts: %s" % got)

# A grid from before the batch time (f0ca920): the launch time's count, and the batch time's said to be absent.
got = counts(run(os.path.join(ROOT, "bench", "results", "router-h100-2026-12-05-f0ca920.json")))
expect(got.get("75% of the floor by the launch time") == "12 of 28", "f0ca920's launch count: %s" % got)
expect(got.get("75% of the floor by the batch time") == "not in this file", "f0ca920's batch count: %s" % got)

# One row of each kind, each made to miss its target.
def rec(**kw):
    r = {"T": 16384, "E": 256, "k": 8, "config": "softmax", "dtype": "bf16", "format": "bitmap", "pass": "fwd",
         "mode": "te", "median_us": 30.0, "floor_us": 14.0, "pct_of_floor": 46.7, "batch_us": 29.0,
         "pct_of_floor_batch": 48.3}
    r.update(kw)
    return r


records = [
    rec(),  # 44.2 / 30.0 = 1.47x TE: misses 2x; 46.7% misses 75%
    rec(format="bytemap", median_us=29.0),  # bitmap slower than bytemap
    rec(format="indices+convert", median_us=29.5),  # fused slower than indices + convert
    rec(**{"pass": "bwd"}, mode="recompute", median_us=10.0),
    rec(**{"pass": "bwd"}, mode="saved", median_us=9.0),  # recompute slower than saved
    # 75% missed where a plain copy of the bytes meets it: floor 14, the line 18.67 us; past an empty kernel's 4.00
    # (2.00 in a batch) it needs 14 / 14.67 = 95.5% of the copy's rate (84.0% in a batch) and runs at 14 / 16 = 87.5%
    # (82.4%); the copies 14 / 13 = 107.7% and 14 / 14 = 100.0%.
    rec(config="softmax-pre", median_us=20.0, pct_of_floor=70.0, stream_us=17.0, batch_us=19.0,
        pct_of_floor_batch=73.7, stream_batch_us=16.0),
]
# The first row's plain copies miss 75% too (14 / 20 = 70.0%, 14 / 19 = 73.7%).
records[0].update(stream_us=20.0, stream_batch_us=19.0)
with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump({"card": "test", "date": "-", "commit": "-", "hbm_GBps": 1.0, "empty_us": 4.0, "empty_batch_us": 2.0,
               "records": records}, f)
lines = run(f.name)
os.unlink(f.name)
got = counts(lines)
expect(got["2x TE"] == "0 of 7", "2x TE: %s" % got["2x TE"])  # one slow row, six absent
expect(got["fused bitmap faster than indices + convert"] == "0 of 1", str(got))
expect(got["bitmap no slower than bytemap"] == "0 of 1", str(got))  # the bwd bitmap rows have no bytemap beside
expect(got["75% of the floor by the launch time"] == "0 of 2", str(got))
expect(got["75% of the floor by the batch time"] == "0 of 2", str(got))
expect(got["recompute faster than saved (bf16)"] == "0 of 1", str(got))
expect(sum(1 for l in lines if l.startswith("  miss: ")) == 7 + 1 + 1 + 2 + 2 + 1,
       "one miss line a row missed: %s" % lines)
want_lines = [
    "  miss: T=16384 E=256 softmax bf16 fwd te bitmap: 46.7%; a plain copy of the same bytes 70.0%, under the line too",
    "  miss: T=16384 E=256 softmax-pre bf16 fwd te bitmap: 70.0%; past an empty kernel's 4.00 us it needs 95.5% of the "
    "copy's rate, runs at 87.5% (a plain copy: 107.7%)",
    "  miss: T=16384 E=256 softmax bf16 fwd te bitmap: 48.3%; a plain copy of the same bytes 73.7%, under the line too",
    "  miss: T=16384 E=256 softmax-pre bf16 fwd te bitmap: 73.7%; past an empty kernel's 2.00 us it needs 84.0% of the "
    "copy's rate, runs at 82.4% (a plain copy: 100.0%)",
]
for w in want_lines:
    expect(w in lines, "the line %r in %s" % (w, lines))
expect(lines.count("  (1 of the misses where a plain copy of the same bytes misses too)") == 2, str(lines))
print("router_targets: ok")
