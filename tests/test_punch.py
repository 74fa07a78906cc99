"""The punching routine, candidates, keepalives and mapping discovery."""

import io
import ipaddress
import selectors
import os
import socket
import time

import p2pcommon as wire
import punch
import tcppunch
from identity import SessionKey
from p2pclient import Client
from procs import start_server

SESSION = b's' * wire.TOKEN_SIZE
OTHER = b'o' * wire.TOKEN_SIZE
OUR_LAN = [ipaddress.ip_network('198.18.2.0/24')]


def introduction(port_delta=0, private=(), public=('198.51.100.2', 40000), role=1):
    """An INTRODUCE as the server would send it (to us, the side with role)."""
    return wire.Message(wire.INTRODUCE, name='bob', session=SESSION, role=role,
                        public=public, port_delta=port_delta,
                        private=list(private), tcp_public=public, tcp_port=0)


def keys(token=SESSION):
    """Our key (role 0) and the peer's (role 1) for one session."""
    return SessionKey(token, 0), SessionKey(token, 1)


def received(key, type, **fields):
    """A message that key's side sealed, as it comes off the wire."""
    if type == wire.PUNCH:
        fields.setdefault('nonce', punch.NO_NONCE)
    return wire.decode(key.seal(type, **fields))


def recorder():
    """A send function for Punch that records (raw datagram, endpoint)."""
    sent = []
    return sent, lambda data, to: sent.append((data, to))


# ---------------------------------------------------------------------------
# Candidates.


def test_candidates_are_public_then_private():
    found = punch.candidates(introduction(private=[('198.18.2.2', 5000)]), networks=OUR_LAN)
    assert found == [('198.51.100.2', 40000), ('198.18.2.2', 5000)]


def test_candidates_predict_the_ports_of_a_symmetric_nat():
    found = punch.candidates(introduction(port_delta=2))
    assert found[:3] == [('198.51.100.2', 40000), ('198.51.100.2', 40002),
                         ('198.51.100.2', 40004)]
    assert len(found) == 1 + punch.PREDICTION_STEPS


def test_candidates_wrap_around_as_the_servers_step_does():
    """The server gives the step modulo 65536: 60000 then 2000 is a step of +7536."""
    found = punch.candidates(introduction(port_delta=7536, public=('198.51.100.2', 60000)))
    assert found[1:3] == [('198.51.100.2', 2000), ('198.51.100.2', 9536)]


def test_candidates_drop_private_endpoints_outside_our_networks():
    """A private address the peer claims is someone's on every LAN: only ours are punched."""
    private = [('198.18.2.2', 5000), ('198.18.9.9', 5001), ('2001:db8::9', 5002)]
    found = punch.candidates(introduction(private=private), our_public=('203.0.113.5', 1),
                             networks=OUR_LAN)
    assert found == [('198.51.100.2', 40000), ('198.18.2.2', 5000)]
    assert punch.candidates(introduction(private=private)) == [('198.51.100.2', 40000)]


def test_candidates_keep_private_endpoints_behind_the_same_nat():
    """When the peer's public address is ours, it is behind our NAT: its LAN is ours."""
    private = [('198.18.9.9', 5001), ('2001:db8::9', 5002)]
    found = punch.candidates(introduction(private=private), our_public=('198.51.100.2', 7))
    assert found == [('198.51.100.2', 40000)] + private


def test_candidates_keep_a_port_on_the_peers_own_public_address():
    """A port the peer's router forwards (portmap.py) is on the peer's NAT: punched.

    Any other address the peer claims is still dropped: the rule adds no
    host that the introduction did not already name.
    """
    private = [('198.51.100.2', 41000), ('198.51.100.9', 41000), ('198.18.9.9', 5001)]
    found = punch.candidates(introduction(private=private), our_public=('203.0.113.5', 1),
                             networks=OUR_LAN)
    assert found == [('198.51.100.2', 40000), ('198.51.100.2', 41000)]


