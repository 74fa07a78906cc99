"""Tests of the NAT lab itself: does each emulated NAT behave as its name says?

Everything here is measured from the outside with small UDP probes (the
natlab socket agents), the same way a peer would discover its NAT (article
point 6): the external port seen from two server addresses, and which
unsolicited packets get in. Negative results ("this packet is dropped") can
only be observed as "nothing arrived within a short wait"; positive results
wait for the event with a timeout.
"""

import os
import statistics
import subprocess
import sys
import threading
import time

import pytest

import natlab
from natlab import Lab, SERVER_ADDRS

QUIET = 0.4          # seconds of silence that count as "dropped"


@pytest.fixture
def lab_ok():
    """Skip (or fail with P2PNAT_REQUIRE_LAB=1) if no lab can be built here."""
    natlab.require_lab()


@pytest.fixture(autouse=True)
def no_leftovers():
    """After every test, no namespace of this process may remain."""
    yield
    mine = [n for n in natlab.list_lab_namespaces()
            if n.startswith('%s%dx' % (natlab.PREFIX, os.getpid()))]
    natlab.delete_namespaces(mine)
    assert not mine, 'namespaces left behind: %s' % mine


def mapping_of(lab, host, port, server_addr=SERVER_ADDRS[0], server_port=3478):
    """Bind ``port`` on ``host``, send to the server: (socket id, (ip, port) seen)."""
    srv, h = lab.agent('server'), lab.agent(host)
    s, _ = srv.bind(server_port, server_addr)
    a, _ = h.bind(port)
    h.send(a, (server_addr, server_port), 'hello from %s' % host)
    got = srv.recv(s, 2)
    srv.close_socket(s)
    assert got is not None, '%s could not reach the server' % host
    return a, got[1]


# ----------------------------------------------------------------------------
# The four NAT types, two per lab (site a and site b)

EXPECTED = {
    # type: (same external port for both server addresses,
    #        (a) same address other port gets in, (b) stranger gets in)
    'full-cone': (True, True, True),
    'restricted': (True, True, False),
    'port-restricted': (True, False, False),
    'symmetric': (False, False, False),
}


@pytest.mark.parametrize('nat_a,nat_b', [('full-cone', 'restricted'),
                                         ('port-restricted', 'symmetric')])
def test_nat_types_mapping_and_filtering(lab_ok, nat_a, nat_b):
    with Lab(nat_a, nat_b) as lab:
        assert lab.setup_seconds < 1.0
        for host, nat, port in (('a1', nat_a, 3478), ('b1', nat_b, 4478)):
            res = natlab.probe_nat(lab, host, server_port=port, wait=QUIET)
            site = host[0]
            assert res['public'] == lab.public_addr(site)
            assert res['reply_ok'], res          # a reply always gets through
            same, other_port, other_addr = EXPECTED[nat]
            assert res['same_mapping'] == same, (nat, res)
            assert res['same_addr_other_port'] == other_port, (nat, res)
            assert res['other_addr'] == other_addr, (nat, res)
            assert res['type'] == nat
            if nat != 'symmetric':
                # plain Linux behaviour: the inside port is kept when free
                assert res['port1'] == 40000
            # TCP is masqueraded for every type: control connections work
            tcp = lab.agent('server').tcp_listen(SERVER_ADDRS[0], 8000 + port)
            seen = lab.agent(host).tcp_connect((SERVER_ADDRS[0], 8000 + port))
            assert seen[0] == lab.public_addr(site)
            lab.agent('server').close_socket(tcp)


def test_full_cone_mapping_is_exclusive(lab_ok):
    """Two inside hosts using the same port get different external ports.

    Otherwise (as with plain masquerade) the second would take over the
    first one's mapping and a full-cone NAT would deliver to the wrong host.
    """
    with Lab('full-cone', 'port-restricted') as lab:
        _, m1 = mapping_of(lab, 'a1', 40000)
        _, m2 = mapping_of(lab, 'a2', 40000, SERVER_ADDRS[1])
        assert m1[1] == 40000 and m2[1] != 40000
        # and a1 keeps its mapping for a new destination
        _, m3 = mapping_of(lab, 'a1', 40001)
        assert m3[1] == 40001


