#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""SASS instructions of the kernels whose mangled name holds a fragment, in each of several binaries.

  bench/sass_count.py FRAGMENT[,FRAGMENT...] BINARY [BINARY...]

Runs `cuobjdump -sass` on each binary (the GPU machine's CUDA toolkit has it; the CI machine's has not) and prints, per
fragment and binary, each matching kernel's instruction count and its counts of a few opcodes that the router's
tuning watches (MUFU, shuffles, branches, spills), so that a source change's effect on a kernel reads as a difference
of static counts beside its A/B timings. Static counts: a loop's body counts once, as many times as the compiler
unrolled it.
"""
import collections
import re
import subprocess
import sys

WATCH = ("MUFU", "SHFL", "BRA", "FFMA", "FADD", "FMUL", "STL", "LDL")


def kernels(binary):
    """{mangled name: Counter of opcodes} for every kernel in the binary."""
    out = subprocess.run(["cuobjdump", "-sass", binary], check=True, capture_output=True, text=True).stdout
    res = {}
    cur = None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = res.setdefault(m.group(1), collections.Counter())
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and cur is not None:
            op = m.group(2)
            cur["all"] += 1
            cur[op.split(".")[0]] += 1
    return res


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    frags = sys.argv[1].split(",")
    per_binary = [(b, kernels(b)) for b in sys.argv[2:]]
    for frag in frags:
        print(f"== kernels matching {frag}")
        for b, ks in per_binary:
            hits = sorted(k for k in ks if frag in k)
            if not hits:
                print(f"  {b}: none")
            for k in hits:
                c = ks[k]
                ops = " ".join(f"{w} {c[w]}" for w in WATCH)
                print(f"  {b}: {c['all']} instructions ({ops})  {k[-60:]}")


if __name__ == "__main__":
    main()