def test_candidates_never_more_than_sixteen():
    """Predicted ports and every private endpoint together are capped at MAX_ENDPOINTS."""
    private = [(f'198.18.2.{i + 1}', 5000 + i) for i in range(wire.MAX_ENDPOINTS)]
    found = punch.candidates(introduction(port_delta=1, private=private),
                             our_public=('198.51.100.2', 7), networks=OUR_LAN)
    assert len(found) == wire.MAX_ENDPOINTS == 16
    assert found[0] == ('198.51.100.2', 40000)
    assert len(set(found)) == len(found)


# ---------------------------------------------------------------------------
# The UDP punch.


def test_punch_sends_to_every_candidate_each_round():
    sent, send = recorder()
    ours, _ = keys()
    targets = [('198.51.100.2', 1), ('198.18.2.2', 2)]
    attempt = punch.Punch(send, ours.seal, targets, now=0.0)
    attempt.tick(0.0)
    attempt.tick(0.05)                           # not due yet
    attempt.tick(punch.PUNCH_INTERVAL)
    assert [to for _, to in sent] == targets * 2
    messages = [wire.decode(data) for data, _ in sent]
    assert all(m.type == wire.PUNCH and m.flags & wire.FLAG_PUNCHING for m in messages)


def test_a_punch_proves_itself_to_the_peer_and_carries_no_token():
    """Each PUNCH passes the peer's MAC check, has its own counter, and hides the token."""
    sent, send = recorder()
    ours, theirs = keys()
    attempt = punch.Punch(send, ours.seal, [('198.51.100.2', 1), ('198.18.2.2', 2)], now=0.0)
    attempt.tick(0.0)
    attempt.tick(punch.PUNCH_INTERVAL)
    messages = [wire.decode(data) for data, _ in sent]
    assert all(theirs.check(m) and m.session == theirs.id for m in messages)
    assert [m.counter for m in messages] == [1, 2, 3, 4]
    assert all(SESSION not in data for data, _ in sent)
    assert not any(SessionKey(OTHER, 1).check(m) for m in messages)


def test_a_punch_is_bounced_and_locks_the_path():
    sent, send = recorder()
    ours, theirs = keys()
    attempt = punch.Punch(send, ours.seal, [('198.51.100.2', 1)], now=0.0)
    source = ('198.51.100.2', 7)                # a port we never punched: symmetric NAT
    assert attempt.receive(received(theirs, wire.PUNCH), source) == source
    assert [(wire.decode(data).type, to) for data, to in sent] == [(wire.PUNCH_ACK, source)]
    attempt.receive(received(theirs, wire.PUNCH_ACK), ('198.18.2.2', 2))
    assert attempt.locked == source             # the first proof wins
    attempt.tick(10.0)
    assert len(sent) == 1                        # no more punching once locked
    assert not attempt.expired(10.0)


def test_the_bounce_is_sealed():
    """The PUNCH_ACK we bounce checks on the peer's side, and not as the peer's own."""
    sent, send = recorder()
    ours, theirs = keys()
    attempt = punch.Punch(send, ours.seal, [], now=0.0)
    attempt.receive(received(theirs, wire.PUNCH), ('198.51.100.2', 7))
    (data, _), = sent
    bounce = wire.decode(data)
    assert bounce.type == wire.PUNCH_ACK
    assert theirs.check(bounce) and not ours.check(bounce)
    assert SESSION not in data


def test_a_keepalive_is_bounced_too():
    sent, send = recorder()
    ours, theirs = keys()
    attempt = punch.Punch(send, ours.seal, [], 0.0)
    attempt.receive(received(theirs, wire.KEEPALIVE), ('::1', 1))
    attempt.receive(received(theirs, wire.PUNCH_ACK), ('::1', 1))
    assert [wire.decode(data).type for data, _ in sent] == [wire.PUNCH_ACK]
    assert theirs.check(wire.decode(sent[0][0]))