def test_symmetric_sequential_is_predictable(lab_ok):
    """The extra NAT type: a new port per destination, but +1 each time."""
    with Lab('symmetric-sequential', 'port-restricted') as lab:
        res = natlab.probe_nat(lab, 'a1', wait=QUIET)
        assert res['type'] == 'symmetric' and res['delta'] == 1, res
        # The next destination gets the next port: predictable (article point 6).
        _, m = mapping_of(lab, 'a2', 40000, server_port=5000)
        assert m[1] == res['port2'] + 1


def test_symmetric_ports_toward_one_destination_are_random(lab_ok):
    """The symmetric NAT draws each mapping's port at random (birthday.py needs it so).

    Forty sockets of one host, all toward one destination: their ports are
    spread over 1024-65535, not a run from one start, as a NAT that hashes
    the destination (older kernels' plain "random") would give them.
    """
    with Lab('symmetric', 'port-restricted') as lab:
        server, a1 = lab.agent('server'), lab.agent('a1')
        sock, _ = server.bind(5000)
        for _ in range(40):
            a1.send(a1.bind()[0], (SERVER_ADDRS[0], 5000))
        ports = sorted(source[1] for _, source in server.recv_all(sock, QUIET))
        assert len(ports) == 40 and ports[0] >= 1024
        assert ports[-1] - ports[0] > 32768     # a run of 40 would span about 40
        assert len({port // 4096 for port in ports}) >= 8


def test_unsolicited_packet_does_not_steal_the_port(lab_ok):
    """Hole punching order: the peer's first punch arrives before we send.

    That packet is dropped before conntrack confirms it, so it leaves no
    state; our own packet then still gets the preserved port, and the punch
    works from then on (article point 5).
    """
    with Lab('port-restricted', 'port-restricted') as lab:
        b, mb = mapping_of(lab, 'b1', 40000)
        A, B = lab.agent('a1'), lab.agent('b1')
        B.send(b, (lab.public_addr('a'), 40000), 'early punch')   # a1 hasn't sent yet
        a, _ = A.bind(40000)
        assert A.recv(a, QUIET) is None
        A.send(a, mb, 'punch')
        assert B.recv(b, 2) == ('punch', (lab.public_addr('a'), 40000))
        B.send(b, (lab.public_addr('a'), 40000), 'through')
        assert A.recv(a, 2) == ('through', mb)


# ----------------------------------------------------------------------------
# Hairpin


@pytest.mark.parametrize('nat', natlab.NAT_TYPES)
def test_hairpin(lab_ok, nat):
    with Lab(nat, nat, hairpin_a=True, hairpin_b=False) as lab:
        # a1 gets a mapping by talking to the server; a2 sends to it.
        a1, m = mapping_of(lab, 'a1', 40000)
        a2, _ = lab.agent('a2').bind(40001)
        lab.agent('a2').send(a2, m, 'via hairpin')
        got = lab.agent('a1').recv(a1, 2)
        assert got is not None and got[0] == 'via hairpin'
        # The packet looks as if from outside: source is ra's public address.
        assert got[1][0] == lab.public_addr('a')
        lab.agent('a1').send(a1, got[1], 'back')
        back = lab.agent('a2').recv(a2, 2)
        assert back == ('back', m)
        # Router B does not hairpin.
        b1, mb = mapping_of(lab, 'b1', 40000)
        b2, _ = lab.agent('b2').bind(40001)
        lab.agent('b2').send(b2, mb, 'via hairpin')
        assert lab.agent('b1').recv(b1, QUIET) is None


# ----------------------------------------------------------------------------
# Carrier-grade NAT


def test_cgn_both(lab_ok):
    """Two full-cone home NATs behind a port-restricted CGN act port-restricted."""
    with Lab('full-cone', 'full-cone', cgn='both', cgn_type='port-restricted',
             cgn_hairpin=True) as lab:
        assert lab.public_addr('a') == lab.public_addr('b') == natlab.CGN_WAN
        assert lab.wan_addr('a').startswith('198.19.0.')
        res = natlab.probe_nat(lab, 'a1', wait=QUIET)
        assert res['public'] == natlab.CGN_WAN
        assert res['type'] == 'port-restricted', res
        # Hairpin in the CGN: b1's public endpoint is reachable from a1 (rb
        # is full-cone, so it lets the hairpinned packet in).
        b1, mb = mapping_of(lab, 'b1', 41000)
        assert mb[0] == natlab.CGN_WAN
        a1, _ = lab.agent('a1').bind(41001)
        lab.agent('a1').send(a1, mb, 'over the cgn')
        got = lab.agent('b1').recv(b1, 2)
        assert got is not None and got[0] == 'over the cgn'
        assert got[1][0] == natlab.CGN_WAN


def test_cgn_a_only(lab_ok):
    """cgn='a': site A is behind the CGN (symmetric here), site B is not."""
    with Lab('full-cone', 'port-restricted', cgn='a', cgn_type='symmetric') as lab:
        assert lab.public_addr('a') == natlab.CGN_WAN
        assert lab.public_addr('b') == lab.wan_addr('b') == '198.51.100.2'
        assert natlab.probe_nat(lab, 'a1', wait=QUIET)['type'] == 'symmetric'
        res = natlab.probe_nat(lab, 'b1', server_port=4478, wait=QUIET)
        assert res['type'] == 'port-restricted' and res['public'] == '198.51.100.2'


# ----------------------------------------------------------------------------
# IPv6: no NAT, stateful firewalls


@pytest.mark.parametrize('cgn', [None, 'both'])
def test_ipv6_firewall(lab_ok, cgn):
    """ra and rb pass only replies; the CGN (IPv4 only) just routes IPv6."""
    with Lab(ipv6=True, cgn=cgn) as lab:
        A, B, X, S = (lab.agent(n) for n in ('a1', 'b1', 'stranger', 'server'))
        a, _ = A.bind(5000, v6=True)
        b, _ = B.bind(5000, v6=True)
        x, _ = X.bind(5000, v6=True)
        s, _ = S.bind(5000, lab.addr6('server'), v6=True)
        a6, b6 = (lab.addr6('a1'), 5000), (lab.addr6('b1'), 5000)
        # Unsolicited: dropped by ra (but it opens rb for replies from a1).
        B.send(b, a6, 'unsolicited')
        assert A.recv(a, QUIET) is None
        # a1 -> b1 is a reply as far as rb is concerned, and opens ra.
        A.send(a, b6, 'punch')
        assert B.recv(b, 2) == ('punch', a6)
        B.send(b, a6, 'now welcome')
        assert A.recv(a, 2) == ('now welcome', b6)
        # ... but only for b1: the stranger still can't get in.
        X.send(x, a6, 'stranger')
        assert A.recv(a, QUIET) is None
        # Public hosts: a1 reaches the server, which sees a1's own address.
        A.send(a, (lab.addr6('server'), 5000), 'hi server')
        got = S.recv(s, 2)
        assert got == ('hi server', a6)
        S.send(s, a6, 'hi a1')
        assert A.recv(a, 2) == ('hi a1', (lab.addr6('server'), 5000))
        # IPv4 NAT still works alongside.
        _, m = mapping_of(lab, 'a1', 40000)
        assert m == (lab.public_addr('a'), 40000)


# ----------------------------------------------------------------------------
# Link impairments


def rtts_to_server(lab, count, interval):
    """An echo on the server host, and a1's round trips to it: (a1's socket, ms each)."""
    srv = lab.agent('server')
    s, _ = srv.bind(7, SERVER_ADDRS[0])
    srv.echo(s)
    a, _ = lab.agent('a1').bind(40000)
    return a, lab.agent('a1').rtt(a, (SERVER_ADDRS[0], 7), count=count, interval=interval)


def test_delay(lab_ok):
    """delay_ms on every WAN link: a1<->server crosses one link, a1<->b1 two."""
    with Lab('port-restricted', 'full-cone', delay_ms=50) as lab:
        a, rtts = rtts_to_server(lab, count=5, interval=0.02)
        assert None not in rtts
        assert min(rtts) >= 100 * 0.98, rtts
        assert statistics.median(rtts) < 100 + 80, rtts
        # b1 opens a full-cone mapping, then echoes whatever a1 sends to it.
        b, mb = mapping_of(lab, 'b1', 40000)
        lab.agent('b1').echo(b)
        rtts = lab.agent('a1').rtt(a, mb, count=5, interval=0.02, timeout=3)
        assert None not in rtts
        assert min(rtts) >= 200 * 0.98, rtts
        assert statistics.median(rtts) < 200 + 80, rtts


def test_jitter(lab_ok):
    with Lab(delay_ms=30, jitter_ms=20) as lab:
        _, rtts = rtts_to_server(lab, count=20, interval=0.01)
        assert None not in rtts
        # each direction 10..50 ms: RTT 20..100 ms (the median has no outliers
        # from a busy machine, so it can be held to the range)
        assert min(rtts) >= 20 * 0.98, rtts
        assert 20 <= statistics.median(rtts) <= 100, rtts
        assert max(rtts) - min(rtts) > 10, rtts      # it does vary


def test_loss(lab_ok):
    """loss=0.2: about a fifth of 200 datagrams a1 -> server go missing."""
    with Lab(loss=0.2) as lab:
        srv = lab.agent('server')
        s, _ = srv.bind(9, SERVER_ADDRS[0])
        a, _ = lab.agent('a1').bind(40000)
        counted = []
        counter = threading.Thread(target=lambda: counted.append(srv.count(s, idle=1.0)))
        counter.start()
        lab.agent('a1').burst(a, (SERVER_ADDRS[0], 9), 200, interval=0.0005)
        counter.join(20)
        assert counted, 'count did not finish'
        lost = (200 - counted[0]) / 200
        # binomial(200, 0.2): sd 2.8 %; these bounds are > 4 sd wide
        assert 0.08 <= lost <= 0.34, counted


# A TCP sink (upload: count what arrives) or source (download: send BYTES),
# on the server; it prints the receiving side's Mbit/s from first to last byte.
RATE_SERVER = """
import socket, sys, time
listener = socket.create_server((sys.argv[1], 5001))
print('ready', flush=True)
for direction in sys.argv[2:-1]:
    conn, _ = listener.accept()
    if direction == 'up':
        got, first = 0, None
        while data := conn.recv(1 << 16):
            first = first or time.monotonic()
            got += len(data)
        print(got * 8 / (time.monotonic() - first) / 1e6, flush=True)
    else:
        conn.sendall(bytes(int(sys.argv[-1])))
    conn.close()
"""
RATE_CLIENT = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], 5001))
if sys.argv[2] == 'up':
    conn.sendall(bytes(int(sys.argv[3])))
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
else:
    got, first = 0, None
    while data := conn.recv(1 << 16):
        first = first or time.monotonic()
        got += len(data)
    print(got * 8 / (time.monotonic() - first) / 1e6, flush=True)
