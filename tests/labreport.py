"""make lab: what hole punching achieves against every kind of NAT.

Builds each topology in the NAT lab (tests/natlab.py), runs the real
rendezvous server and two real clients in it, and prints how the pair got
connected: a matrix of NAT types, then same NAT, double NAT, loss, idle
timeouts and IPv6; then the matrix again with miniupnpd on router A, which
the clients ask for a port (portmap.py), and what asking costs.  Needs root.
"""

import argparse
import re
import sys
import time

import natlab
from labpeers import CONNECTED, SETTLED, LabRun

PUNCH_TIMEOUT = '3'


def attempt(lab, host_a='a1', host_b='b1', server=None, names=('alice', 'bob'),
            transport='--udp-only'):
    """Connect two clients and exchange a line; return the cell's text."""
    with LabRun(lab, *(['--bind', server] if server else [])) as run:
        address = f'[{server}]:7777' if server else None
        try:
            a = run.client(host_a, names[0], '--punch-timeout', PUNCH_TIMEOUT, server=address,
                           transport=transport)
            b = run.client(host_b, names[1], '--punch-timeout', PUNCH_TIMEOUT,
                           '--allow', names[0], server=address, transport=transport)
        except AssertionError:
            return 'FAILED to register'
        return connect_and_chat(a, b, names)


def connect_and_chat(a, b, names):
    """Time /connect to the status line; then one chat line must arrive.

    A session that starts on the relay (upgrade.py) may move to a direct
    path later (the birthday search takes seconds): the cell says where it
    settled, and when.
    """
    started = time.monotonic()
    a.send(f'/connect {names[1]}')
    try:
        match = a.expect(CONNECTED.format(names[1]), 20)
        elapsed = time.monotonic() - started
        a.send('ping')
        b.expect(rf'^<{names[0]}> ping$', 20)
        if not match.group(2):
            settled = a.expect(SETTLED.format(peer=names[1]), 20)
            if settled.group(2):
                return f'{settled.group(2)} {settled.group(3)} ms*'     # * the relay first
    except AssertionError:
        return 'FAILED'
    if match.group(2):
        return f'{match.group(2)} {match.group(3)} ms'
    return f'relayed {elapsed:.1f} s'


def matrix(**lab_args):
    """Rows: A's NAT type; columns: B's; lab_args go to every Lab (miniupnpd='a')."""
    width = 18
    relay_first = False
    print('A \\ B'.ljust(width) + ''.join(t.ljust(width) for t in natlab.NAT_TYPES))
    for nat_a in natlab.NAT_TYPES:
        cells = []
        for nat_b in natlab.NAT_TYPES:
            with natlab.Lab(nat_a, nat_b, **lab_args) as lab:
                cells.append(attempt(lab))
        print(nat_a.ljust(width) + ''.join(c.ljust(width) for c in cells), flush=True)
        relay_first = relay_first or any(c.endswith('*') for c in cells)
    if relay_first:
        print('(* on the relay first, after half a second; then direct, this long after /connect)')


def scenarios(attempts):
    """The rows after the matrix, one line each."""
    rows = [
        ('same NAT, hairpin off', dict(hairpin_a=False), dict(host_b='a2')),
        ('same NAT, hairpin on', dict(hairpin_a=True), dict(host_b='a2')),
        ('double NAT: A behind a cone CGN', dict(cgn='a'), {}),
        ('both behind one CGN, no hairpin', dict(cgn='both'), {}),
        ('IPv6, stateful firewalls', dict(ipv6=True), dict(server=natlab.SERVER_ADDRS6[0])),
        ('default (race), two port-restricted NATs', {}, dict(transport=None)),
        ('default (race), symmetric vs full-cone', dict(nat_a='symmetric', nat_b='full-cone'),
         dict(transport=None)),
        ('default (race), symmetric vs symmetric', dict(nat_a='symmetric', nat_b='symmetric'),
         dict(transport=None)),
    ]
    for label, lab_args, run_args in rows:
        with natlab.Lab(**lab_args) as lab:
            print(f'{label:<40} {attempt(lab, **run_args)}', flush=True)
    loss(attempts)
    idle()


def loss(attempts):
    """20% loss each way on both WAN links, 50 ms delay: how many connect."""
    results = []
    with natlab.Lab(loss=0.2, delay_ms=50) as lab:
        for i in range(attempts):
            results.append(attempt(lab, names=(f'alice{i}', f'bob{i}')))
    ok = [r for r in results if not r.startswith('FAILED')]
    times = sorted(int(r.split()[1]) for r in ok if r.startswith('direct'))
    median = f', median {times[len(times) // 2]} ms direct' if times else ''
    print(f'{"20% loss, 50 ms delay":<40} {len(ok)}/{attempts} connected{median}', flush=True)