def test_a_bounce_carries_the_reply_flag_and_a_reply_is_never_bounced():
    sent, send = recorder()
    ours, theirs = keys()
    attempt = punch.Punch(send, ours.seal, [], 0.0)
    attempt.receive(received(theirs, wire.PUNCH), ('::1', 1))
    assert wire.decode(sent[0][0]).flags & wire.FLAG_REPLY
    punching_reply = wire.Message(wire.KEEPALIVE, wire.FLAG_PUNCHING | wire.FLAG_REPLY)
    attempt.receive(punching_reply, ('::1', 1))
    assert len(sent) == 1


def test_the_punch_budget_caps_the_datagrams_however_many_targets():
    """PUNCH_BUDGET datagrams in all, then silence, with 16 or 1000 targets."""
    for count in (wire.MAX_ENDPOINTS, 1000):
        sent, send = recorder()
        ours, _ = keys()
        targets = [(f'198.18.{i // 250}.{i % 250 + 1}', 5000) for i in range(count)]
        attempt = punch.Punch(send, ours.seal, targets, now=0.0, timeout=1000.0)
        now = 0.0
        while now < 100.0:
            attempt.tick(now)
            now += punch.PUNCH_INTERVAL
        assert len(sent) == punch.PUNCH_BUDGET


def test_the_budget_lets_a_usual_introduction_punch_for_the_whole_timeout():
    """Public endpoint, a predicted port and two private ones: a round every interval."""
    sent, send = recorder()
    targets = [('198.51.100.2', 40000), ('198.51.100.2', 40001), ('198.18.2.2', 5000),
               ('198.18.2.3', 5000)]
    attempt = punch.Punch(send, keys()[0].seal, targets, now=0.0)
    now = 0.0
    while not attempt.expired(now):
        attempt.tick(now)
        now = attempt.next_round                # each round when it is due
    assert attempt.rounds >= punch.PUNCH_TIMEOUT / punch.PUNCH_INTERVAL - 1
    assert len(sent) == len(targets) * attempt.rounds < punch.PUNCH_BUDGET
    assert [to for _, to in sent[-len(targets):]] == targets


def test_a_punch_expires_without_an_answer():
    attempt = punch.Punch(lambda data, to: None, keys()[0].seal, [], now=0.0, timeout=2.0)
    assert not attempt.expired(1.9)
    assert attempt.expired(2.0)


# ---------------------------------------------------------------------------
# Keepalives.


def test_keepalive_sends_after_a_quiet_interval_and_is_dead_after_silence():
    sent = []
    keepalive = punch.Keepalive(15.0, now=0.0, send=lambda: sent.append('KEEPALIVE'))
    keepalive.tick(14.9)
    assert sent == []
    keepalive.tick(15.0)                        # it sends by itself
    keepalive.tick(20.0)
    assert sent == ['KEEPALIVE']
    assert not keepalive.dead(45.0) and keepalive.dead(45.1)
    keepalive.heard(40.0)
    assert not keepalive.dead(60.0)


def test_keepalive_zero_turns_it_off():
    sent = []
    keepalive = punch.Keepalive(0, now=0.0, send=lambda: sent.append('KEEPALIVE'))
    keepalive.tick(1000.0)
    assert sent == [] and not keepalive.dead(1000.0)


# ---------------------------------------------------------------------------
# Mapping discovery.


def test_discover_mapping_on_loopback_sees_no_nat():
    server, port = start_server()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(('127.0.0.1', 0))
            mapping = punch.discover_mapping(sock, ('127.0.0.1', port),
                                             ('127.0.0.1', port + 1), os.urandom(16))
            assert mapping.public == mapping.probed == sock.getsockname()
            assert not mapping.symmetric
    finally:
        server.stop()


def test_discover_mapping_gives_up_when_nobody_answers():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        sock.bind(('127.0.0.1', 0))
        silent.bind(('127.0.0.1', 0))
        try:
            punch.discover_mapping(sock, silent.getsockname(), silent.getsockname(), b'x' * 16)
        except TimeoutError as error:
            assert 'no UDP answer from 127.0.0.1:' in str(error)
        else:
            raise AssertionError('discover_mapping did not time out')


