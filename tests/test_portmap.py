"""portmap.py: asking the router for a port mapping, with NAT-PMP and PCP.

On loopback, a stand-in router (a plain UDP socket) checks the requests
byte by byte against RFC 6886 and RFC 6887 and answers what a test wants,
including nonsense.  In the NAT lab, a real router daemon answers:
miniupnpd on NAT A (Lab(miniupnpd='a')), a symmetric NAT that lets
nothing in uninvited, so a datagram from the internet that reaches the
inside socket got there through the mapping.
"""

import io
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

import natlab
import p2pcommon as wire
import portmap
from p2pclient import Client
from portmap import NATPMP, PCP, PortMapError, PortMapper

HERE = os.path.dirname(os.path.abspath(__file__))
QUIET = 0.4             # seconds of silence that count as "dropped" (as test_natlab.py)


# ----------------------------------------------------------------------------
# On loopback: a stand-in router


class FakeRouter:
    """A UDP socket on loopback that plays the gateway: requests in, chosen answers out."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(('127.0.0.1', 0))
        self.port = self.sock.getsockname()[1]

    def mapper(self, **options):
        """A PortMapper whose gateway is this router."""
        return PortMapper(40000, gateway='127.0.0.1', server_port=self.port, **options)

    def request(self, timeout=2.0):
        """The next request and where it came from."""
        assert select.select([self.sock], [], [], timeout)[0], 'no request came'
        return self.sock.recvfrom(2048)

    def answer(self, data, to):
        """Send ``data`` to the mapper."""
        self.sock.sendto(data, to)

    def close(self):
        """Close the socket."""
        self.sock.close()


@pytest.fixture
def router():
    """A fresh stand-in router, closed after the test."""
    r = FakeRouter()
    yield r
    r.close()


def pcp_answer(request, result=0, lifetime=None, port=None, address='198.51.100.7', **change):
    """A PCP MAP answer to ``request`` (RFC 6887 sections 7.2, 11.1), fields changeable."""
    asked = portmap.PCP_MAP_REQUEST.unpack(request)
    fields = dict(version=2, opcode=0x81, result=result,
                  lifetime=asked['lifetime'] if lifetime is None else lifetime,
                  epoch=1000, nonce=asked['nonce'], protocol=asked['protocol'],
                  internal_port=asked['internal_port'],
                  external_port=asked['internal_port'] + 1 if port is None else port,
                  external_address=portmap.pcp_address(address))
    fields.update(change)
    return portmap.PCP_MAP_RESPONSE.pack(**fields)


def natpmp_answer(request, result=0, lifetime=None, port=None):
    """A NAT-PMP answer to a map request (RFC 6886 section 3.3)."""
    asked = portmap.NATPMP_MAP_REQUEST.unpack(request)
    return portmap.NATPMP_MAP_RESPONSE.pack(
        version=0, opcode=128 + asked['opcode'], result=result, epoch=1000,
        internal_port=asked['internal_port'],
        external_port=asked['internal_port'] + 2 if port is None else port,
        lifetime=asked['lifetime'] if lifetime is None else lifetime)


def test_pcp_map_request_is_rfc_6887s_layout(router):
    mapper = router.mapper(lifetime=3600)
    mapper.ask(time.monotonic())
    mapper.tick(time.monotonic())
    data, _ = router.request()
    assert len(data) == 60                          # 24-byte header + 36-byte MAP
    assert data[0] == 2 and data[1] == 1            # version 2, R=0, opcode MAP
    assert data[2:4] == bytes(2)
    assert struct.unpack('!I', data[4:8]) == (3600,)
    assert ipaddress.ip_address(data[8:24]) == ipaddress.ip_address('::ffff:127.0.0.1')
    assert data[24:36] == mapper.leases[0].nonce and len(set(data[24:36])) > 1
    assert data[36] == 17 and data[37:40] == bytes(3)                # UDP
    assert struct.unpack('!HH', data[40:44]) == (40000, 0)           # any external port
    assert data[44:60] == bytes(10) + b'\xff\xff' + bytes(4)         # ::ffff:0.0.0.0
    mapper.close(timeout=0)


def test_natpmp_requests_are_rfc_6886s_layout(router):
    mapper = router.mapper(protocol=NATPMP, lifetime=7200, tcp_port=40001)
    mapper.ask(time.monotonic())
    mapper.tick(time.monotonic())
    got = sorted(router.request()[0] for _ in range(3))
    assert got == [bytes([0, 0]),                               # external address?
                   bytes([0, 1, 0, 0]) + struct.pack('!HHI', 40000, 40000, 7200),    # UDP
                   bytes([0, 2, 0, 0]) + struct.pack('!HHI', 40001, 40001, 7200)]    # TCP
    mapper.close(timeout=0)


def asked(mapper, router, now):
    """The mapper asks (PCP first); return the request as the stand-in router got it."""
    mapper.ask(now)
    mapper.tick(now)
    return router.request()


def test_pcp_answer_gives_the_mapping_and_plans_its_renewal(router):
    mapper = router.mapper(lifetime=1000)
    now = time.monotonic()
    data, source = asked(mapper, router, now)
    router.answer(pcp_answer(data, lifetime=600), source)
    assert select.select([mapper], [], [], 2)[0]
    [mapping] = mapper.receive(now)
    assert mapping == portmap.Mapping(PCP, 'udp', 40000, ('198.51.100.7', 40001), 600, now + 600)
    assert mapper.external_address == '198.51.100.7'
    # RFC 6887 section 11.2.1: renew between 1/2 and 5/8 of the lifetime.
    assert now + 300 <= mapper.leases[0].renew_at <= now + 375
    assert mapper.tick(now) == mapper.leases[0].renew_at
    mapper.close(timeout=0)


def test_renewal_keeps_the_nonce_and_suggests_what_we_hold(router):
    mapper = router.mapper(lifetime=100)
    now = time.monotonic()
    data, source = asked(mapper, router, now)
    router.answer(pcp_answer(data, lifetime=100), source)
    select.select([mapper], [], [], 2)
    mapper.receive(now)
    assert mapper.tick(now + 40) > now + 40                 # not yet
    mapper.tick(now + 63)                                   # past 5/8: renewing
    renewal, _ = router.request()
    first = portmap.PCP_MAP_REQUEST.unpack(data)
    again = portmap.PCP_MAP_REQUEST.unpack(renewal)
    assert again['nonce'] == first['nonce']
    assert (again['external_port'], again['external_address']) == (
        40001, portmap.pcp_address('198.51.100.7'))
    router.answer(pcp_answer(renewal, lifetime=100), source)
    select.select([mapper], [], [], 2)
    [renewed] = mapper.receive(now + 63)
    assert renewed.expires == now + 163
    mapper.close(timeout=0)


def test_a_mapping_nobody_renews_ends_with_its_lifetime(router):
    mapper = router.mapper(lifetime=100)
    now = time.monotonic()
    data, source = asked(mapper, router, now)
    router.answer(pcp_answer(data), source)
    select.select([mapper], [], [], 2)
    mapper.receive(now)
    mapper.tick(now + 99)
    assert mapper.mapping is not None
    mapper.tick(now + 100)
    assert mapper.mapping is None
    assert 'did not answer our renewals' in mapper.leases[0].error
    mapper.close(timeout=0)


@pytest.mark.parametrize('name,mangle', [
    ('another nonce', lambda a: a[:24] + bytes(12) + a[36:]),
    ('truncated', lambda a: a[:59]),
    ('not a multiple of 4', lambda a: a + b'\0'),
    ('too long', lambda a: a + bytes(1100)),
    ('a request, not an answer', lambda a: a[:1] + b'\x01' + a[2:]),
    ('version 7', lambda a: b'\x07' + a[1:]),
    ('another protocol', lambda a: a[:36] + b'\x06' + a[37:]),
    ('another internal port', lambda a: a[:40] + b'\x00\x01' + a[42:]),
    ('an IPv6 external address', lambda a: a[:44] + bytes(15) + b'\x01'),
    ('empty', lambda a: b''),
    ('NAT-PMP garbage', lambda a: b'\x00\x81'),
])
def test_a_malformed_or_foreign_answer_is_ignored(router, name, mangle):
    mapper = router.mapper()
    now = time.monotonic()
    data, source = asked(mapper, router, now)
    router.answer(mangle(pcp_answer(data)), source)
    router.answer(b'\x02\x81' + bytes(58), source)          # all zero: no nonce of ours
    router.answer(pcp_answer(data, port=40009), source)     # the real answer, last
    granted = []
    while not granted:
        assert select.select([mapper], [], [], 2)[0], name
        granted = mapper.receive(now)
    # Loopback keeps the order: the first two were read, and ignored, first.
    assert [m.external for m in granted] == [('198.51.100.7', 40009)], name
    assert mapper.protocol == PCP
    mapper.close(timeout=0)


def test_a_natpmp_only_router_gets_natpmp(router):
    # RFC 6887 section 9: a NAT-PMP router answers PCP with version 0,
    # result 1 (unsupported version), and we ask again in NAT-PMP.
    mapper = router.mapper()
    now = time.monotonic()
    data, source = asked(mapper, router, now)
    router.answer(struct.pack('!BBHI', 0, 128 + data[1], 1, 1000), source)
    select.select([mapper], [], [], 2)
    assert mapper.receive(now) == [] and mapper.protocol == NATPMP
    mapper.tick(now)
    requests = sorted(router.request()[0] for _ in range(2))
    assert requests[0] == b'\0\0' and requests[1][:2] == b'\0\x01'
    router.answer(struct.pack('!BBHI4s', 0, 128, 0, 1000, socket.inet_aton('198.51.100.9')),
                  source)
    router.answer(natpmp_answer(requests[1], lifetime=3600), source)
    deadline = time.monotonic() + 2
    while mapper.mapping is None or mapper.mapping.external[0] is None:
        assert select.select([mapper], [], [], deadline - time.monotonic())[0]
        mapper.receive(now)
    assert mapper.mapping == portmap.Mapping(NATPMP, 'udp', 40000, ('198.51.100.9', 40002),
                                             3600, now + 3600)
    assert mapper.leases[0].renew_at == now + 1800                 # RFC 6886: halfway
    mapper.close(timeout=0)


def test_a_forced_protocol_does_not_fall_back(router):
    mapper = router.mapper(protocol=PCP)
    now = time.monotonic()
    data, source = asked(mapper, router, now)
    router.answer(struct.pack('!BBHI', 0, 128 + data[1], 1, 1000), source)
    select.select([mapper], [], [], 2)
    assert mapper.receive(now) == [] and mapper.protocol == PCP
    mapper.close(timeout=0)


def answering(router, make_answer):
    """Answer the next request with make_answer(request), in a thread (for map())."""
    import threading

    def serve():
        data, source = router.request()
        router.answer(make_answer(data), source)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize('result,text', [(2, 'NOT_AUTHORIZED'), (8, 'NO_RESOURCES'),
                                         (12, 'ADDRESS_MISMATCH'), (99, 'result code 99')])
def test_a_pcp_refusal_says_why(router, result, text):
    mapper = router.mapper()
    answering(router, lambda data: pcp_answer(data, result=result, lifetime=30))
    with pytest.raises(PortMapError, match=text):
        mapper.map(timeout=2)
    mapper.close(timeout=0)


@pytest.mark.parametrize('result,text', [(2, 'not authorized'), (3, 'no external address'),
                                         (4, 'no ports left')])
def test_a_natpmp_refusal_says_why(router, result, text):
    mapper = router.mapper(protocol=NATPMP)
    # A refusal may end after the result code and epoch (8 bytes).  The
    # map request goes first; the external address is not worth waiting for.
    answering(router, lambda data: struct.pack('!BBHI', 0, 128 + data[1], result, 5))
    started = time.monotonic()
    with pytest.raises(PortMapError, match=text):
        mapper.map(timeout=2)
    assert time.monotonic() - started < 0.5
    mapper.close(timeout=0)


def test_a_router_that_answers_nothing_costs_the_timeout_and_no_more(router):
    mapper = router.mapper()
    started = time.monotonic()
    assert mapper.map(timeout=0.3) is None
    assert 0.3 <= time.monotonic() - started < 0.5
    assert mapper.tick(time.monotonic()) is None        # and it stops asking
    mapper.close(timeout=0)


def test_a_gateway_where_nothing_listens_returns_at_once():
    # ICMP port unreachable on loopback: the port was just closed.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
    probe.close()
    mapper = PortMapper(40000, gateway='127.0.0.1', server_port=port)
    started = time.monotonic()
    assert mapper.map(timeout=1.0) is None
    assert time.monotonic() - started < 0.5
    mapper.close(timeout=0)


def test_close_deletes_with_lifetime_zero_and_the_same_nonce(router):
    mapper = router.mapper()
    answering(router, pcp_answer)
    assert mapper.map(timeout=2) is not None
    first = mapper.leases[0].nonce
    thread = answering(router, lambda data: (pcp_answer(data, lifetime=0), data)[0])
    started = time.monotonic()
    mapper.close(timeout=2)
    thread.join()
    assert time.monotonic() - started < 1       # answered: no waiting out the timeout
    assert mapper.mapping is None and mapper.leases[0].nonce == first


def test_close_sends_the_delete_request(router):
    mapper = router.mapper(protocol=NATPMP)
    lease = mapper.leases[0]
    lease.mapping = portmap.Mapping(NATPMP, 'udp', 40000, ('198.51.100.9', 40002), 60,
                                    time.monotonic() + 60)
    mapper.close(timeout=0.1)
    data, _ = router.request()
    # RFC 6886 section 3.4: lifetime 0, suggested external port 0.
    assert data == bytes([0, 1, 0, 0]) + struct.pack('!HHI', 40000, 0, 0)


def test_retransmission_schedules():
    natpmp = portmap.Retry(NATPMP, 0.0)
    sent = []
    for _ in range(11):
        natpmp.sent(natpmp.at)
        sent.append(natpmp.interval)
    assert sent == [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 64, 64]      # RFC 6886 3.1
    pcp = portmap.Retry(PCP, 0.0)
    intervals = []
    for _ in range(12):
        pcp.sent(pcp.at)
        intervals.append(pcp.interval)
    assert 2.7 <= intervals[0] <= 3.3                                # RFC 6887 8.1.1
    assert all(a < b for a, b in zip(intervals[:8], intervals[1:8]))
    assert 1024 * 0.9 <= intervals[-1] <= 1024 * 1.1
    renewal = portmap.Retry(PCP, 0.0, renewing=True)
    renewal.sent(0.0)
    assert renewal.interval == 4.0                                   # RFC 6887 11.2.1


def test_default_gateway_from_the_routing_table(tmp_path):
    table = tmp_path / 'route'
    table.write_text(
        'Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n'
        'eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n'
        'wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n'
        'eth0\t00000000\t0201A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n')
    assert portmap.default_gateway(str(table)) == '192.168.1.2'     # the lower metric
    assert portmap.default_gateway(str(tmp_path / 'missing')) is None


# ----------------------------------------------------------------------------
# The client's part, PortMapMixIn, with the stand-in router


@pytest.fixture
def alice():
    """A client (never started) with a UDP socket on loopback; yields (client, its screen)."""
    out = io.StringIO()
    client = Client('alice', [('127.0.0.1', 9)], out=out, transport='udp')
    client.udp = wire.UDPSocket(0, '127.0.0.1')
    yield client, out
    client.close_portmap()
    client.udp.close()


def holding(router, client, lifetime=100):
    """Give client a mapper that holds a mapping from router; return the time it was granted."""
    mapper = router.mapper(lifetime=lifetime)
    answering(router, pcp_answer)
    assert mapper.map(timeout=2) is not None
    client.mapper = mapper
    return time.monotonic()


def test_a_server_on_loopback_means_no_router_is_asked(alice):
    client, _ = alice
    started = time.monotonic()
    assert client.private_endpoints(None, '127.0.0.1') == [('127.0.0.1', client.udp.port)]
    assert client.mapper is None and time.monotonic() - started < 0.1


def test_the_mapped_endpoint_goes_first_in_register(router, alice):
    client, _ = alice
    holding(router, client)
    assert client.private_endpoints(None, '127.0.0.1')[0] == ('198.51.100.7', 40001)


def test_the_client_says_when_the_router_stops_forwarding(router, alice):
    client, out = alice
    granted = holding(router, client)
    client.check_timers(granted + 99)
    assert 'no longer' not in out.getvalue()
    client.check_timers(granted + 100)          # the lifetime ran out, unrenewed
    assert '* the router no longer forwards a port to us: the router did not answer ' \
        'our renewals' in out.getvalue()
    assert client.mapper is None


def test_the_client_says_when_a_renewal_moves_its_endpoint(router, alice):
    client, out = alice
    granted = holding(router, client)
    client.check_timers(granted + 63)           # past 5/8 of 100 s: renewing
    renewal, source = router.request()
    router.answer(pcp_answer(renewal, port=40500), source)
    assert select.select([client.mapper], [], [], 2)[0]
    client.router_answered(client.mapper, None)
    assert '* the router now forwards 198.51.100.7:40500 to us' in out.getvalue()


# ----------------------------------------------------------------------------
# In the NAT lab: miniupnpd on NAT A


class Driver:
    """portmapdriver.py in a lab host: one JSON request, one JSON answer."""

    def __init__(self, lab, host):
        self.proc = lab.popen(host, [sys.executable, os.path.join(HERE, 'portmapdriver.py')],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def close(self):
        """End of input: the driver exits."""
        self.proc.stdin.close()
        self.proc.wait(10)
        self.proc.stdout.close()

    def __call__(self, op, **request):
        """Send one request; its answer (a test failure if the driver raised)."""
        self.proc.stdin.write(json.dumps(dict(request, op=op)) + '\n')
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready, 'portmapdriver: no answer to %s' % op
        answer = json.loads(self.proc.stdout.readline())
        assert 'exception' not in answer, answer['exception']
        return answer


@pytest.fixture(scope='module')
def lab():
    """NAT A is symmetric and runs miniupnpd; NAT B runs none."""
    natlab.require_lab()
    with natlab.Lab(nat_a='symmetric', nat_b='port-restricted', miniupnpd='a') as lab:
        yield lab
    mine = [n for n in natlab.list_lab_namespaces()
            if n.startswith('%s%dx' % (natlab.PREFIX, os.getpid()))]
    assert not mine, 'namespaces left behind: %s' % mine


@pytest.fixture
def driver(lab):
    """A factory of drivers in lab hosts, closed after the test."""
    made = []

    def make(host):
        made.append(Driver(lab, host))
        return made[-1]
    yield make
    for d in made:
        d.close()


def stranger_sends(lab, to, text):
    """The stranger, on the internet, sends one datagram to ``to``."""
    stranger = lab.agent('stranger')
    sock, _ = stranger.bind()
    stranger.send(sock, to, text)
    stranger.close_socket(sock)


def test_pcp_mapping_lets_the_internet_in_and_close_shuts_it(lab, driver):
    drive = driver('a1')
    drive('start', port=41000, tcp_port=41001)
    wan = (lab.public_addr('a'), 41000)
    stranger_sends(lab, wan, 'uninvited')
    assert drive('recv', wait=QUIET)['data'] is None        # a symmetric NAT: dropped
    got = drive('map', timeout=1.0)
    mapping = got['mapping']
    assert mapping['protocol'] == 'PCP' and mapping['transport'] == 'udp', got
    assert mapping['external'] == [lab.public_addr('a'), 41000]
    assert got['external_address'] == lab.public_addr('a')
    assert got['tcp_mapping']['external'] == [lab.public_addr('a'), 41001]
    assert got['elapsed'] < 0.5
    assert 'UDP:41000:198.18.1.2:41000:' in lab.leases('a')
    assert 'TCP:41001:198.18.1.2:41001:' in lab.leases('a')
    stranger_sends(lab, tuple(mapping['external']), 'through the mapping')
    arrived = drive('recv', wait=5)
    assert arrived['data'] == 'through the mapping', lab.miniupnpd_log('a')[-2000:]
    assert arrived['from'][0] == natlab.STRANGER_ADDR
    closed = drive('close')
    assert closed['elapsed'] < 0.5 and closed['mapping'] is None
    assert lab.leases('a') == ''
    assert 'dnat' not in lab.run('ra', ['nft', 'list', 'chain', 'inet', natlab.MINIUPNPD_TABLE,
                                        'prerouting_miniupnpd']).stdout
    stranger_sends(lab, tuple(mapping['external']), 'after close')
    assert drive('recv', wait=QUIET)['data'] is None


def test_natpmp_mapping_works_too(lab, driver):
    drive = driver('a2')
    drive('start', port=41100, protocol=NATPMP)
    got = drive('map', timeout=1.0)
    assert got['mapping']['protocol'] == 'NAT-PMP', got
    assert got['mapping']['external'] == [lab.public_addr('a'), 41100]
    assert got['external_address'] == lab.public_addr('a')     # opcode 0
    stranger_sends(lab, tuple(got['mapping']['external']), 'via NAT-PMP')
    assert drive('recv', wait=5)['data'] == 'via NAT-PMP'
    drive('close')
    assert lab.leases('a') == ''


def test_natpmp_renews_before_expiry_and_the_mapping_outlives_its_lifetime(lab, driver):
    # miniupnpd grants NAT-PMP whatever lifetime is asked (PCP: at least its
    # min_lifetime, 120 s), and removes a mapping when it runs out.
    drive = driver('a1')
    drive('start', port=41200, protocol=NATPMP, lifetime=2)
    first = drive('map', timeout=1.0)['mapping']
    assert first['lifetime'] == 2, first
    got = drive('renewals', count=3, wait=10)
    times = [r['at'] for r in got['renewals']]
    assert len(times) == 3, got
    # Each renewal came halfway through the lifetime before it, never after it.
    assert all(0.8 <= b - a < first['lifetime'] for a, b in zip([0] + times, times)), times
    assert times[-1] > first['lifetime']                # past the first lifetime...
    stranger_sends(lab, tuple(first['external']), 'still mapped')
    assert drive('recv', wait=5)['data'] == 'still mapped'     # ...and still forwarded
    drive('close')


def test_pcp_renewal_is_answered_with_the_same_mapping(lab, driver):
    drive = driver('a2')
    drive('start', port=41300, lifetime=120)
    first = drive('map', timeout=1.0)['mapping']
    assert first['protocol'] == 'PCP' and first['lifetime'] == 120
    lease = lab.leases('a')
    renewed = drive('tick', ahead=80)['renewed']     # past 5/8 of 120 s: due
    assert len(renewed) == 1, lab.miniupnpd_log('a')[-2000:]
    assert renewed[0]['external'] == first['external']
    assert renewed[0]['expires_in'] > 80 + 100
    # miniupnpd knows it by its nonce: one mapping, renewed, not a second one.
    assert lab.leases('a').count('UDP:41300:') == 1
    assert lease.split(':')[-1] == lab.leases('a').split(':')[-1]      # 'PCP MAP <nonce>'
    drive('close')


def test_no_router_daemon_costs_no_more_than_the_timeout(lab, driver):
    drive = driver('b1')
    assert drive('start', port=41400)['gateway'] == '198.18.2.1'
    got = drive('map', timeout=1.0)
    assert got['mapping'] is None and got['error'] is None
    assert got['elapsed'] <= 1.05
    drive('close')


def test_a_miniupnpd_that_fails_to_start_leaves_nothing_behind(monkeypatch):
    natlab.require_lab()
    monkeypatch.setattr(natlab, 'MINIUPNPD', '/bin/false')
    lab = natlab.Lab(miniupnpd='b')
    with pytest.raises(natlab.LabError, match='did not start'):
        lab.start()
    assert not [n for n in natlab.list_lab_namespaces() if lab.id in n]
    assert not any(os.path.exists(path) for path in lab._tmpdirs)