def idle():
    """NATs forget after 10 s; after 45 s of silence, does a line still arrive?"""
    for label, args in (('idle 45 s, keepalive 15 s', ()),
                        ('idle 45 s, keepalives off', ('--keepalive', '0'))):
        with natlab.Lab(udp_timeout=10) as lab, LabRun(lab) as run:
            a = run.client('a1', 'alice', *args)
            b = run.client('b1', 'bob', '--allow', 'alice', *args)
            first = connect_and_chat(a, b, ('alice', 'bob'))
            time.sleep(45)      # the silence is the experiment
            seen = len(a.lines)
            a.send('after the silence')
            try:
                b.expect(r'^<alice> after the silence$', 30)
                result = 'arrived'
            except AssertionError:
                result = 'LOST'
            notes = [line[2:] for line in a.lines[seen:] if line.startswith('* ')]
            print(f'{label:<40} {first}; then {result}'
                  + (f' ({"; ".join(notes)})' if notes else ''), flush=True)


def portmap_scenarios():
    """With the routers' port mappings: the rows after the second matrix."""
    rows = [
        ('both behind one CGN, PCP on each router', dict(cgn='both', miniupnpd=('a', 'b')), {}),
        ('TCP only, symmetric + PCP vs symmetric',
         dict(nat_a='symmetric', nat_b='symmetric', miniupnpd='a'), dict(transport='--tcp-only')),
    ]
    for label, lab_args, run_args in rows:
        with natlab.Lab(**lab_args) as lab:
            print(f'{label:<40} {attempt(lab, **run_args)}', flush=True)
    startup()


def startup():
    """Seconds from starting p2pclient.py to its registration line: what asking the router costs."""
    with natlab.Lab(miniupnpd='a') as lab, LabRun(lab) as run:
        lab.run('rb', ['nft', '-f', '-'], input=natlab.SILENT_PORTMAP_RULESET)
        for label, node, args in (('start-up, router A answers PCP', 'a1', ()),
                                  ('start-up, router B answers nothing', 'b1', ()),
                                  ('start-up, the same with --no-portmap', 'b1',
                                   ('--no-portmap',))):
            started = time.monotonic()
            proc = run.client(node, 'alice', *args)
            print(f'{label:<40} registered in {time.monotonic() - started:.2f} s', flush=True)
            proc.send('/quit')
            proc.wait()


def trace(delay_ms=25):
    """One punch, narrated: both peers' -v traces and the server's -v log, in time order.

    Two port-restricted NATs with delay_ms on each WAN link, so that the
    first punches visibly die at the other NAT before the later ones get
    through.  Returns the merged lines, from alice's CONNECT to the chat
    line's acknowledgement.
    """
    with natlab.Lab(delay_ms=delay_ms) as lab, LabRun(lab, '-v') as run:
        alice = run.client('a1', 'alice', '-v')
        bob = run.client('b1', 'bob', '-v', '--allow', 'alice')
        alice.send('/connect bob')
        alice.send('hello bob')
        bob.expect(r'^<alice> hello bob$', 20)
        alice.expect(r'^\* connected to bob ', 20)
        alice.expect(r'< ACK from ', 20, alice.err)
        server = [server_line(line) for line in run.server.err.lines]
        story = alice.err.lines + bob.err.lines + server
    story = sorted((line for line in story if line), key=lambda line: line[:12])   # by time
    first = next(i for i, line in enumerate(story) if 'alice > CONNECT' in line)
    last = next(i for i, line in enumerate(story) if 'alice < ACK' in line)
    return [line for line in story[first:last + 1] if 'MAPPING' not in line]


def server_line(line):
    """The server's log line as the narrators write theirs ('HH:MM:SS.mmm server ...'), or None.

    Only the messages it received and sent, and what it decided.
    """
    match = re.match(r'\d{4}-\d\d-\d\d (\d\d:\d\d:\d\d),(\d{3}) (.*)$', line)
    if not match or not re.match(r'[<>] |introduced |\S+ asks ', match.group(3)):
        return None
    return f'{match.group(1)}.{match.group(2)} server {match.group(3)}'


def main(argv=None):
    """Run the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--attempts', type=int, default=20,
                        help='connection attempts under loss (default 20)')
    parser.add_argument('--trace', action='store_true',
                        help='only the narrated punch (client -v) between two port-restricted NATs')
    args = parser.parse_args(argv)
    ok, why = natlab.lab_available()
    if not ok:
        print(f'the NAT lab cannot run here: {why}', file=sys.stderr)
        return 1
    if not args.trace:
        print(f'NAT lab report: rendezvous + two p2pclient.py (UDP only unless the row says '
              f'TCP), punch timeout {PUNCH_TIMEOUT} s\n')
        matrix()
        print()
        scenarios(args.attempts)
        print('\nThe same with miniupnpd (NAT-PMP, PCP) on router A, which the clients '
              'ask for a port:\n')
        matrix(miniupnpd='a')
        print()
        portmap_scenarios()
        print()
    print('One punch, narrated (p2pclient.py -v on both peers, the server\'s -v log), '
          'two port-restricted NATs, 25 ms on each WAN link:\n')
    print('\n'.join(trace()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