"""


def test_rate_limit(lab_ok):
    """rate_mbit=10: TCP through one WAN link runs at about 10 Mbit/s, both ways."""
    size = 2_000_000            # 1.6 s at 10 Mbit/s
    with Lab(rate_mbit=10) as lab:
        server = lab.popen('server', [sys.executable, '-c', RATE_SERVER, SERVER_ADDRS[0],
                                      'up', 'down', str(size)],
                           stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == 'ready'
        lab.run('a1', [sys.executable, '-c', RATE_CLIENT, SERVER_ADDRS[0], 'up', str(size)],
                timeout=30, check=True)
        up = float(server.stdout.readline())
        down = float(lab.run('a1', [sys.executable, '-c', RATE_CLIENT, SERVER_ADDRS[0], 'down'],
                             timeout=30, check=True).stdout)
        server.wait(10)
        # tbf lets a 15 kB burst through at full speed, then holds 10 Mbit/s;
        # TCP's slow start and the receiver's timing cost a little of it.
        assert 6 <= up <= 11, up
        assert 6 <= down <= 11, down


# ----------------------------------------------------------------------------
# NAT timers


def test_udp_timeout(lab_ok):
    """udp_timeout=2: an idle mapping is forgotten after 2 s (article point 9)."""
    with Lab('port-restricted', 'full-cone', udp_timeout=2) as lab:
        for r in ('ra', 'rb'):
            out = lab.run(r, ['cat', '/proc/sys/net/netfilter/nf_conntrack_udp_timeout',
                              '/proc/sys/net/netfilter/nf_conntrack_udp_timeout_stream'])
            assert out.stdout.split() == ['2', '2']
        srv = lab.agent('server')
        s, _ = srv.bind(3478, SERVER_ADDRS[0])
        socks = {}
        for host in ('a1', 'b1'):
            h = lab.agent(host)
            socks[host], _ = h.bind(40000)
            h.send(socks[host], (SERVER_ADDRS[0], 3478), host)
        mappings = dict((d, src) for d, src in (srv.recv(s, 2), srv.recv(s, 2)))
        for host, m in mappings.items():
            srv.send(s, m, 'fresh')
            assert lab.agent(host).recv(socks[host], 2) is not None
        time.sleep(3.2)         # waiting out the NAT timer is the point here
        for host, m in mappings.items():
            srv.send(s, m, 'stale')
        for host in mappings:
            assert lab.agent(host).recv(socks[host], QUIET) is None, host


def test_tcp_timeout(lab_ok):
    """tcp_timeout=20: the NAT routers forget an established TCP connection idle 20 s.

    Only the routers: the hosts' own conntrack (unused) keeps the default.
    The forgetting itself is shown in test_nat_point7.py, by a client.
    """
    path = '/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established'
    with Lab(tcp_timeout=20, cgn='a') as lab:
        for node in ('ra', 'rb', 'cgn'):
            assert lab.run(node, ['cat', path]).stdout.split() == ['20'], node
        assert lab.run('server', ['cat', path]).stdout.split() != ['20']
    with pytest.raises(ValueError):
        Lab(tcp_timeout=0)


# ----------------------------------------------------------------------------
# The lab's own housekeeping


def test_api_and_cleanup(lab_ok):
    """Addresses, popen/run, env passing, and nothing survives teardown."""
    lab = Lab()
    with lab:
        assert lab.SERVER_ADDRS == ('203.0.113.10', '203.0.113.11')
        assert lab.addr('a1') == '198.18.1.2' and lab.addr('b2') == '198.18.2.3'
        assert lab.public_addr('a') == '198.51.100.1'
        names = [lab.ns(n) for n in lab.nodes]
        assert all(n.startswith(natlab.PREFIX) for n in names)
        assert set(names) <= set(natlab.list_lab_namespaces())
        r = lab.run('a1', ['sh', '-c', 'echo $P2PN_TEST_VAR; ip -4 -o addr show dev eth0'],
                    env=dict(os.environ, P2PN_TEST_VAR='passed'))
        assert r.stdout.startswith('passed\n') and '198.18.1.2/24' in r.stdout
        sleeper = lab.popen('b1', ['sleep', '60'])
    assert sleeper.poll() is not None, 'popen process survived teardown'
    assert not set(names) & set(natlab.list_lab_namespaces())
    assert lab.setup_seconds < 1.0 and lab.teardown_seconds < 1.0


def test_cleanup_on_exception(lab_ok):
    with pytest.raises(ZeroDivisionError):
        with Lab() as lab:
            names = [lab.ns(n) for n in lab.nodes]
            1 / 0
    assert not set(names) & set(natlab.list_lab_namespaces())


def test_cleanup_stale(lab_ok):
    """Namespaces of a dead process are removed; a live lab's are left alone."""
    dead = subprocess.Popen(['true'])
    dead.wait()
    stale = '%s%dx1-test' % (natlab.PREFIX, dead.pid)
    subprocess.run(['ip', 'netns', 'add', stale], check=True)
    with Lab() as lab:
        removed = natlab.cleanup_stale()
        assert stale in removed
        assert lab.ns('a1') in natlab.list_lab_namespaces()
    assert stale not in natlab.list_lab_namespaces()


