"""Time to connect: /connect to the first chat line delivered, against ICE.

    sudo python3 bench/connect.py [--trials 30] [--delay-ms 25] [--losses 0 0.1]

In the NAT lab (tests/natlab.py: two port-restricted NATs, DELAY ms one way
on each WAN link), for each loss rate:

* ours: the real rendezvous server on the lab's server host and a fresh
  pair of real clients per trial, alice on a1 and bob on b1.  The clock
  starts when alice types ``/connect bob``; as soon as she prints
  ``* connected`` she types a line; it stops when bob prints that line.
* ours, early: the same, but alice types the line right after ``/connect
  bob``, without waiting: the client sends it along with the punches.
  Both with ``--udp-only``: UDP hole punching, the article's subject.
* ours, default: the client's default options: UDP and TCP punched at
  once, the relay after half a second without a proof; the line is typed
  at once.
* aioice (ICE over asyncio, bench/ice_peer.py) on the same two hosts, with
  coturn (``turnserver -S``) on the server host as its STUN server and this
  process as the signalling pipe.  The clock starts when both sides are
  told to gather candidates and stops when the controlled side (b1)
  receives the first application datagram.
* the network's bound: two round trips to the server (alice's CONNECT, the
  server's ASK and bob's CONNECT back, the INTRODUCEs) plus one between the
  peers (a punch each way, then the chat line), from
  the configured delays and measured with a UDP echo in the same lab.

Trials of the two contenders alternate, so that both see the same machine
load.  Needs root (network namespaces), coturn and aioice: ``make bench``
installs them.  Prints one table; see bench/README.md.
"""

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import common       # first: it puts tests/ on sys.path
from common import fmt, machine, markdown_table, median, percentile

import natlab
from labpeers import CONNECTED, LabRun
from procs import PYTHON, start

ICE_PEER = os.path.join(common.HERE, 'ice_peer.py')
STUN_ADDR = natlab.SERVER_ADDRS[1]      # coturn; our server has the first address
STUN_PORT = 3478
TRIAL_TIMEOUT = 20.0                    # seconds for one side to reach the next step
# NATs that punch only by UDP (TCP fails across a symmetric NAT), and
# NATs that only relay: the default client must not wait for either.
PAIRS = [('symmetric', 'full-cone'), ('symmetric', 'symmetric')]
START_TRIES = 3                         # a client that fails to register is retried

# A STUN binding request (RFC 5389): type 1, length 0, magic cookie, transaction ID.
STUN_PROBE = ('import socket,sys\n'
              's=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(0.2)\n'
              'for _ in range(50):\n'
              '    s.sendto(bytes.fromhex("000100002112a442")+bytes(12),(sys.argv[1],'
              'int(sys.argv[2])))\n'
              '    try:\n'
              '        s.recvfrom(2048);sys.exit(0)\n'
              '    except OSError:pass\n'
              'sys.exit(1)\n')


def configured_bound(delay_ms):
    """Two RTTs to the server and one between the peers, from the lab's delays.

    The server's link has no delay, each WAN link has ``delay_ms`` each way:
    a1 to the server crosses one WAN link, a1 to b1 two.  The introduction
    takes alice's round trip to the server and bob's (the server asks him,
    his CONNECT is the consent): 2 x 2 x delay_ms.
    """
    return 4 * delay_ms, 4 * delay_ms


def peer_rtt(lab, count=20):
    """Median UDP round trip a1 <-> b1 through both NATs, by a punched echo.

    Each side learns its public endpoint from a socket on the server host,
    both punch, then b1 echoes what a1 sends.
    """
    srv, a, b = lab.agent('server'), lab.agent('a1'), lab.agent('b1')
    s, _ = srv.bind(40600, natlab.SERVER_ADDRS[0])
    sa, _ = a.bind(40601)
    sb, _ = b.bind(40602)
    try:
        public = {}
        for agent, sock in ((a, sa), (b, sb)):
            for _ in range(10):             # under loss the first tries may vanish
                agent.send(sock, (natlab.SERVER_ADDRS[0], 40600), 'map')
                got = srv.recv(s, 0.5)
                if got is not None:
                    public[agent] = tuple(got[1])
                    break
        if len(public) < 2:
            return None
        for _ in range(5):
            b.send(sb, public[a], 'punch')
            a.send(sa, public[b], 'punch')
        b.echo(sb)
        rtts = [r for r in a.rtt(sa, public[b], count=count, interval=0.02) if r is not None]
        return median(rtts)
    finally:
        srv.close_socket(s)
        a.close_socket(sa)
        b.close_socket(sb)


