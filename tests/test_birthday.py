"""birthday.py: who does which, and across real NATs a symmetric NAT meets a cone.

Across the NATs, the real server and clients in the NAT lab (needs root),
as in test_nat.py; what the routers' connection tables
(/proc/net/nf_conntrack) and the kernel's socket list (ss) show is what
the bounds are about.
"""

import collections
import io
import re
import time
from types import SimpleNamespace

import pytest

import birthday
import natlab
import p2pclient
import p2pcommon as wire
import punch
from labpeers import SURE_BIRTHDAY, LabRun, chat_both_ways, connect

SEARCH = r'^\* birthday search: (\d+) datagrams toward {} '


@pytest.fixture
def lab_required():
    """Skip (fail in CI) when this machine cannot build the lab."""
    natlab.require_lab()


def introduction(port_delta, public=('198.51.100.2', 40000)):
    """What INTRODUCE tells of the peer that role() reads."""
    return SimpleNamespace(public=public, port_delta=port_delta)


def test_both_sides_take_their_parts_from_what_both_know():
    cone = punch.Mapping(('198.51.100.1', 5000), ('198.51.100.1', 5000))
    symmetric = punch.Mapping(('198.51.100.1', 5000), ('198.51.100.1', 61000))
    # alice symmetric, bob a cone: alice sees bob's delta 0, bob sees hers, not 0.
    assert birthday.role(symmetric, introduction(0)) == birthday.OPEN
    assert birthday.role(cone, introduction(61000 - 5000 - 65536)) == birthday.PROBE
    # Two cones punch as ever; two symmetric NATs are left to the relay.
    assert birthday.role(cone, introduction(0)) is None
    assert birthday.role(symmetric, introduction(7)) is None
    # Not knowing our own NAT (no answer from the probe port), or IPv6: no search.
    assert birthday.role(punch.Mapping(('198.51.100.1', 5000), None), introduction(7)) is None
    assert birthday.role(cone, introduction(7, ('2001:db8::2', 40000))) is None
    # Two addresses: the server tells the peer 0, so it would not probe.
    two = punch.Mapping(('198.51.100.1', 5000), ('198.51.100.9', 61000))
    assert birthday.role(two, introduction(0)) is None


class LinkStub:
    """A control connection that takes what the client sends."""

    connects = collections.deque()
    token = b'r' * wire.TOKEN_SIZE
    local = ('127.0.0.1', 0)

    def send(self, type, **fields):
        """Encode and forget."""
        wire.encode(type, **fields)

    def tick(self, now):
        """Nothing to reconnect or refresh."""


def test_one_search_holds_our_ports_at_a_time():
    """A server that introduces cone peers one after another gets one search's sockets."""
    alice = p2pclient.Client('alice', [('127.0.0.1', 9)], out=io.StringIO(), transport='udp')
    alice.links = [LinkStub()]
    alice.udp = wire.UDPSocket(0)
    alice.mapping = punch.Mapping(('127.0.0.1', 5000), ('127.0.0.1', 61000))     # symmetric
    try:
        for n, name in enumerate(['bob', 'carol', 'dave']):
            alice.handle_control(alice.links[0], wire.decode(wire.reply(
                wire.INTRODUCE, name=name, session=bytes([n + 1]) * wire.TOKEN_SIZE, role=0,
                public=('127.0.0.1', 9), port_delta=0, private=[],
                tcp_public=('127.0.0.1', 9), tcp_port=0)))
        alice.check_timers(time.monotonic())
        searches = [s.birthday for s in alice.sessions.values() if s.birthday is not None]
        assert len(searches) == 1 and isinstance(searches[0], birthday.Sockets)
        said = alice.out.getvalue()
        for name in ('carol', 'dave'):
            assert f'no birthday search toward {name}: another one holds our ports' in said
    finally:
        for session in list(alice.sessions.values()):
            alice.end_session(session, 'the test ended')
        alice.udp.close()
        alice.selector.close()


def udp_sockets(lab, node, proc):
    """The UDP sockets the client proc holds, as the kernel lists them."""
    listing = lab.run(node, ['ss', '-uanp']).stdout
    return [line for line in listing.splitlines() if f'pid={proc.popen.pid},' in line]


def flows(lab, router, source, destination):
    """Destination ports of the UDP flows from source to destination in router's table."""
    table = lab.conntrack(router)
    pattern = rf'udp .*?src={re.escape(source)} dst={re.escape(destination)} sport=\d+ dport=(\d+)'
    return [int(port) for port in re.findall(pattern, table)]


