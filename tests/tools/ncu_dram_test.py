#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""bench/ncu_dram.py on the committed Nsight Compute CSVs (router-dram-ncu-h100-2026-12-06-fac4ef8.csv.tar.gz), whose
medians bench/NOTES.md gives, and on a CSV without the metrics."""
import os
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "bench", "ncu_dram.py")
CSVS = os.path.join(ROOT, "bench", "results", "router-dram-ncu-h100-2026-12-06-fac4ef8.csv.tar.gz")


def expect(cond, what):
    if not cond:
        print("FAILED: " + what)
        sys.exit(1)


def run(path):
    p = subprocess.run([sys.executable, TOOL, path, "16384", "256", "bf16"], capture_output=True, text=True)
    return p.returncode, p.stdout.splitlines()


with tempfile.TemporaryDirectory() as d:
    with tarfile.open(CSVS) as t:
        if hasattr(tarfile, "data_filter"):  # Python 3.12 warns without a filter (3.11.4 on have it)
            t.extractall(d, filter="data")
        else:
            t.extractall(d)
    # config: (the router kernel's median time in us, its DRAM write MB), as NOTES's table has them
    want = {"softmax": ("16.54", "32.96"), "softmax-pre": ("17.28", "32.97"), "deepseek-v3": ("18.21", "32.94")}
    for config, (us, dram_wr) in want.items():
        rc, lines = run(os.path.join(d, "dram-%s.csv" % config))
        expect(rc == 0, "%s: exit status %d" % (config, rc))
        rows = {l.split()[0]: l.split() for l in lines if l and not l.startswith(("#", "kernel"))}
        r = rows.get("router_forward_bucket")
        expect(r is not None and r[1] == "215", "%s: the router kernel's 215 launches: %s" % (config, lines))
        expect(r[2] == us and r[9] == dram_wr, "%s: time %s and DRAM write %s: %s" % (config, us, dram_wr, r))
        expect(r[6] == "(100.0)" and r[8] == "(100.0)",
               "%s: L2 writes and DRAM reads at the floor's bytes: %s" % (config, r))
        shapes = [k for k in rows if k.startswith("stream_kernel")]
        expect(len(shapes) == 4 and sum(int(rows[k][1]) for k in shapes) == 535,
               "%s: four stream shapes, 535 launches: %s" % (config, lines))
    empty = os.path.join(d, "empty.csv")
    with open(empty, "w") as f:
        f.write("==PROF== no metrics here\n")
    rc, _ = run(empty)
    expect(rc == 2, "a CSV without the metrics: exit status %d, not 2" % rc)
print("ncu_dram: ok")
