#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# Medians of the BITEP_TRACE lines in a log ("[bitep trace] rank R call: T us = phase t ..."; BITEP_TRACE=3's
# "[bitep gpu] ..." lines, whose times are each mark's offset from the call's start, as "call@gpu"), per
# shape, call and rank:
#   python3 bench/parse_trace.py LOG [LOG ...]
# The shape is the last "# H=... E=... k=..." header of ep_bench before the line ("-" before any), so the
# medians of one log's shapes are not mixed. The phases keep their order of first appearance; a phase
# missing from some calls (a barrier left out) is the median of the calls that have it, with their number.
import collections
import re
import statistics
import sys


def parse(lines):
    """{(shape, call, rank): {phase: [times]}} in order of first appearance."""
    groups = collections.OrderedDict()
    shape = '-'
    for line in lines:
        h = re.match(r'# (H=\d+ E=\d+ k=\d+)', line)
        if h:
            shape = h.group(1)
            continue
        m = re.match(r'\[bitep (trace|gpu)\] rank (\d+) (\w+): ([\d.]+) us =(.*)', line)
        if not m:
            continue
        kind, rank, call, total, rest = m.groups()
        key = (shape, call + ('@gpu' if kind == 'gpu' else ''), int(rank))
        g = groups.setdefault(key, collections.OrderedDict())
        g.setdefault('total', []).append(float(total))
        name = []
        for t in rest.split():
            try:
                v = float(t)
            except ValueError:
                name.append(t)
                continue
            g.setdefault(' '.join(name), []).append(v)
            name = []
    return groups


def main(paths):
    for path in paths:
        if len(paths) > 1:
            print('==', path)
        with open(path, errors='replace') as f:
            groups = parse(f)
        order = {}
        for shape, _, _ in groups:
            order.setdefault(shape, len(order))
        for (shape, call, rank), g in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2])):
            n_calls = len(g['total'])
            phases = ' | '.join(f'{n} {statistics.median(v):.0f}' + (f' (n={len(v)})' if len(v) != n_calls else '')
                                for n, v in g.items() if n != 'total')
            print(f"{shape} {call} rank {rank} n={n_calls}: total {statistics.median(g['total']):.0f} | {phases}")


if __name__ == '__main__':
    if len(sys.argv) < 2:
        sys.exit('usage: python3 bench/parse_trace.py LOG [LOG ...]')
    main(sys.argv[1:])
