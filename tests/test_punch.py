"""The punching routine, candidates, keepalives and mapping discovery."""

import io
import selectors
import os
import socket
import time

import p2pcommon as wire
import punch
from p2pclient import Client
from procs import start_server

SESSION = b's' * wire.TOKEN_SIZE
OTHER = b'o' * wire.TOKEN_SIZE


def introduction(port_delta=0, private=(), public=('198.51.100.2', 40000)):
    """An INTRODUCE as the server would send it."""
    return wire.Message(wire.INTRODUCE, name='bob', session=SESSION,
                        public=public, port_delta=port_delta,
                        private=list(private), tcp_public=public, tcp_port=0)


def received(type, session=SESSION):
    """A message as it comes off the wire, flags and all."""
    return wire.decode(wire.encode(type, session=session))


def test_candidates_are_public_then_private():
    found = punch.candidates(introduction(private=[('198.18.2.2', 5000)]))
    assert found == [('198.51.100.2', 40000), ('198.18.2.2', 5000)]


def test_candidates_predict_the_ports_of_a_symmetric_nat():
    found = punch.candidates(introduction(port_delta=2))
    assert found[:3] == [('198.51.100.2', 40000), ('198.51.100.2', 40002),
                         ('198.51.100.2', 40004)]
    assert len(found) == 1 + punch.PREDICTION_STEPS


def test_punch_sends_to_every_candidate_each_round():
    sent = []
    targets = [('198.51.100.2', 1), ('198.18.2.2', 2)]
    attempt = punch.Punch(lambda data, to: sent.append((wire.decode(data), to)),
                          SESSION, targets, now=0.0)
    attempt.tick(0.0)
    attempt.tick(0.05)                           # not due yet
    attempt.tick(punch.PUNCH_INTERVAL)
    assert [to for _, to in sent] == targets * 2
    assert all(m.type == wire.PUNCH and m.flags & wire.FLAG_PUNCHING for m, _ in sent)


def test_a_punch_is_bounced_and_locks_the_path():
    sent = []
    attempt = punch.Punch(lambda data, to: sent.append((wire.decode(data), to)),
                          SESSION, [('198.51.100.2', 1)], now=0.0)
    source = ('198.51.100.2', 7)                # a port we never punched: symmetric NAT
    assert attempt.receive(received(wire.PUNCH), source) == source
    assert sent == [(wire.Message(wire.PUNCH_ACK, session=SESSION), source)]
    attempt.receive(received(wire.PUNCH_ACK), ('198.18.2.2', 2))
    assert attempt.locked == source             # the first proof wins
    attempt.tick(10.0)
    assert len(sent) == 1                        # no more punching once locked
    assert not attempt.expired(10.0)


def test_a_keepalive_is_bounced_too():
    sent = []
    attempt = punch.Punch(lambda data, to: sent.append(wire.decode(data)), SESSION, [], 0.0)
    attempt.receive(received(wire.KEEPALIVE), ('::1', 1))
    attempt.receive(received(wire.PUNCH_ACK), ('::1', 1))
    assert sent == [wire.Message(wire.PUNCH_ACK, session=SESSION)]


def test_a_punch_expires_without_an_answer():
    attempt = punch.Punch(lambda data, to: None, SESSION, [], now=0.0, timeout=2.0)
    assert not attempt.expired(1.9)
    assert attempt.expired(2.0)


def test_keepalive_is_due_after_the_interval_and_dead_after_silence():
    keepalive = punch.Keepalive(15.0, now=0.0)
    assert not keepalive.due(14.9) and keepalive.due(15.0)
    keepalive.sent(15.0)
    assert not keepalive.due(20.0)
    assert not keepalive.dead(45.0) and keepalive.dead(45.1)
    keepalive.heard(40.0)
    assert not keepalive.dead(60.0)


def test_keepalive_zero_turns_it_off():
    keepalive = punch.Keepalive(0, now=0.0)
    assert not keepalive.due(1000.0) and not keepalive.dead(1000.0)


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
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client.udp, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as bob:
        client.udp.bind(('127.0.0.1', 0))
        bob.bind(('127.0.0.1', 0))
        bob.settimeout(5)
        client.peer_message(received(wire.PUNCH), bob.getsockname())
        client.peer_message(received(wire.PUNCH, OTHER), bob.getsockname())
        assert out.getvalue() == ''                     # nothing to say yet
        # Its public endpoint is still unknown to us: punch a closed local port.
        client.introduced(client.links[0], introduction(public=('127.0.0.1', 9)))
        answer = wire.decode(bob.recvfrom(2048)[0])
        assert answer.type == wire.PUNCH_ACK
        assert answer.session == SESSION
        assert f'* connected to bob at 127.0.0.1:{bob.getsockname()[1]} (direct, ' \
            in out.getvalue()
        assert len(client.sessions) == 1                # the stranger's punch made nothing


def drive(selector, until, timeout=5.0):
    """Run a selector loop by hand until until() is true."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for key, mask in selector.select(0.05):
            if selector.get_map().get(key.fd) is key:
                key.data(key.fileobj, mask)
    return until()


def test_tcp_punch_locks_on_the_peer_and_closes_on_a_stranger():
    selector = selectors.DefaultSelector()
    locked = []
    attempt = punch.TcpPunch(selector, ('127.0.0.1', 0), [], SESSION, time.monotonic(),
                             locked.append, lambda stream, message: None)
    port = attempt.listener.getsockname()[1]
    with socket.create_connection(('127.0.0.1', port), timeout=5) as stranger:
        stranger.sendall(wire.encode(wire.PUNCH, session=OTHER))
        stranger.setblocking(False)
        heard = bytearray()

        def closed():
            try:
                data = stranger.recv(100)
            except BlockingIOError:
                return False
            heard.extend(data)
            return not data

        assert drive(selector, closed)              # closed: no stream for a wrong token
        assert not locked and not attempt.streams
        assert wire.decode(bytes(heard)).type == wire.PUNCH    # our proof, not theirs
    with socket.create_connection(('127.0.0.1', port), timeout=5) as peer:
        peer.sendall(wire.encode(wire.PUNCH, session=SESSION))
        assert drive(selector, lambda: locked)
        assert attempt.locked is locked[0] and attempt.listener is None
    attempt.close()


def test_tcp_punch_sends_early_chat_to_the_public_endpoint_only():
    """A line typed before the lock follows our PUNCH to the peer's public end, nowhere else."""
    selector = selectors.DefaultSelector()
    with socket.create_server(('127.0.0.1', 0)) as public, \
            socket.create_server(('127.0.0.1', 0)) as private:
        attempt = punch.TcpPunch(selector, ('127.0.0.1', 0),
                                 [public.getsockname(), private.getsockname()], SESSION,
                                 time.monotonic(), lambda stream: None,
                                 lambda stream, message: None)
        line = wire.encode(wire.DATA, session=SESSION, seq=0, oldest=0, text='early words')
        attempt.send_early(line)
        attempt.tick(time.monotonic())
        ends = [public.accept()[0], private.accept()[0]]
        assert drive(selector, lambda: len(attempt.streams) == 2)
        attempt.close()                             # all it sent, then the end of each stream
        heard = []
        for end in ends:
            end.settimeout(5)
            with end:
                heard.append(b''.join(iter(lambda: end.recv(4096), b'')))
    punch_bytes = wire.encode(wire.PUNCH, session=SESSION)
    assert heard == [punch_bytes + line, punch_bytes]
