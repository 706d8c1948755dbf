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
]
with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump({"card": "test", "date": "-", "commit": "-", "hbm_GBps": 1.0, "records": records}, f)
lines = run(f.name)
os.unlink(f.name)
got = counts(lines)
expect(got["2x TE"] == "0 of 7", "2x TE: %s" % got["2x TE"])  # one slow row, six absent
expect(got["fused bitmap faster than indices + convert"] == "0 of 1", str(got))
expect(got["bitmap no slower than bytemap"] == "0 of 1", str(got))  # the bwd bitmap rows have no bytemap beside
expect(got["75% of the floor by the launch time"] == "0 of 1", str(got))
expect(got["75% of the floor by the batch time"] == "0 of 1", str(got))
expect(got["recompute faster than saved (bf16)"] == "0 of 1", str(got))
expect(sum(1 for l in lines if l.startswith("  miss: ")) == 7 + 1 + 1 + 1 + 1 + 1,
       "one miss line a row missed: %s" % lines)
print("router_targets: ok")
