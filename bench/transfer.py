"""Transfer speed: /send over the punched path against plain TCP.

    sudo python3 bench/transfer.py [--size 50] [--losses 0 0.01 0.05] [--repeat 1]
                                   [--without tcp-cubic ...] [--profile DIR]

In the NAT lab (tests/natlab.py), two port-restricted NATs, every WAN link
limited to RATE Mbit/s each way (a tbf qdisc, ``rate_mbit``) and delayed by
DELAY ms each way (tests/nfdelay.py).  a1 sends a random file to b1; the
path crosses both WAN links, so its round trip is 4 x DELAY (20 ms by
default; the TCP handshake measures it).  For each loss rate:

* plain TCP: the same file, a1 -> b1, through both NATs.  Neither host can
  listen behind its NAT, so the two open the connection the way TCP hole
  punching does, by a simultaneous open: b1 connects first (its SYN dies at
  NAT A but opens NAT B), then a1 connects from the port b1 aimed at.  The
  sender hands the file to the kernel (``sendfile``), the receiver writes
  it to a file, as netcat would.  Kernel buffers; the namespace's default
  congestion control (printed with the table), and again with CUBIC set on
  the socket (``tcp-cubic``).
* ours, UDP: the real rendezvous server on the lab's server host, alice on
  a1 and bob on b1 with ``--udp-only``; alice types ``/send FILE``, bob
  ``/accept``.
* ours, TCP: the same with ``--tcp-only`` (our messages over the punched TCP
  connection).

Each clock starts when the transfer is released (``go`` to the TCP sender,
``/accept`` to bob) and stops when the receiver says it has the whole file
(for ours: size and SHA-256 checked, file renamed).  Goodput is file bits
over that time.  Loss is per direction over the whole path: the lab drops
packets on each of the two links, so each gets 1 - sqrt(1 - loss).

The delay program is Python handling every packet twice (once per WAN
link), so it may be the bottleneck itself: a first lab without delay and
without loss measures plain TCP and ours at the rate limit alone, and every
row shows how busy the delay program, sender and receiver were (CPU
seconds over wall-clock seconds; 100 % is one core).

``--profile DIR`` runs our clients under cProfile (slower) and prints where
their time goes.  Needs root (network namespaces) and tc.  Prints tables;
see bench/README.md.
"""

import argparse
import functools
import hashlib
import math
import os
import pstats
import shutil
import socket
import struct
import sys
import tempfile
import time

from common import cpu_seconds, fmt, machine, markdown_table, median  # first: tests/ on sys.path

import natlab
from labpeers import SERVER_PORT, LabRun, how
from procs import PYTHON, ROOT, start

TCP_PORT = 45000            # both ends of the plain TCP connection bind this port
START_TRIES = 3             # a client that fails to register (under loss) is retried


# ----------------------------------------------------------------------------
# The plain TCP contender: runs inside the lab's namespaces


def simultaneous_connect(port, peer, congestion=None, tries=10, wait=3.0):
    """Connect from local ``port`` to ``peer`` while the peer connects to us.

    Each NAT drops the other side's first SYN; once both have sent one, a
    SYN gets through and the kernel completes the simultaneous open.
    """
    for _ in range(tries):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if congestion:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        sock.bind(('0.0.0.0', port))
        sock.settimeout(wait)
        try:
            sock.connect(peer)
        except OSError:
            sock.close()
            time.sleep(0.1)
            continue
        sock.settimeout(None)
        return sock
    raise SystemExit(f'no TCP connection to {peer} after {tries} tries')


