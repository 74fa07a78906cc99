"""A symmetric NAT with random ports against a port-restricted cone: the birthday search.

    sudo python3 bench/birthday.py [--trials 20] [--delay-ms 25]

In the NAT lab (tests/natlab.py): NAT A symmetric (``masquerade
fully-random``: each mapping a random port of 1024-65535), NAT B
port-restricted (Linux's plain masquerade), DELAY ms one way on each WAN
link.  The real rendezvous server, and per trial a fresh pair of real
clients with the default bounds (birthday.py: 512 sockets, 100 a second,
6 s): alice on a1, behind the symmetric NAT, and bob on b1, behind the
cone.  In each direction the one who types ``/connect`` first is the
initiator, and the other says yes.  The clock starts at that
``/connect`` and stops when both have settled on a path: each starts on
the relay after half a second (upgrade.py), and moves to the direct path
when the search finds it.

Per direction: how many trials went direct (both sides), the median and
95th percentile time to connect of those, the datagrams the search sent
(sockets opened by alice, each sending one PUNCH, plus bob's probes), and
what the birthday paradox predicts.  Needs root.  Prints one table; see
bench/README.md.
"""

import argparse
import math
import re
import sys
import time

from common import fmt, machine, markdown_table, median, percentile  # first: tests/ on sys.path

import birthday
import natlab
from labpeers import LabRun, consent, how

SEARCH = re.compile(r'^\* birthday search: (\d+) datagrams toward ')
TRIAL_TIMEOUT = 30.0        # seconds: the search's 6 s, the relay, and a loaded machine


def trial(lab, initiator_site):
    """One fresh pair connects; return (direct, seconds, datagrams the search sent)."""
    with LabRun(lab) as run:
        alice, bob = run.client('a1', 'alice'), run.client('b1', 'bob')
        first, second = (alice, bob) if initiator_site == 'a' else (bob, alice)
        started = time.monotonic()
        first.send(f'/connect {second.label}')
        consent(first, second, TRIAL_TIMEOUT)
        # Each starts on the relay after half a second (upgrade.py); what
        # counts is where it settles: direct, or the relay once punching
        # and the search have given up.
        modes = [how(proc, peer.label, TRIAL_TIMEOUT)[0]
                 for proc, peer in ((first, second), (second, first))]
        elapsed = time.monotonic() - started
        direct = modes == ['direct', 'direct']
        return direct, elapsed, search_sent(alice) + search_sent(bob)


def search_sent(proc):
    """The datagrams proc's search sent, from its last word on it.

    That comes before ``* connected`` (a socket of the symmetric side met
    the peer; the search gave up) or right after it (the path was found).
    """
    return int(proc.seen(SEARCH.pattern, TRIAL_TIMEOUT).group(1))


def expected_success(sockets=birthday.SOCKETS, rate=birthday.RATE, give_up=birthday.GIVE_UP):
    """What the birthday paradox predicts: 1 - (1 - n/R)^k."""
    probes = math.ceil(rate * give_up)
    return 1 - (1 - sockets / birthday.PORTS) ** probes


def main(argv=None):
    """Run both directions; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--trials', type=int, default=20, help='per direction (default 20)')
    parser.add_argument('--delay-ms', type=float, default=25,
                        help='one-way delay on each WAN link (default 25)')
    args = parser.parse_args(argv)
    ok, why = natlab.lab_available()
    if not ok:
        print(f'the NAT lab cannot run here: {why}', file=sys.stderr)
        return 1
    rows = []
    for label, site in (('symmetric -> cone (alice asks)', 'a'),
                        ('cone -> symmetric (bob asks)', 'b')):
        results = []
        with natlab.Lab('symmetric', 'port-restricted', delay_ms=args.delay_ms) as lab:
            for number in range(args.trials):
                results.append(trial(lab, site))
                print(f'{label} trial {number + 1}: {results[-1]}', file=sys.stderr, flush=True)
        direct = [(seconds, sent) for ok, seconds, sent in results if ok]
        times = [seconds * 1000 for seconds, _ in direct]
        sent = [sent for _, sent in direct]
        rows.append([label, f'{len(direct)}/{len(results)}',
                     f'{100 * len(direct) / len(results):.0f}%',
                     fmt(median(times)), fmt(percentile(times, 95)),
                     fmt(median(sent)), fmt(sum(sent) / len(sent) if sent else None),
                     f'{100 * expected_success():.1f}%'])
    print(f'Birthday search, NAT A symmetric (random ports) vs NAT B port-restricted, '
          f'{args.delay_ms:g} ms each WAN link, {args.trials} trials per direction, '
          f'bounds {birthday.SOCKETS} sockets, {birthday.RATE:g}/s, {birthday.GIVE_UP:g} s\n')
    print(markdown_table(['direction', 'direct', 'rate', 'median ms', 'p95 ms',
                          'datagrams (median)', 'datagrams (mean)', 'predicted'], rows))
    print(f'\n{machine()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
