"""Rendezvous capacity: mapping requests a second against coturn; 10,000 peers.

    python3 bench/server.py [--seconds 5] [--rounds 3] [--peers 10000]

Part 1, on loopback, one core each: the C load generator (bench/loadgen.c,
on CPU 0) sends requests with a window of outstanding ones to

* a trivial C echo server (loadgen -e): the generator's own ceiling,
* a trivial Python echo (recvfrom, sendto, nothing else): what any
  one-thread Python server could reach at best,
* our server (rendezvous.py, MAPPING requests, no rate limit),
* coturn (``turnserver --stun-only --relay-threads 1``, STUN binding
  requests),

each pinned to CPU 1, in rounds that alternate between them, and prints
replies a second (the median of the rounds) and ours / coturn, and the
same per second of the server's own CPU time: on a machine that other
work shares, that is what each would answer with a whole core.

Part 2: PEERS peers register over TCP at once (as many connections as
that, from 127.0.0.1, so the server runs with --max-per-address raised);
the time to register them all and to learn their mappings, the server's
memory per registered peer (RSS from /proc/PID/status, before and after),
then CONNECT requests between random pairs while they all stay registered:
connects a second with a window of requests outstanding, and the latency
from CONNECT sent to INTRODUCE received (p50, p99), saturated and at a
fixed lower rate.

--profile runs our server under cProfile in both parts and prints where
its time goes; --rendezvous PATH benchmarks another copy of the server (a
patched one, say) against the same load.
"""

import argparse
import errno
import json
import os
import pstats
import random
import resource
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

import common       # first: it puts the project on sys.path
from common import cpu_seconds, fmt, machine, markdown_table, percentile, rss_bytes

import p2pcommon as wire

RENDEZVOUS = os.path.join(common.ROOT, 'rendezvous.py')
GENERATOR_CPU, SERVER_CPU = 0, 1
# A STUN binding request (RFC 5389): type 1, length 0, magic cookie, and a
# transaction ID, which the generator varies (offset 8) like our token.
STUN_BINDING = bytes.fromhex('000100002112a442') + bytes(12)
MAPPING_REQUEST = wire.encode(wire.MAPPING, token=bytes(wire.TOKEN_SIZE),
                              public=('0.0.0.0', 0))
VARY_OFFSET = 8
READY_TIMEOUT = 10.0
# The floor of any Python server: read a datagram, send it back, nothing
# else; one select() per burst, as rendezvous.py does.  Stops by itself.
PYTHON_ECHO = """
import selectors, socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(('127.0.0.1', int(sys.argv[1])))
sock.setblocking(False)
selector = selectors.DefaultSelector()
selector.register(sock, selectors.EVENT_READ)
end = time.monotonic() + 600
while time.monotonic() < end:
    selector.select(1.0)
    for _ in range(64):
        try:
            data, source = sock.recvfrom(1201)
        except BlockingIOError:
            break
        sock.sendto(data, source)
"""
PHASE_TIMEOUT = 120.0       # no phase of part 2 may take longer than this


def pinned(cpu, argv):
    """argv run on one CPU (taskset), when the machine has that CPU."""
    if shutil.which('taskset') and os.cpu_count() > cpu:
        return ['taskset', '-c', str(cpu)] + argv
    return argv


def server_argv(args, port, *extra, profile=None):
    """The command line of our server on 127.0.0.1:port, errors-only log."""
    python = [sys.executable] + (['-m', 'cProfile', '-o', profile] if profile else [])
    return python + [args.rendezvous, '--bind', '127.0.0.1', '--port', str(port), '-q', *extra]


def wait_udp(port, request, timeout=READY_TIMEOUT):
    """Wait until something answers request on 127.0.0.1:port (UDP)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            sock.sendto(request, ('127.0.0.1', port))
            try:
                sock.recvfrom(2048)
                return
            except OSError:
                continue
    raise RuntimeError(f'nothing answers on UDP port {port}')


def stop(proc, timeout=10.0):
    """SIGTERM, then SIGKILL if it lingers: every server here stops on TERM."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def print_profile(path, title, limit=18):
    """The functions where the profiled server spent most of its own time."""
    print(f'\n{title} (cProfile, sorted by own time):')
    stats = pstats.Stats(path, stream=sys.stdout)
    stats.strip_dirs().sort_stats('tottime').print_stats(limit)


# -- part 1: datagrams a second ------------------------------------------------


