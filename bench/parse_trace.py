#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# Medians of the BITEP_TRACE lines in a log ("[bitep trace] rank R call: T us = phase t ..."; BITEP_TRACE=3's
# "[bitep gpu] ..." lines, whose times are each mark's offset from the call's start, as "call@gpu"), per call
# and rank: python3 bench/parse_trace.py LOG
import sys, re, statistics, collections
groups = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1], errors='replace'):
    m = re.match(r'\[bitep (trace|gpu)\] rank (\d+) (\w+): ([\d.]+) us =(.*)', line)
    if not m: continue
    kind, rank, call, total, rest = m.groups()
    g = groups[(call + ('@gpu' if kind == 'gpu' else ''), rank)]
    g['total'].append(float(total))
    name = []
    for t in rest.split():
        try:
            v = float(t); g[' '.join(name)].append(v); name = []
        except ValueError:
            name.append(t)
for k, g in sorted(groups.items()):
    print(k, 'n=%d' % len(g['total']), ' | '.join(f"{n} {statistics.median(v):.0f}" for n, v in g.items()))