def test_a_punch_before_our_introduce_is_kept_and_answered():
    out = io.StringIO()
    client = Client('alice', [('127.0.0.1', 9)], out=out)
    bob = SessionKey(SESSION, 0)                        # bob asked: we are role 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client.udp, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bob_udp:
        client.udp.bind(('127.0.0.1', 0))
        bob_udp.bind(('127.0.0.1', 0))
        bob_udp.settimeout(5)
        client.peer_message(received(bob, wire.PUNCH), bob_udp.getsockname())
        stranger = SessionKey(OTHER, 0)
        client.peer_message(received(stranger, wire.PUNCH), bob_udp.getsockname())
        assert out.getvalue() == ''                     # nothing to say yet
        # Its public endpoint is still unknown to us: punch a closed local port.
        client.control_introduce(client.links[0], introduction(public=('127.0.0.1', 9), role=1))
        answer = wire.decode(bob_udp.recvfrom(2048)[0])
        assert answer.type == wire.PUNCH_ACK
        assert bob.check(answer)
        assert f'* connected to bob at 127.0.0.1:{bob_udp.getsockname()[1]} (direct, ' \
            in out.getvalue()
        assert len(client.sessions) == 1                # the stranger's punch made nothing


# ---------------------------------------------------------------------------
# TCP hole punching: challenge and response.


def drive(selector, until, timeout=5.0):
    """Run a selector loop by hand until until() is true."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for key, mask in selector.select(0.05):
            if selector.get_map().get(key.fd) is key:
                key.data(key.fileobj, mask)
    return until()


def listening_punch(selector, key, locked, messages=None):
    """A TcpPunch on loopback that only listens; returns it and its port."""
    attempt = tcppunch.TcpPunch(selector, ('127.0.0.1', 0), [], key, time.monotonic(),
                                locked.append,
                                lambda stream, message: (messages or []).append(message))
    return attempt, attempt.listener.getsockname()[1]


def frames_from(sock, selector):
    """Everything sock hears until the other side closes it, as decoded messages."""
    sock.setblocking(False)
    heard = bytearray()

    def closed():
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return False
        heard.extend(data)
        return not data

    assert drive(selector, closed), 'the stream was not closed'
    reader = wire.FrameReader()
    reader.feed(bytes(heard))
    return [wire.decode(frame) for frame in reader.frames()]


def test_two_tcp_punches_of_one_session_lock_onto_each_other():
    """The two roles of one token prove themselves on one stream; messages then flow."""
    selector = selectors.DefaultSelector()
    ours, theirs = keys()
    locked_a, locked_b, heard_b = [], [], []
    a, port = listening_punch(selector, ours, locked_a)
    b = tcppunch.TcpPunch(selector, ('127.0.0.1', 0), [('127.0.0.1', port)], theirs,
                          time.monotonic(), locked_b.append,
                          lambda stream, message: heard_b.append(message))
    try:
        b.tick(time.monotonic())
        assert drive(selector, lambda: locked_a and locked_b)
        assert a.locked is locked_a[0] and b.locked is locked_b[0]
        assert a.listener is None and b.listener is None     # no more trying
        assert a.locked.open and b.locked.open
        a.locked.send(ours.seal(wire.DATA, seq=0, oldest=0, text='over tcp'))
        assert drive(selector, lambda: heard_b)
        assert [(m.type, m.text) for m in heard_b] == [(wire.DATA, 'over tcp')]
    finally:
        a.close()
        b.close()
        selector.close()


def test_a_stranger_gets_only_a_challenge_and_is_closed_on_junk():
    """Whoever connects hears 16 random bytes, nothing of the session; junk closes it."""
    selector = selectors.DefaultSelector()
    ours, theirs = keys()
    locked = []
    attempt, port = listening_punch(selector, ours, locked)
    nonces = []
    try:
        for junk in (b'GET / HTTP/1.1\r\n\r\n', wire.encode(wire.LIST)):
            with socket.create_connection(('127.0.0.1', port), timeout=5) as stranger:
                stranger.sendall(junk)
                heard = frames_from(stranger, selector)
                assert [m.type for m in heard] == [wire.CHALLENGE]
                raw = heard[0].raw
                assert len(raw) == wire.HEADER_SIZE + wire.NONCE_SIZE
                assert ours.id not in raw and SESSION not in raw
                nonces.append(heard[0].nonce)
        assert nonces[0] != nonces[1]               # a new random nonce per stream
        assert not locked and not attempt.streams and attempt.listener is not None
    finally:
        attempt.close()
        selector.close()


def next_message(sock, selector, reader):
    """The next message sock hears, driving our side's loop meanwhile."""
    sock.setblocking(False)
    frames = []

    def arrived():
        try:
            reader.feed(sock.recv(4096))
        except BlockingIOError:
            pass
        frames.extend(reader.frames())
        return frames

    assert drive(selector, arrived), 'nothing arrived'
    return frames[0]