def test_symmetric_random_ports_meet_a_port_restricted_cone_directly(lab_required):
    """The socket that met bob carries alice's path; every other one is closed by then."""
    with natlab.Lab('symmetric', 'port-restricted') as lab, LabRun(lab) as run:
        alice = run.client('a1', 'alice', *SURE_BIRTHDAY)
        bob = run.client('b1', 'bob', *SURE_BIRTHDAY)
        (mode_a, at_bob, _), (mode_b, at_alice, _) = connect(alice, bob)
        assert (mode_a, mode_b) == ('direct', 'direct'), (alice.transcript(), bob.transcript())
        assert at_alice.startswith(lab.public_addr('a') + ':')
        opened = int(alice.seen(SEARCH.format('bob') + 'before one of our ports met').group(1))
        probed = int(bob.seen(SEARCH.format('alice') + 'before the path').group(1))
        chat_both_ways(alice, bob)
        # alice's own socket, and the one that met bob: the one bob sees.
        sockets = udp_sockets(lab, 'a1', alice)
        assert len(sockets) == 2, sockets
        winner = ('198.18.1.2', int(at_alice.rsplit(':', 1)[1]))
        mapped = re.findall(r'src=198\.18\.1\.2 dst=198\.51\.100\.2 sport=(\d+) '
                            rf'dport={at_bob.rsplit(":", 1)[1]} .*?dport={winner[1]} ',
                            lab.conntrack('ra'))
        assert len(mapped) == 1 and any(f':{mapped[0]} ' in line for line in sockets)
        # Every socket and every probe is one entry in the router's table: as many as said.
        assert len(flows(lab, 'ra', '198.18.1.2', '198.51.100.2')) <= opened + 1 <= 900 + 1
        assert len(flows(lab, 'rb', '198.18.2.2', '198.51.100.1')) <= probed + 9


def test_the_bounds_hold_and_everything_closes_when_the_search_gives_up(lab_required):
    """No path between the two NATs at all: the search runs to its end, then the relay."""
    bounds = ('--birthday-sockets', '30', '--birthday-rate', '50', '--birthday-time', '1.5')
    with natlab.Lab('symmetric', 'port-restricted') as lab, LabRun(lab) as run:
        # inet drops UDP between the two routers: no punch, no probe gets through.
        lab.run('inet', ['nft', '-f', '-'], check=True, input=(
            'table ip block {\n  chain forward {\n    type filter hook forward priority 0;\n'
            '    ip saddr 198.51.100.0/24 ip daddr 198.51.100.0/24 meta l4proto udp drop\n'
            '  }\n}\n'))
        alice = run.client('a1', 'alice', '--punch-timeout', '1', *bounds)
        bob = run.client('b1', 'bob', '--punch-timeout', '1', '-v', *bounds)
        (mode_a, _, _), (mode_b, _, _) = connect(alice, bob)
        assert (mode_a, mode_b) == ('relayed', 'relayed')
        opened = alice.seen(SEARCH.format('bob') + r'and no path in 1\.5 s$')
        probed = bob.seen(SEARCH.format('alice') + r'and no path in 1\.5 s$')
        assert int(opened.group(1)) == 30                   # at most --birthday-sockets
        assert int(probed.group(1)) == 75                   # 50 a second for 1.5 s
        chat_both_ways(alice, bob)
        assert len(udp_sockets(lab, 'a1', alice)) == 1      # only alice's own
        assert len(flows(lab, 'ra', '198.18.1.2', '198.51.100.2')) == 30 + 1
        punched = bob.seen(r'^\* introduced to alice; punching to (.*)$').group(1).split()
        ports = flows(lab, 'rb', '198.18.2.2', '198.51.100.1')
        probes = [port for port in ports if f'198.51.100.1:{port}' not in punched]
        assert len(probes) == len(set(probes)) <= 75
        # 50 a second: the k-th probe leaves k/50 s after the first, not
        # sooner (the narrated PUNCHes' times, each written a moment after
        # its probe left: 50 ms of slack for a loaded machine, a burst of
        # probes ahead of the pace would be seconds).
        times = [stamp_seconds(line) for line in bob.err.lines
                 if re.search(r' bob > PUNCH to 198\.51\.100\.1:(\d+) ', line)
                 and line.split(' to ')[1].split()[0] not in punched]
        assert len(times) == 75
        assert all(time - times[0] >= k / 50 - 0.05 for k, time in enumerate(times)), times


def stamp_seconds(line):
    """The seconds of the day a narrated line starts with (HH:MM:SS.mmm)."""
    hours, minutes, seconds = line.split()[0].split(':')
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