def tcp_info(sock):
    """Round trips (ms) and retransmissions from the kernel's struct tcp_info."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    info = {'srtt_ms': struct.unpack_from('I', raw, 68)[0] / 1000,
            'retrans_segs': struct.unpack_from('I', raw, 100)[0]}
    if len(raw) >= 160:
        info['min_rtt_ms'] = struct.unpack_from('I', raw, 148)[0] / 1000
        info['segs_out'] = struct.unpack_from('I', raw, 136)[0]
    return info


def tcp_peer(args):
    """``transfer.py tcp-send|tcp-recv``: one end of the plain TCP transfer."""
    host, port = args.peer.rsplit(':', 1)
    print('connecting', flush=True)
    sock = simultaneous_connect(args.port, (host, int(port)), args.congestion)
    print('connected', *(f'{k}={v}' for k, v in tcp_info(sock).items()), flush=True)
    if args.role == 'tcp-send':
        sys.stdin.readline()                    # "go"
        with open(args.file, 'rb') as stream:
            sock.sendfile(stream)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)                            # the receiver closes when it has it all
        print('sent', *(f'{k}={v}' for k, v in tcp_info(sock).items()), flush=True)
    else:
        got = 0
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        with open(args.file, 'wb') as out:
            while count := sock.recv_into(buffer):
                out.write(view[:count])
                got += count
        print(f'done {got}', flush=True)
    sock.close()
    return 0


# ----------------------------------------------------------------------------
# Measuring


def process_cpu(pids):
    """CPU seconds of each pid, None for one that is gone; 'machine': (busy, all)."""
    with open('/proc/stat') as f:
        ticks = [int(t) for t in f.readline().split()[1:9]]   # up to steal; guest is in user
    hz = os.sysconf('SC_CLK_TCK')
    idle = ticks[3] + ticks[4]                      # idle and iowait
    out = {'machine': ((sum(ticks) - idle) / hz, sum(ticks) / hz)}
    for name, pid in pids.items():
        try:
            out[name] = cpu_seconds(pid)
        except (OSError, ValueError, IndexError):
            out[name] = None
    return out


def busy(before, after, seconds):
    """Each process's CPU share over ``seconds`` of wall clock (1.0 = one core).

    'machine' is the share of all cores that anything (other work on the
    machine, the kernel's packet forwarding) kept busy meanwhile.
    """
    (busy_before, all_before), (busy_after, all_after) = before['machine'], after['machine']
    shares = {'machine': (busy_after - busy_before) / max(all_after - all_before, 1e-9)}
    for name in before:
        if name != 'machine':
            shares[name] = (after[name] - before[name]) / seconds \
                if before[name] is not None and after[name] is not None else None
    return shares


class Bench:
    """One lab at a time, and the transfers measured in it."""

    def __init__(self, args, workdir, payload):
        self.args = args
        self.workdir = workdir
        self.payload = payload
        self.size = os.path.getsize(payload)
        with open(payload, 'rb') as stream:
            self.digest = hashlib.file_digest(stream, 'sha256').hexdigest()
        self.count = 0
        self.profiles = []          # (label, path)
        self.congestion_control = None

    def timeout(self):
        """Seconds a transfer may take: the file at 1 Mbit/s, at least 2 minutes."""
        return max(120.0, self.size * 8 / 1e6)

    def lab(self, loss, delay_ms):
        per_link = 1 - math.sqrt(1 - loss)
        return natlab.Lab('port-restricted', 'port-restricted', delay_ms=delay_ms,
                          loss=per_link, rate_mbit=self.args.rate)

    def helpers(self, lab):
        """The delay program's pid (the only process in inet), for its CPU time."""
        pids = natlab.pids_in_netns(lab.ns('inet'))
        return {'nfdelay': pids[0]} if pids else {}

    # -- plain TCP -----------------------------------------------------------

    def plain_tcp(self, lab, congestion=None):
        """a1 -> b1 over a simultaneously opened TCP connection."""
        received = os.path.join(self.workdir, 'tcp.out')
        me = os.path.abspath(__file__)
        receiver = start([PYTHON, '-u', me, 'tcp-recv', '--port', str(TCP_PORT),
                          '--peer', f'{lab.public_addr("a")}:{TCP_PORT}', '--file', received],
                         'tcp receiver', functools.partial(lab.popen, 'b1'))
        sender = None
        try:
            receiver.expect('^connecting$', 10)
            time.sleep(0.05)        # b1's SYN first: it opens NAT B for a1's
            sender = start([PYTHON, '-u', me, 'tcp-send', '--port', str(TCP_PORT),
                            '--peer', f'{lab.public_addr("b")}:{TCP_PORT}',
                            '--file', self.payload]
                           + (['--congestion', congestion] if congestion else []),
                           'tcp sender', functools.partial(lab.popen, 'a1'))
            handshake = fields(sender.expect('^connected (.*)$', 40).group(1))
            receiver.expect('^connected', 40)
            pids = {'sender': sender.popen.pid, 'receiver': receiver.popen.pid,
                    **self.helpers(lab)}
            before = process_cpu(pids)
            started = time.monotonic()
            sender.send('go')
            got = int(receiver.expect(r'^done (\d+)$', self.timeout()).group(1))
            seconds = time.monotonic() - started
            after = process_cpu(pids)
            stats = fields(sender.expect('^sent (.*)$', 10).group(1))
        except AssertionError as error:
            print(f'  plain TCP failed: {str(error).splitlines()[0]}', file=sys.stderr)
            return {'mbit': None, 'how': 'failed'}
        finally:
            for proc in (sender, receiver):
                if proc is not None:
                    proc.stop()
        ok = got == self.size and file_sha256(received) == self.digest
        os.remove(received)
        return {'mbit': self.size * 8 / seconds / 1e6 if ok else None,
                'how': 'direct, tcp' if ok else f'corrupt ({got} bytes)',
                'seconds': seconds, 'cpu': busy(before, after, seconds),
                'rtt_ms': handshake.get('srtt_ms'), 'min_rtt_ms': stats.get('min_rtt_ms'),
                'retrans': stats.get('retrans_segs', 0) / max(1, stats.get('segs_out', 1))}

    # -- ours ----------------------------------------------------------------

    def client(self, run, node, name, transport, downloads):
        """Start one of our clients (under cProfile with --profile)."""
        argv = [PYTHON, '-u']
        if self.args.profile:
            path = os.path.join(self.args.profile, f'{name}.prof')
            argv += ['-m', 'cProfile', '-o', path]
            self.profiles.append((name, path))
        argv += [os.path.join(ROOT, 'p2pclient.py'), name, '--server',
                 f'{natlab.SERVER_ADDRS[0]}:{SERVER_PORT}', transport, '--downloads', downloads,
                 '--allow', '*']        # what is measured is the transfer, not the consent
        proc = run.start(node, argv, name)
        proc.expect(rf'^\* registered as {name} ', 30)
        return proc

    def pair(self, run, transport, tag):
        """alice on a1 and bob on b1, registered; retried if registration fails."""
        downloads = os.path.join(self.workdir, 'in')
        for _ in range(START_TRIES):
            self.count += 1
            names = (f'alice{tag}{self.count}', f'bob{tag}{self.count}')
            procs = []
            try:
                for node, name in zip(('a1', 'b1'), names):
                    procs.append(self.client(run, node, name, transport, downloads))
                return procs, names
            except AssertionError:
                for proc in procs:
                    proc.stop()
        raise AssertionError('clients did not register')

    def ours(self, lab, run, transport):
        """alice /send, bob /accept; the time from /accept to bob's verdict."""
        tag = 'u' if transport == '--udp-only' else 't'
        try:
            (alice, bob), (aname, bname) = self.pair(run, transport, tag)
        except AssertionError:
            return {'mbit': None, 'how': 'no registration'}
        try:
            alice.send(f'/connect {bname}')
            mode = how(alice, bname, 40)[0]
            how(bob, aname, 40)
            alice.send(f'/send {self.payload}')
            bob.expect(rf'offers {os.path.basename(self.payload)} ', 30)
            pids = {'sender': alice.popen.pid, 'receiver': bob.popen.pid,
                    **self.helpers(lab)}
            before = process_cpu(pids)
            started = time.monotonic()
            bob.send('/accept')
            verdict = bob.expect(rf'^\* (received \S+ from {aname}: (.*)|.* failed: .*|'
                                 rf'transfer of .* stopped: .*)$', self.timeout())
            seconds = time.monotonic() - started
            after = process_cpu(pids)
            ok = verdict.group(2) is not None and 'SHA-256 ok' in verdict.group(2)
            if self.args.profile:
                for proc in (alice, bob):
                    proc.send('/quit')          # cProfile writes its file at exit
                for proc in (alice, bob):
                    proc.wait(30)
        except AssertionError as error:
            print(f'  ours {transport} failed: {str(error).splitlines()[0]}', file=sys.stderr)
            return {'mbit': None, 'how': 'timed out'}
        finally:
            for proc in (alice, bob):
                proc.stop()
            shutil.rmtree(os.path.join(self.workdir, 'in'), ignore_errors=True)
        return {'mbit': self.size * 8 / seconds / 1e6 if ok else None,
                'how': mode if ok else verdict.group(1), 'seconds': seconds,
                'cpu': busy(before, after, seconds)}

    # -- one lab -------------------------------------------------------------

    def measure(self, loss, delay_ms, contenders):
        """Every contender in one lab, ``--repeat`` rounds; the median of each."""
        results = {name: [] for name in contenders}
        with self.lab(loss, delay_ms) as lab, LabRun(lab) as run:
            if self.congestion_control is None:
                self.congestion_control = lab.run(
                    'a1', ['cat', '/proc/sys/net/ipv4/tcp_congestion_control']).stdout.strip()
            for _ in range(self.args.repeat):
                for name in contenders:
                    if name.startswith('tcp'):
                        results[name].append(self.plain_tcp(lab, CONGESTION.get(name)))
                    else:
                        results[name].append(self.ours(lab, run, CONTENDERS[name]))
        return {name: pick_median(runs) for name, runs in results.items()}


CONTENDERS = {'tcp': None, 'tcp-cubic': None, 'udp': '--udp-only', 'ours-tcp': '--tcp-only'}
CONGESTION = {'tcp-cubic': 'cubic'}
LABELS = {'tcp': 'plain TCP, kernel default', 'tcp-cubic': 'plain TCP, cubic',
          'udp': 'ours, /send over UDP', 'ours-tcp': 'ours, /send over TCP'}


def pick_median(runs):
    """The run with the median goodput (failed runs count as slowest)."""
    ordered = sorted(runs, key=lambda r: r['mbit'] if r['mbit'] is not None else -1)
    return ordered[(len(ordered) - 1) // 2]


def fields(text):
    """'a=1 b=2.5' -> {'a': 1.0, 'b': 2.5}."""
    out = {}
    for word in text.split():
        key, _, value = word.partition('=')
        try:
            out[key] = float(value)
        except ValueError:
            pass
    return out


def file_sha256(path):
    """SHA-256 of a file, hex."""
    with open(path, 'rb') as stream:
        return hashlib.file_digest(stream, 'sha256').hexdigest()


def percent(value):
    """0.25 -> '25 %'; None -> '-'."""
    return '-' if value is None else f'{100 * value:.0f} %'


def ratio(ours, tcp):
    return fmt(ours / tcp if ours and tcp else None, '.2f')


def cpu_cell(result, name):
    cpu = result.get('cpu') or {}
    return percent(cpu.get(name))


# ----------------------------------------------------------------------------
# The report


def detail_rows(setting, results):
    rows = []
    tcp = results.get('tcp', {}).get('mbit')
    for name, result in results.items():
        rows.append([setting, LABELS[name], result['how'], fmt(result['mbit'], '.1f'),
                     ratio(result['mbit'], tcp) if name != 'tcp' else '1.00',
                     fmt(result.get('seconds'), '.1f'), percent(result.get('retrans')),
                     fmt(result.get('min_rtt_ms'), '.1f'),
                     cpu_cell(result, 'sender'), cpu_cell(result, 'receiver'),
                     cpu_cell(result, 'nfdelay'), cpu_cell(result, 'machine')])
    return rows


def print_profiles(profiles, top=18):
    """The functions that took the most time in each profiled client."""
    for label, path in profiles:
        if not os.path.exists(path):
            print(f'\n{label}: no profile written ({path})')
            continue
        print(f'\n### cProfile of {label} ({path}), by own time\n')
        stats = pstats.Stats(path)
        stats.sort_stats('tottime').print_stats(top)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=float, default=50, help='file size in MB (default 50)')
    parser.add_argument('--losses', type=float, nargs='+', default=[0.0, 0.01, 0.05],
                        help='path loss rates, each direction (default 0 0.01 0.05)')
    parser.add_argument('--rate', type=float, default=100, help='Mbit/s per WAN link')
    parser.add_argument('--delay-ms', type=float, default=5,
                        help='one-way delay per WAN link (default 5: 20 ms a1 <-> b1)')
    parser.add_argument('--repeat', type=int, default=1, help='rounds per lab; median')
    parser.add_argument('--no-ceiling', action='store_true',
                        help='skip the lab without delay (the delay program\'s ceiling)')
    parser.add_argument('--without', nargs='*', default=[], choices=sorted(CONTENDERS),
                        help='leave these contenders out')
    parser.add_argument('--profile', metavar='DIR',
                        help='run our clients under cProfile, keep the profiles here')
    sub = parser.add_subparsers(dest='role')
    for role in ('tcp-send', 'tcp-recv'):       # internal: the plain TCP ends
        p = sub.add_parser(role)
        p.add_argument('--port', type=int, required=True)
        p.add_argument('--peer', required=True)
        p.add_argument('--file', required=True)
        p.add_argument('--congestion', help='TCP congestion control (default: the kernel\'s)')
    args = parser.parse_args(argv)
    if args.role:
        return tcp_peer(args)
    ok, why = natlab.lab_available()
    if not ok:
        print(f'the NAT lab is not available here: {why}', file=sys.stderr)
        return 2
    if not shutil.which('tc'):
        print('tc (iproute2) is needed for the rate limit', file=sys.stderr)
        return 2
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)
    contenders = [c for c in CONTENDERS if c not in args.without]
    workdir = tempfile.mkdtemp(prefix='p2pnat-transfer-',
                               dir='/dev/shm' if os.path.isdir('/dev/shm') else None)
    try:
        payload = os.path.join(workdir, 'payload.bin')
        with open(payload, 'wb') as out:
            for _ in range(int(args.size * 1e6) // (1 << 20)):
                out.write(os.urandom(1 << 20))
            out.write(os.urandom(int(args.size * 1e6) % (1 << 20)))
        bench = Bench(args, workdir, payload)
        report(bench, args, contenders)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.profile:
        print_profiles(bench.profiles)
    return 0


def report(bench, args, contenders):
    """Run every lab and print the tables."""
    print(f'# Transfer speed: {args.size:g} MB a1 -> b1, two port-restricted NATs, '
          f'{args.rate:g} Mbit/s per WAN link\n')
    print(f'Machine: {machine()}\n', flush=True)
    rows, summary = [], []
    comparisons = [(ours, tcp) for ours in ('udp', 'ours-tcp') for tcp in ('tcp', 'tcp-cubic')
                   if ours in contenders and tcp in contenders]
    if not args.no_ceiling:
        started = time.monotonic()
        results = bench.measure(0.0, 0, contenders)
        rows += detail_rows('no delay, no loss', results)
        print(f'(no delay: {time.monotonic() - started:.0f} s)', file=sys.stderr, flush=True)
    rtts = []
    for loss in args.losses:
        started = time.monotonic()
        results = bench.measure(loss, args.delay_ms, contenders)
        setting = f'{args.delay_ms * 4:g} ms RTT, {100 * loss:g} % loss'
        rows += detail_rows(setting, results)
        rtts += [r['rtt_ms'] for r in results.values() if r.get('rtt_ms')]
        mbit = {name: results[name]['mbit'] for name in contenders}
        summary.append([f'{100 * loss:g} %'] + [fmt(mbit[name], '.1f') for name in contenders]
                       + [ratio(mbit[ours], mbit[tcp]) for ours, tcp in comparisons])
        print(f'(loss {loss:g}: {time.monotonic() - started:.0f} s)', file=sys.stderr,
              flush=True)
    short = {'tcp': f'TCP {bench.congestion_control}', 'tcp-cubic': 'TCP cubic',
             'udp': 'ours UDP', 'ours-tcp': 'ours TCP'}
    headers = (['loss (each way)'] + [f'{short[name]} Mbit/s' for name in contenders]
               + [f'{short[ours]} / {short[tcp]}' for ours, tcp in comparisons])
    print(f'Round trip a1 <-> b1 (TCP handshake): {fmt(median(rtts), ".1f")} ms; '
          f'TCP congestion control: {bench.congestion_control}; '
          f'targets: ours UDP / TCP >= 0.8 at 0 % loss, >= 1 at 1 %\n')
    print(markdown_table(headers, summary))
    print()
    print(markdown_table(['link', 'contender', 'path', 'Mbit/s', '/ TCP', 'seconds',
                          'TCP resent', 'TCP min RTT', 'sender CPU', 'receiver CPU',
                          'nfdelay CPU', f'all {os.cpu_count()} cores'], rows))
    sys.stdout.flush()


if __name__ == '__main__':
    sys.exit(main())