def test_require_lab_skips_or_fails(monkeypatch):
    """Unavailable lab: skip normally, fail when P2PNAT_REQUIRE_LAB=1."""
    monkeypatch.setattr(natlab, '_availability', [(False, 'pretend')])
    monkeypatch.delenv(natlab.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        natlab.require_lab()
    monkeypatch.setenv(natlab.REQUIRE_ENV, '1')
    with pytest.raises(pytest.fail.Exception):
        natlab.require_lab()


def test_bad_arguments():
    with pytest.raises(ValueError):
        Lab(nat_a='cone-ish')
    with pytest.raises(ValueError):
        Lab(cgn='c')
    with pytest.raises(ValueError):
        Lab(rate_mbit=0)


def test_duplicate(lab_ok):
    """duplicate=0.5: about half of the datagrams into a WAN link arrive twice."""
    with Lab(duplicate=0.5) as lab:
        a, server = lab.agent('a1'), lab.agent('server')
        listen, _ = server.bind(5000)
        sock, _ = a.bind(6000)
        a.send(sock, (lab.SERVER_ADDRS[0], 5000))
        assert server.recv(listen) is not None          # the mapping exists now
        server.burst(listen, (lab.public_addr('a'), 6000), 200)
        got = a.count(sock)
        assert 230 <= got <= 370, got