def start_coturn(lab):
    """coturn as a STUN-only server on the lab's second server address."""
    pidfile = f'/tmp/p2pnat-bench-coturn-{os.getpid()}.pid'
    proc = lab.popen('server', [
        'turnserver', '-n', '--stun-only', '--no-cli', '--no-tls', '--no-dtls', '--no-tcp',
        '--listening-ip', STUN_ADDR, '--listening-port', str(STUN_PORT),
        '--relay-threads', '1', '--log-file', 'stdout', '--pidfile', pidfile,
        '--no-software-attribute'],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = lab.run('server', [PYTHON, '-c', STUN_PROBE, STUN_ADDR, str(STUN_PORT)],
                    timeout=20)
    if probe.returncode:
        proc.kill()
        raise RuntimeError('coturn does not answer STUN binding requests in the lab')
    return proc


def our_trial(run, n, early=False, transport='--udp-only', timeout=TRIAL_TIMEOUT):
    """One fresh client pair: /connect, then one line; the times it took, in ms.

    The line is typed once alice says she is connected or, early, at once.
    """
    for attempt in range(START_TRIES):
        alice, bob = f'alice{n}x{attempt}', f'bob{n}x{attempt}'
        clients = []
        try:
            clients.append(run.client('a1', alice, transport=transport))
            # bob allows alice: his consent costs a round trip to the
            # server, a user's answer much more, and neither is punching.
            clients.append(run.client('b1', bob, '--allow', alice, transport=transport))
        except AssertionError:
            for proc in clients:        # registration is not what we time: try again
                proc.stop()
            continue
        a, b = clients
        try:
            started = time.monotonic()
            a.send(f'/connect {bob}')
            if early:
                a.send('ping')
            match = a.expect(CONNECTED.format(bob), timeout)
            connected = time.monotonic()
            if not early:
                a.send('ping')
            b.expect(rf'^<{alice}> ping$', timeout)
            done = time.monotonic()
        except AssertionError:
            return {'ok': False}
        finally:
            a.stop()
            b.stop()
        return {'ok': True, 'direct': bool(match.group(2)),
                'ms': (done - started) * 1000, 'connected_ms': (connected - started) * 1000,
                'reported_ms': int(match.group(3)) if match.group(2) else None}
    return {'ok': False, 'why': 'clients did not register'}


def ice_trial(lab, timeout=TRIAL_TIMEOUT):
    """One aioice connection a1 -> b1; the time to the first datagram, in ms."""
    stun = f'{STUN_ADDR}:{STUN_PORT}'
    peers = {}
    for node, role in (('a1', 'controlling'), ('b1', 'controlled')):
        peers[role] = start([PYTHON, '-u', ICE_PEER, role, '--stun', stun], f'aioice {role}',
                            functools.partial(lab.popen, node))
    alice, bob = peers['controlling'], peers['controlled']
    try:
        alice.expect('"ready"', 30)
        bob.expect('"ready"', 30)
        started = time.monotonic()
        alice.send('{"go": true}')
        bob.send('{"go": true}')
        # Each offer goes to the other side the moment it is made, as a
        # signalling pipe would carry it: one thread per direction.
        forwarders = [threading.Thread(target=forward_offer, args=(src, dst, timeout),
                                       daemon=True)
                      for src, dst in ((alice, bob), (bob, alice))]
        for thread in forwarders:
            thread.start()
        # Joined before reading bob's output again: one reader per stream.
        for thread in forwarders:
            thread.join(timeout)
        match = bob.expect(r'"received"|"failed"', timeout)
        done = time.monotonic()
        if 'failed' in match.group(0):
            return {'ok': False, 'why': 'ICE failed'}
    except AssertionError:
        return {'ok': False}
    finally:
        for proc in (alice, bob):
            try:
                proc.close_stdin()
            except (OSError, ValueError):
                pass
            proc.stop()
    details = {}
    for proc in (alice, bob):
        for line in proc.lines:
            try:
                fields = json.loads(line)
            except ValueError:
                continue
            details.update({f'{proc.label.split()[1]}_{k}': v for k, v in fields.items()
                            if k.endswith('_ms')})
    return {'ok': True, 'ms': (done - started) * 1000, **details}


def forward_offer(src, dst, timeout):
    """Copy src's offer line to dst's stdin (the signalling channel)."""
    try:
        line = src.expect('"offer"', timeout).string
        dst.send(json.dumps({'offer': json.loads(line)['offer']}))
    except (AssertionError, OSError, ValueError):
        pass        # the trial then times out and counts as failed


def run_lab(args, loss):
    """Every contender, trials alternating, in one lab with this loss rate."""
    results = {'ours': [], 'ours, early': [], 'ours, default': [], 'aioice': []}
    with natlab.Lab(nat_a='port-restricted', nat_b='port-restricted',
                    delay_ms=args.delay_ms, loss=loss) as lab:
        start_coturn(lab)
        server_rtt = natlab.measure_rtt(lab, 'a1', count=20)
        between = peer_rtt(lab)
        run = LabRun(lab)
        try:
            for n in range(args.trials):
                results['ours'].append(our_trial(run, 3 * n))
                results['ours, early'].append(our_trial(run, 3 * n + 1, early=True))
                results['ours, default'].append(our_trial(run, 3 * n + 2, early=True,
                                                          transport=None))
                results['aioice'].append(ice_trial(lab))
                if args.verbose:
                    print(f'  loss {loss:g} trial {n}: ours {results["ours"][-1]}; '
                          f'early {results["ours, early"][-1]}; '
                          f'default {results["ours, default"][-1]}; '
                          f'aioice {results["aioice"][-1]}', file=sys.stderr, flush=True)
        finally:
            run.stop()
    return {'server_rtt': server_rtt, 'peer_rtt': between, **results}


def summarise(name, trials):
    """Median, p95 and counts of one contender's trials."""
    ok = [t for t in trials if t['ok'] and t.get('direct', True)]
    times = [t['ms'] for t in ok]
    return {'name': name, 'n': len(trials), 'ok': len(ok),
            'relayed': sum(1 for t in trials if t['ok'] and not t.get('direct', True)),
            'median': median(times), 'p95': percentile(times, 95)}


def report(args, labs):
    """Print the bound, the table and the ratios."""
    server_rtt, peer_rtt_cfg = configured_bound(args.delay_ms)
    bound = server_rtt + peer_rtt_cfg
    print(f'machine: {machine()}')
    print(f'lab: two port-restricted NATs, {args.delay_ms:g} ms one way on each WAN link; '
          f'{args.trials} trials per contender and loss rate\n')
    rows = []
    for loss, lab in labs.items():
        measured = (2 * lab['server_rtt'] + lab['peer_rtt']
                    if lab['server_rtt'] is not None and lab['peer_rtt'] is not None else None)
        print(f'loss {loss:.0%}: bound configured {server_rtt:g} + {peer_rtt_cfg:g} = {bound:g} ms;'
              f' measured by UDP echo 2 x {fmt(lab["server_rtt"], ".1f")} + '
              f'{fmt(lab["peer_rtt"], ".1f")} = {fmt(measured, ".1f")} ms')
        ice = summarise('aioice', lab['aioice'])
        ours = [summarise(name, lab[name]) for name in ('ours', 'ours, early', 'ours, default')]
        for s in ours + [ice]:
            rows.append([f'{loss:.0%}', s['name'], f'{s["ok"]}/{s["n"]}'
                         + (f' ({s["relayed"]} relayed)' if s['relayed'] else ''),
                         fmt(s['median']), fmt(s['p95']),
                         fmt(s['median'] and s['median'] / bound, '.2f'),
                         fmt(s['median'] and ice['median'] and
                             s['median'] / ice['median'], '.2f')
                         if s is not ice else ''])
        details = [t for t in lab['aioice'] if t['ok']]
        if details:
            print('  aioice steps (median ms from the start): gathered '
                  f'{fmt(median([t.get("controlling_gathered_ms") for t in details]))}, '
                  'connected (controlling) '
                  f'{fmt(median([t.get("controlling_connected_ms") for t in details]))}')
        direct = [t for t in lab['ours'] if t['ok'] and t['direct']]
        if direct:
            print('  ours steps (median ms from /connect): "* connected" printed '
                  f'{fmt(median([t["connected_ms"] for t in direct]))}, '
                  f'the client itself says {fmt(median([t["reported_ms"] for t in direct]))}')
    print()
    print(markdown_table(['loss', 'contender', 'connected direct', 'median ms', 'p95 ms',
                          f'median / bound ({bound:g} ms)', 'ours / aioice (median)'], rows))
    print('\ntargets: ours / bound <= 1.2 and ours / aioice <= 0.5 (at 0% loss)')


def run_pair(args, nat_a, nat_b):
    """Default clients between two other NATs: /connect to the first line, typed at once."""
    with natlab.Lab(nat_a=nat_a, nat_b=nat_b, delay_ms=args.delay_ms) as lab:
        run = LabRun(lab)
        try:
            return [our_trial(run, n, early=True, transport=None) for n in range(args.trials)]
        finally:
            run.stop()


def report_pairs(args, pairs):
    """The line's time between NATs that punch only by UDP, or only relay."""
    bound = sum(configured_bound(args.delay_ms))
    rows = []
    for (nat_a, nat_b), trials in pairs.items():
        ok = [t for t in trials if t['ok']]
        times = [t['ms'] for t in ok]
        rows.append([f'{nat_a} / {nat_b}', f'{len(ok)}/{len(trials)}',
                     str(sum(1 for t in ok if not t['direct'])), fmt(median(times)),
                     fmt(percentile(times, 95)), fmt(median(times) and median(times) / bound,
                                                     '.2f')])
    print(f'\ndefault options, the line typed at once, {args.trials} trials per pair:')
    print(markdown_table(['NATs (a / b)', 'line arrived', 'first on the relay', 'median ms',
                          'p95 ms', f'median / bound ({bound:g} ms)'], rows))
    print('targets: symmetric / full-cone <= 1.5 x bound; symmetric / symmetric (relay) '
          '<= 1000 ms')


def main(argv=None):
    """Run the labs and print the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--trials', type=int, default=30, help='trials per contender and loss')
    parser.add_argument('--delay-ms', type=float, default=25.0,
                        help='one-way delay on each WAN link')
    parser.add_argument('--losses', type=float, nargs='+', default=[0.0, 0.1],
                        help='loss rates (fractions) on each WAN link, each direction')
    parser.add_argument('-v', '--verbose', action='store_true', help='print every trial')
    args = parser.parse_args(argv)
    ok, why = natlab.lab_available()
    if not ok:
        print(f'the NAT lab cannot run here: {why}', file=sys.stderr)
        return 1
    if not shutil.which('turnserver'):
        print('coturn is missing (turnserver): run make bench', file=sys.stderr)
        return 1
    if subprocess.run([PYTHON, '-c', 'import aioice'], capture_output=True).returncode:
        print('aioice is missing: run make bench', file=sys.stderr)
        return 1
    labs = {loss: run_lab(args, loss) for loss in args.losses}
    report(args, labs)
    pairs = {pair: run_pair(args, *pair) for pair in PAIRS}
    report_pairs(args, pairs)
    return 0


if __name__ == '__main__':
    sys.exit(main())
