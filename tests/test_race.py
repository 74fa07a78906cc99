"""The default client races UDP and TCP and starts on the relay (issue #13, part 1).

Each test watches what a user would: which path the status lines name,
and that every line typed arrives once, in order, across each move.
"""

import natlab
import labpeers
from labpeers import LabRun, chat_both_ways, connect, consent

LINES = 30


def type_lines(alice, label):
    """alice types LINES numbered lines."""
    for n in range(LINES):
        alice.send(f'{label} {n}')


def received_once_in_order(bob, label, timeout=30):
    """bob shows each numbered line once, in order; nothing else of that label."""
    bob.seen(rf'^<alice> {label} {LINES - 1}$', timeout)
    shown = [line for line in bob.lines if line.startswith(f'<alice> {label} ')]
    assert shown == [f'<alice> {label} {n}' for n in range(LINES)], bob.transcript()


def block_udp_between_the_nats(lab):
    """Router A drops UDP to and from NAT B: only the relay (over TCP) gets through."""
    rule = (f'table inet cut {{\n chain forward {{\n type filter hook forward priority -10;\n'
            f' ip daddr {lab.public_addr("b")} meta l4proto udp drop\n'
            f' ip saddr {lab.public_addr("b")} meta l4proto udp drop\n }}\n}}\n')
    done = lab.run('ra', ['nft', '-f', '-'], input=rule)
    assert done.returncode == 0, done.stderr


def unblock(lab):
    """Remove block_udp_between_the_nats's table."""
    done = lab.run('ra', ['nft', 'delete', 'table', 'inet', 'cut'])
    assert done.returncode == 0, done.stderr


def test_the_move_from_udp_to_tcp_loses_and_repeats_no_line():
    with natlab.Lab() as lab, LabRun(lab) as run:
        alice = run.client('a1', 'alice', transport=None)       # the default: the race
        bob = run.client('b1', 'bob', transport=None)
        alice.send('/connect bob')
        type_lines(alice, 'early')              # typed at once: they go with the punches
        consent(alice, bob)
        labpeers.on_tcp(alice, 'bob')
        labpeers.on_tcp(bob, 'alice')
        received_once_in_order(bob, 'early')
        type_lines(alice, 'later')
        received_once_in_order(bob, 'later')
        assert not [line for line in alice.lines if line.startswith('* not delivered')]


def test_no_direct_path_yet_means_the_relay_and_a_direct_one_later_takes_over():
    with natlab.Lab() as lab, LabRun(lab) as run:
        alice = run.client('a1', 'alice')
        bob = run.client('b1', 'bob')
        block_udp_between_the_nats(lab)
        alice.send('/connect bob')
        consent(alice, bob)
        alice.expect(r'^\* connected to bob \(relayed through the rendezvous server\)$')
        bob.expect(r'^\* connected to alice \(relayed through the rendezvous server\)$')
        type_lines(alice, 'relayed')
        received_once_in_order(bob, 'relayed')
        unblock(lab)                            # punching goes on: it now gets through
        alice.expect(r'^\* connected to bob at \S+ \(direct, \d+ ms\)$')
        bob.expect(r'^\* connected to alice at \S+ \(direct, \d+ ms\)$')
        type_lines(alice, 'direct')
        received_once_in_order(bob, 'direct')


def test_nats_that_only_relay_carry_the_first_line_without_waiting_for_punching():
    with natlab.Lab('symmetric', 'symmetric') as lab, LabRun(lab) as run:
        alice = run.client('a1', 'alice', transport=None)
        bob = run.client('b1', 'bob', transport=None)
        alice.send('/connect bob')
        alice.send('hello through whatever works')
        consent(alice, bob)
        (mode_a, _, _), (mode_b, _, _) = labpeers.how(alice, 'bob'), labpeers.how(bob, 'alice')
        assert (mode_a, mode_b) == ('relayed', 'relayed')
        # It came through the relay before TCP punching gave up (3 s), let alone UDP's (5 s).
        arrived = bob.lines.index('<alice> hello through whatever works')
        gave_up = min(i for i, line in enumerate(bob.lines) if line.startswith('* no '))
        assert arrived < gave_up, bob.transcript()
        chat_both_ways(alice, bob)


def test_udp_only_and_tcp_only_keep_their_meaning():
    with natlab.Lab() as lab, LabRun(lab) as run:
        alice = run.client('a1', 'alice', transport='--tcp-only')
        bob = run.client('b1', 'bob', transport='--tcp-only')
        assert [how[0] for how in connect(alice, bob)] == ['direct, tcp', 'direct, tcp']
        carol = run.client('a1', 'carol')                       # --udp-only
        dave = run.client('b1', 'dave')
        assert [how[0] for how in connect(carol, dave)] == ['direct', 'direct']
        carol.send('over UDP only')
        dave.expect(r'^<carol> over UDP only$')
        assert not [line for line in carol.lines + dave.lines if 'tcp' in line.lower()]
