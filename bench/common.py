"""Helpers shared by the benchmarks: statistics, tables, the machine, /proc.

The benchmarks reuse the test suite's NAT lab (tests/natlab.py) and its way
of driving the real programs (tests/procs.py), so tests/ goes on sys.path
here, once, for every bench script that imports this module.
"""

import math
import os
import platform
import socket
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, 'tests')
BUILD = os.path.join(HERE, 'build')
LOADGEN = os.path.join(BUILD, 'loadgen')

for path in (ROOT, TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

import p2pcommon as wire  # noqa: E402  (found through the path above)


def percentile(values, p):
    """The p-th percentile (0-100) by nearest rank; None for no values.

    Nearest rank, not interpolation: with 30 trials, p95 is the 29th
    sample, a time that really happened.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values):
    """The middle value (the lower of the two for an even count); None if empty."""
    return percentile(values, 50)


def markdown_table(headers, rows):
    """A GitHub-flavoured Markdown table, columns padded for plain reading."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row):
        return '| ' + ' | '.join(c.ljust(w) for c, w in zip(row, widths)) + ' |'

    out = [line(cells[0]), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
    out += [line(row) for row in cells[1:]]
    return '\n'.join(out)


def fmt(value, spec='.0f', missing='-'):
    """Format a number, or a dash for a measurement that did not happen."""
    return missing if value is None else format(value, spec)


def machine():
    """One line on this machine: cores, CPU model, Python, kernel, and its load.

    The load average says whether other work shared the machine with a run.
    """
    model = 'unknown CPU'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    model = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    load = ' '.join(f'{x:.2f}' for x in os.getloadavg())
    return (f'{os.cpu_count()} cores (nproc), {model}, Python {platform.python_version()}, '
            f'Linux {platform.release()}; load average now {load}')


def rss_bytes(pid):
    """Resident set size of a process, from /proc/PID/status."""
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    raise ValueError(f'no VmRSS for pid {pid}')


def cpu_seconds(pid):
    """User + system CPU seconds a process (all its threads) has used so far."""
    with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    # After the command name: state is field 3, utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def free_port_pair():
    """A port P with TCP P, UDP P and UDP P+1 free on 127.0.0.1 right now.

    The rendezvous server takes all three.  Another program may take them
    before the server starts; the callers start the server at once.
    """
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(('127.0.0.1', 0))
            port = probe.getsockname()[1]
        if port >= 65535:
            continue
        try:
            held = []
            for kind, p in ((socket.SOCK_STREAM, port), (socket.SOCK_DGRAM, port),
                            (socket.SOCK_DGRAM, port + 1)):
                s = socket.socket(socket.AF_INET, kind)
                held.append(s)
                s.bind(('127.0.0.1', p))
            return port
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise OSError('no free port pair on 127.0.0.1')


def ensure_loadgen():
    """Build bench/build/loadgen from loadgen.c if it is missing or older.

    ``make bench`` builds it; this is for running bench/server.py by hand.
    """
    source = os.path.join(HERE, 'loadgen.c')
    if (os.path.exists(LOADGEN)
            and os.path.getmtime(LOADGEN) >= os.path.getmtime(source)):
        return LOADGEN
    os.makedirs(BUILD, exist_ok=True)
    subprocess.run([os.environ.get('CC', 'cc'), '-O2', '-Wall', '-o', LOADGEN, source],
                   check=True)
    return LOADGEN


def zero_value(fmt):
    """The plainest valid value of a wire format: zeros, empty, 0.0.0.0:0."""
    if isinstance(fmt, str):
        return bytes(struct.calcsize('!' + fmt)) if fmt.endswith('s') else 0
    if fmt is wire.NAME:
        return 'x'
    if fmt is wire.ENDPOINT:
        return ('0.0.0.0', 0)
    for candidate in ([], '', b'', 0):          # Text, Blob, lists, codecs added later
        try:
            fmt.pack(candidate)
            return candidate
        except Exception:                       # noqa: BLE001  (any refusal: try the next)
            continue
    raise ValueError(f'no plain value for {fmt!r}')


def encode(type, **fields):
    """wire.encode, with zero values for fields we do not set.

    The protocol grows fields (REGISTER got tcp_port, for one); a bench
    that names only the fields it cares about keeps working.
    """
    for name, fmt in wire.LAYOUTS[type]:
        if name not in fields:
            fields[name] = zero_value(fmt)
    return wire.encode(type, **fields)