def start_udp_targets(args, tmp):
    """Start the echo, our server and coturn; return {name: (proc, port, request)}."""
    targets = {}
    port = common.free_port_pair()
    echo = subprocess.Popen(pinned(SERVER_CPU, [common.LOADGEN, '-e', '-p', str(port),
                                                '-t', '600']),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if echo.stdout.readline().strip() != 'ready':
        raise RuntimeError('loadgen -e did not start')
    targets['C echo (generator ceiling)'] = (echo, port, STUN_BINDING)

    port = common.free_port_pair()
    floor = subprocess.Popen(pinned(SERVER_CPU, [sys.executable, '-c', PYTHON_ECHO, str(port)]))
    wait_udp(port, STUN_BINDING)
    targets['Python echo (the floor: no parsing)'] = (floor, port, MAPPING_REQUEST)

    port = common.free_port_pair()
    profile = os.path.join(tmp, 'udp.prof') if args.profile else None
    ours = subprocess.Popen(pinned(SERVER_CPU, server_argv(args, port, '--mapping-rate', '0',
                                                           profile=profile)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_udp(port, MAPPING_REQUEST)
    targets['ours (rendezvous.py, MAPPING)'] = (ours, port, MAPPING_REQUEST)

    port = common.free_port_pair()
    coturn = subprocess.Popen(pinned(SERVER_CPU, [
        'turnserver', '-n', '--stun-only', '--no-cli', '--no-tls', '--no-dtls', '--no-tcp',
        '--listening-ip', '127.0.0.1', '--listening-port', str(port), '--relay-threads', '1',
        '--log-file', 'stdout', '--pidfile', os.path.join(tmp, 'turnserver.pid'),
        '--no-software-attribute']),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_udp(port, STUN_BINDING)
    targets['coturn (turnserver -S, STUN binding)'] = (coturn, port, STUN_BINDING)
    return targets


def load(args, port, request):
    """One run of the generator against a port; its JSON result."""
    argv = pinned(GENERATOR_CPU, [common.LOADGEN, '-p', str(port), '-x', request.hex(),
                                  '-v', str(VARY_OFFSET), '-t', str(args.seconds),
                                  '-w', str(args.window), '-s', str(args.sockets)])
    out = subprocess.run(argv, capture_output=True, text=True, check=True,
                         timeout=args.seconds + 30)
    return json.loads(out.stdout)


def udp_part(args, tmp):
    """Rounds of the generator against each target; a table of replies a second."""
    common.ensure_loadgen()
    targets = start_udp_targets(args, tmp)
    runs = {name: [] for name in targets}
    try:
        for _ in range(args.rounds):
            for name, (proc, port, request) in targets.items():
                # CPU over the whole run, warm-up included, over its wall time.
                before, started = cpu_seconds(proc.pid), time.monotonic()
                result = load(args, port, request)
                result['cpu'] = ((cpu_seconds(proc.pid) - before)
                                 / (time.monotonic() - started))
                runs[name].append(result)
    finally:
        for proc, _, _ in targets.values():
            stop(proc)
    rows, rates, per_cpu = [], {}, {}
    for name, results in runs.items():
        received = [r['received_per_s'] for r in results]
        rates[name] = percentile(received, 50)
        # Replies per second of the server's own CPU time: what it would
        # answer with a whole core, when other work on the machine took
        # part of CPU 1 during a round.
        per_cpu[name] = percentile([r['received_per_s'] / max(r['cpu'], 0.01)
                                    for r in results], 50)
        rows.append([name, len(request_of(targets, name)), fmt(rates[name]),
                     fmt(max(received)), fmt(percentile([r['sent_per_s'] for r in results], 50)),
                     fmt(100 * percentile([r['cpu'] for r in results], 50), '.0f') + ' %',
                     fmt(per_cpu[name]), sum(r['lost'] for r in results)])
    ours = rates['ours (rendezvous.py, MAPPING)']
    coturn = rates['coturn (turnserver -S, STUN binding)']
    echo = rates['C echo (generator ceiling)']
    ours_cpu = per_cpu['ours (rendezvous.py, MAPPING)']
    coturn_cpu = per_cpu['coturn (turnserver -S, STUN binding)']
    print(f'\nPart 1: requests answered a second on one core (generator on CPU '
          f'{GENERATOR_CPU}, servers on CPU {SERVER_CPU}; window {args.window} over '
          f'{args.sockets} sockets; {args.rounds} rounds of {args.seconds:g} s, median)\n')
    print(markdown_table(['server', 'request bytes', 'replies/s (median)', 'best round',
                          'requests sent/s', 'server CPU', 'replies per CPU-second', 'lost'],
                         rows))
    print(f'\nours / coturn = {ours / coturn:.2f} (target >= 1.0); per CPU-second '
          f'{ours_cpu / coturn_cpu:.2f}; generator ceiling / coturn = {echo / coturn:.1f}')
    if args.profile:
        print_profile(os.path.join(tmp, 'udp.prof'), 'our server under the generator')
    return {'ours': ours, 'coturn': coturn, 'echo': echo}


def request_of(targets, name):
    """The request bytes a target was sent."""
    return targets[name][2]


# -- part 2: many registered peers -----------------------------------------------


def register_request(name):
    """REGISTER for name; numeric fields the bench has no use for are zero.

    Filled from the layout table, so that a field added to REGISTER later
    does not break the bench.
    """
    fields = {'name': name, 'private': [('127.0.0.1', 40000)]}
    for field, code in wire.LAYOUTS[wire.REGISTER]:
        if field not in fields and isinstance(code, str):
            fields[field] = bytes(struct.calcsize(code)) if code.endswith('s') else 0
    return wire.encode(wire.REGISTER, **fields)


class Client:
    """One control connection of the bench: a registered peer, seen from outside."""

    __slots__ = ('sock', 'name', 'reader', 'token', 'sent')

    def __init__(self, sock, name):
        self.sock = sock
        self.name = name
        self.reader = wire.FrameReader()
        self.token = None
        self.sent = False


class Peers:
    """PEERS control connections to one server, driven by one selector."""

    def __init__(self, port, count):
        self.port = port
        self.count = count
        self.selector = selectors.DefaultSelector()
        self.clients = []
        self.closed = 0         # connections the server closed: must stay 0
        self.errors = 0         # ERROR replies: must stay 0
        self.pending = {}       # (client index, target name) -> when CONNECT went out
        self.latencies = []
        self.index = {}         # socket -> client index

    def register_all(self, window):
        """Open every connection and REGISTER, at most window unanswered at once."""
        opened = registered = 0
        deadline = time.monotonic() + PHASE_TIMEOUT
        while registered < self.count and time.monotonic() < deadline:
            while opened < self.count and opened - registered < window:
                self.open(opened)
                opened += 1
            for key, mask in self.selector.select(1.0):
                registered += self.ready(key.data, mask)
        if registered < self.count:
            raise RuntimeError(f'only {registered} of {self.count} peers registered')

    def open(self, i):
        """Start a non-blocking connect; REGISTER goes out once it is writable."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(('127.0.0.1', self.port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        client = Client(sock, f'p{i:05d}')
        self.clients.append(client)
        self.index[sock] = i
        self.selector.register(sock, selectors.EVENT_WRITE, client)

    def ready(self, client, mask):
        """Handle one socket event; return how many registrations completed."""
        if mask & selectors.EVENT_WRITE and not client.sent:
            err = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
            client.sock.send(register_request(client.name))
            client.sent = True
            self.selector.modify(client.sock, selectors.EVENT_READ, client)
            return 0
        done = 0
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return 0
        if not data:
            self.closed += 1
            self.selector.unregister(client.sock)
            return 0
        client.reader.feed(data)
        now = time.monotonic()
        for frame in client.reader.frames():
            kind = frame[3]
            if kind == wire.REGISTERED:
                client.token = frame[wire.HEADER_SIZE:]
                done += 1
            elif kind == wire.ASK and not frame[4] & wire.FLAG_REPLY:
                # The server asks this peer about a request; it says yes at
                # once, as a client run with --allow does.
                asker = frame[wire.HEADER_SIZE + 1:wire.HEADER_SIZE + 1 + frame[8]].decode()
                client.sock.send(wire.encode(wire.CONNECT, target=asker))
            elif kind == wire.INTRODUCE:
                # Only the name is needed: the payload starts with it.
                name = frame[wire.HEADER_SIZE + 1:wire.HEADER_SIZE + 1 + frame[8]].decode()
                sent = self.pending.pop((self.index[client.sock], name), None)
                if sent is not None:
                    self.latencies.append(now - sent)
            elif kind == wire.ERROR:
                self.errors += 1
        return done

    def map_all(self, window=64):
        """Send every peer's MAPPING from one UDP socket; wait for each reply.

        The window stays under what the server's receive buffer holds (about
        200 small datagrams by default), or the excess is dropped and waits for
        a retry.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.setblocking(False)
            poller = select.poll()      # select() takes no descriptor over 1,023
            poller.register(udp, select.POLLIN)
            sent = answered = 0
            deadline = time.monotonic() + PHASE_TIMEOUT
            retry = {}          # a lost datagram on loopback is rare, but possible
            while answered < self.count and time.monotonic() < deadline:
                while sent < self.count and sent - answered < window:
                    request = wire.encode(wire.MAPPING, token=self.clients[sent].token,
                                          public=('0.0.0.0', 0))
                    udp.sendto(request, ('127.0.0.1', self.port))
                    retry[request[8:24]] = request
                    sent += 1
                if not poller.poll(500):
                    for request in retry.values():
                        udp.sendto(request, ('127.0.0.1', self.port))
                    continue
                while True:
                    try:
                        data = udp.recv(2048)
                    except BlockingIOError:
                        break
                    if retry.pop(data[8:24], None) is not None:
                        answered += 1
        if answered < self.count:
            raise RuntimeError(f'only {answered} of {self.count} mappings answered')

    def connect_pairs(self, seconds, window, rate=None, total=None):
        """CONNECT random pairs for a while; return (connects a second, latencies).

        With ``rate`` the requests are paced (an open loop); without it, up
        to ``window`` wait for their INTRODUCE at any time (a closed loop).
        """
        self.latencies = []
        self.pending = {}
        rng = random.Random(7)
        started = time.monotonic()
        end = started + seconds
        sent = 0
        while time.monotonic() < end and (total is None or sent < total):
            budget = window - len(self.pending)
            if rate is not None:
                budget = min(budget, int((time.monotonic() - started) * rate) - sent)
            for _ in range(budget):
                a, b = rng.sample(range(self.count), 2)
                key = (a, self.clients[b].name)
                if key in self.pending:
                    continue        # the same pair twice at once: skip this turn
                self.pending[key] = time.monotonic()
                self.clients[a].sock.send(wire.encode(wire.CONNECT,
                                                      target=self.clients[b].name))
                sent += 1
            for key, mask in self.selector.select(0.001 if rate else 0.5):
                self.ready(key.data, mask)
        # The answers still on their way count for latency, not for the rate.
        elapsed = time.monotonic() - started
        drain = time.monotonic() + 5
        while self.pending and time.monotonic() < drain:
            for key, mask in self.selector.select(0.1):
                self.ready(key.data, mask)
        return (sent - len(self.pending)) / elapsed, self.latencies

    def close(self):
        """Close every connection."""
        for client in self.clients:
            client.sock.close()
        self.selector.close()


def peers_part(args, tmp):
    """Register PEERS peers, measure memory, then connects between them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.peers + 100
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    port = common.free_port_pair()
    profile = os.path.join(tmp, 'peers.prof') if args.profile else None
    log_path = os.path.join(tmp, 'peers-server.log')
    log = open(log_path, 'w')
    server = subprocess.Popen(
        pinned(SERVER_CPU, server_argv(args, port, '--max-per-address', str(args.peers * 2),
                                       '--mapping-rate', '0', '--connect-rate', '0',
                                       '--accept-rate', '0', '--request-rate', '0',
                                       '--list-rate', '0', '--idle-timeout', '3600',
                                       profile=profile)),
        stdout=subprocess.DEVNULL, stderr=log)
    affinity = os.sched_getaffinity(0)
    if os.cpu_count() > GENERATOR_CPU:
        os.sched_setaffinity(0, {GENERATOR_CPU})      # the bench client on the other core
    peers = Peers(port, args.peers)
    rows = []
    try:
        wait_udp(port, MAPPING_REQUEST)
        pid = server.pid        # taskset and python -m cProfile keep the pid
        rss0 = rss_bytes(pid)
        t0 = time.monotonic()
        peers.register_all(args.register_window)
        t_register = time.monotonic() - t0
        rss_registered = rss_bytes(pid)
        t0 = time.monotonic()
        peers.map_all()
        t_map = time.monotonic() - t0
        rss_mapped = rss_bytes(pid)
        rows.append([f'register {args.peers:,} peers over TCP (window {args.register_window})',
                     f'{t_register:.2f} s', f'{args.peers / t_register:,.0f} registrations/s'])
        rows.append([f'their {args.peers:,} MAPPING requests over UDP', f'{t_map:.2f} s',
                     f'{args.peers / t_map:,.0f} mappings/s'])
        rows.append(['server RSS: idle -> registered -> mapped',
                     f'{rss0 / 2**20:.1f} -> {rss_registered / 2**20:.1f} -> '
                     f'{rss_mapped / 2**20:.1f} MiB',
                     f'{(rss_mapped - rss0) / args.peers:,.0f} bytes per peer '
                     f'({(rss_registered - rss0) / args.peers:,.0f} after REGISTER alone)'])
        for label, kwargs in ((f'window {args.connect_window}',
                               dict(window=args.connect_window)),
                              (f'paced at {args.paced_rate:,}/s',
                               dict(window=10 * args.connect_window, rate=args.paced_rate))):
            cpu0, bench0, t0 = cpu_seconds(pid), time.process_time(), time.monotonic()
            rate, latencies = peers.connect_pairs(args.connect_seconds, **kwargs)
            wall = time.monotonic() - t0
            server_cpu = (cpu_seconds(pid) - cpu0) / wall
            bench_cpu = (time.process_time() - bench0) / wall
            ms = [x * 1000 for x in latencies]
            rows.append([f'CONNECT between random pairs, {label}', f'{rate:,.0f} connects/s',
                         f'latency p50 {fmt(percentile(ms, 50), ".2f")} ms, '
                         f'p99 {fmt(percentile(ms, 99), ".2f")} ms '
                         f'(n={len(ms):,}; server CPU {server_cpu:.0%}, bench {bench_cpu:.0%})'])
        rss_after = rss_bytes(pid)
        rows.append(['still registered afterwards', f'{args.peers - peers.closed:,}',
                     f'{peers.errors} ERROR replies; server RSS {rss_after / 2**20:.1f} MiB '
                     f'with every session kept'])
    finally:
        peers.close()
        os.sched_setaffinity(0, affinity)
        stop(server, timeout=60)
        log.close()
    with open(log_path) as f:
        errors = f.read().strip()
    if errors:
        print(f'the server logged errors:\n{errors[-2000:]}')
    print(f'\nPart 2: {args.peers:,} peers registered at once (bench client on CPU '
          f'{GENERATOR_CPU}, server on CPU {SERVER_CPU})\n')
    print(markdown_table(['what', 'measured', 'rate / detail'], rows))
    if args.profile:
        print_profile(profile, 'our server with 10,000 peers (register, map, connect)')


def main(argv=None):
    """Run both parts and print their tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seconds', type=float, default=5.0, help='length of one load run')
    parser.add_argument('--rounds', type=int, default=3, help='load runs per UDP server')
    parser.add_argument('--window', type=int, default=64, help='requests outstanding')
    parser.add_argument('--sockets', type=int, default=4, help='generator source sockets')
    parser.add_argument('--peers', type=int, default=10000, help='registered peers')
    parser.add_argument('--register-window', type=int, default=100,
                        help='registrations unanswered at once')
    parser.add_argument('--connect-window', type=int, default=64,
                        help='CONNECTs waiting for their INTRODUCE at once')
    parser.add_argument('--connect-seconds', type=float, default=5.0)
    parser.add_argument('--paced-rate', type=int, default=1000,
                        help='CONNECTs a second in the paced run')
    parser.add_argument('--part', choices=('udp', 'peers', 'both'), default='both')
    parser.add_argument('--profile', action='store_true',
                        help='run our server under cProfile and print where the time goes')
    parser.add_argument('--rendezvous', default=RENDEZVOUS,
                        help='the server script to benchmark (a patched copy, say)')
    args = parser.parse_args(argv)
    if args.part != 'peers' and not shutil.which('turnserver'):
        print('coturn is missing (turnserver): run make bench', file=sys.stderr)
        return 1
    print(f'machine: {machine()}')
    print(f'server: {args.rendezvous}')
    with tempfile.TemporaryDirectory(prefix='p2pnat-bench-') as tmp:
        if args.part in ('udp', 'both'):
            udp_part(args, tmp)
        if args.part in ('peers', 'both'):
            peers_part(args, tmp)
    return 0


if __name__ == '__main__':
    sys.exit(main())