def test_a_punch_that_does_not_echo_our_nonce_is_closed():
    """A PUNCH of another session, one sealed for another nonce, or ours reflected: closed."""
    selector = selectors.DefaultSelector()
    ours, theirs = keys()
    locked = []
    attempt, port = listening_punch(selector, ours, locked)
    answers = [
        lambda nonce: SessionKey(OTHER, 1).seal(wire.PUNCH, nonce=nonce),
        lambda nonce: theirs.seal(wire.PUNCH, nonce=bytes(wire.NONCE_SIZE)),
        lambda nonce: theirs.seal(wire.PUNCH, nonce=nonce[::-1]),
    ]
    try:
        for answer in answers:
            with socket.create_connection(('127.0.0.1', port), timeout=5) as stranger:
                challenge = wire.decode(next_message(stranger, selector, wire.FrameReader()))
                assert challenge.type == wire.CHALLENGE
                stranger.sendall(answer(challenge.nonce))
                assert frames_from(stranger, selector) == []
        # Our own answer to our own challenge, sent back at us: the MAC says whose it is.
        with socket.create_connection(('127.0.0.1', port), timeout=5) as stranger:
            reader = wire.FrameReader()
            challenge = wire.decode(next_message(stranger, selector, reader))
            stranger.sendall(wire.encode(wire.CHALLENGE, nonce=challenge.nonce))
            reflected = next_message(stranger, selector, reader)
            assert wire.decode(reflected).nonce == challenge.nonce
            stranger.sendall(reflected)
            assert frames_from(stranger, selector) == []
        assert not locked and not attempt.streams
    finally:
        attempt.close()
        selector.close()


def test_tcp_punch_sends_nothing_of_the_session_before_the_proof():
    """Before a stream is proven, every target (public or private) hears only a CHALLENGE."""
    selector = selectors.DefaultSelector()
    ours, _ = keys()
    with socket.create_server(('127.0.0.1', 0)) as public, \
            socket.create_server(('127.0.0.1', 0)) as private:
        attempt = tcppunch.TcpPunch(selector, ('127.0.0.1', 0),
                                    [public.getsockname(), private.getsockname()], ours,
                                    time.monotonic(), lambda stream: None,
                                    lambda stream, message: None)
        attempt.tick(time.monotonic())
        ends = [public.accept()[0], private.accept()[0]]
        assert drive(selector, lambda: len(attempt.streams) == 2)
        attempt.close()                             # all it sent, then the end of each stream
        heard = []
        for end in ends:
            end.settimeout(5)
            with end:
                heard.append(b''.join(iter(lambda: end.recv(4096), b'')))
    for data in heard:
        assert wire.decode(data).type == wire.CHALLENGE
        assert SESSION not in data and ours.id not in data
    assert heard[0] != heard[1]
