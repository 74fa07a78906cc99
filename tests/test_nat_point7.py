"""Article point 7 in the NAT lab: the mediator is out of the data path.

Once two peers talk directly, their server may lose either one's control
connection (a NAT that forgot it, a Wi-Fi change, a server that drops it)
and the chat goes on; the one who lost it registers again by itself.
(That a NAT which forgets idle TCP connections does not cut a peer off from
new requests, because the client keeps its control connection alive, is
tested with the other idle cases in test_nat.py, which waits its minute once.)
"""

import time

import pytest

import natlab
import presence
from labpeers import LabRun, chat_both_ways, connect


@pytest.fixture(autouse=True)
def lab_required():
    """Skip (fail in CI) when this machine cannot build the lab."""
    natlab.require_lab()


def kill_tcp(lab, node, peer):
    """Destroy node's TCP connection to peer, (address, port), with ``ss -K``.

    ss -K needs the kernel's CONFIG_INET_DIAG_DESTROY.  The kernel aborts
    the connection and sends the other end a reset, as a NAT that lost the
    connection's state, or a host that moved to another network, answers
    the next segment.  ss prints what it killed: return those lines.
    """
    result = lab.run(node, ['ss', '-K', '-t', '-n', 'state', 'established',
                            'dst', peer[0], 'dport', '=', f':{peer[1]}'])
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines()[1:] if line.strip()]


def registered_from(server, name):
    """The (address, port) the server saw name's control connection come from."""
    match = server.expect_log(rf'{name} registered from (\S+):(\d+),')
    return match.group(1), int(match.group(2))


def status_since(proc, seen):
    """The lines proc printed after its first seen ones, but for chat."""
    return [line for line in proc.lines[seen:] if not line.startswith('<')]


def test_a_direct_session_outlives_the_server_losing_one_peer():
    # alice and bob chat directly; the server loses alice's control
    # connection.  carol and dave chat directly too, and carol really goes
    # (killed: no GOODBYE), at the same moment: dave must tell the two apart.
    with natlab.Lab('port-restricted', 'port-restricted') as lab, LabRun(lab) as run:
        alice, bob = run.client('a1', 'alice'), run.client('b1', 'bob')
        carol, dave = run.client('a2', 'carol'), run.client('b2', 'dave')
        at_alice = registered_from(run.server, 'alice')
        for one, other in ((alice, bob), (carol, dave)):
            (mode_a, _, _), (mode_b, _, _) = connect(one, other)
            assert (mode_a, mode_b) == ('direct', 'direct')
            one.send('hello')
            other.expect(rf'^<{one.label}> hello$')
        # The server's end of alice's control connection dies.
        seen = {proc: len(proc.lines) for proc in (alice, bob)}
        killed_at = time.monotonic()
        killed = kill_tcp(lab, 'server', at_alice)
        carol.popen.kill()
        assert len(killed) == 1 and at_alice[0] in killed[0], killed
        assert killed[0].split()[-1].endswith(f':{at_alice[1]}'), killed
        alice.expect(r'^\* lost the rendezvous server \S+: .*direct chat goes on, reconnecting$')
        alice.expect(r'^\* registered as alice with \S+ again$', timeout=10)
        registered_from(run.server, 'alice')            # on a new connection
        chat_both_ways(alice, bob, 'still here')
        # Each partner was sent the empty RELAY, and asks its peer with a
        # KEEPALIVE a second for up to DOUBT_WAIT whether it is still there.
        dave.expect(r'^\* lost carol: it left the server and stopped answering$',
                    timeout=presence.DOUBT_WAIT + 5)
        # That bob's deadline passes without a word from bob is what is
        # tested, so it is waited out.
        time.sleep(max(0.0, killed_at + presence.DOUBT_WAIT + 1 - time.monotonic()))
        chat_both_ways(alice, bob, 'after the doubt')
        # Neither says a word about the other: no "alice left", no "lost
        # alice", no punching again; alice only about her server.
        assert status_since(bob, seen[bob]) == [], bob.transcript()
        said = status_since(alice, seen[alice])
        assert len(said) == 2 and said[0].startswith('* lost the rendezvous server ') and \
            said[1].startswith('* registered as alice with '), alice.transcript()
        assert not [line for line in dave.lines if 'carol left' in line], dave.transcript()
