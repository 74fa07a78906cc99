"""The rendezvous server, spoken to in raw protocol by test peers."""

import os
import socket
import time

import pytest

import identity
import p2pcommon as wire
import rendezvous
from procs import command, start, start_server


class RawPeer:
    """A hand-driven peer: a control connection and a UDP socket."""

    def __init__(self, port, name=None, receive_buffer=None):
        self.port = port
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer:          # before connecting: it sets the window we offer
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.tcp.settimeout(5)
        self.tcp.connect(('127.0.0.1', port))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(('127.0.0.1', 0))
        self.udp.settimeout(5)
        self.reader = wire.FrameReader()
        self.name = name
        self.token = None
        if name:
            self.register(name)

    def send(self, type, **fields):
        """Send one control message."""
        self.tcp.sendall(wire.encode(type, **fields))

    def receive(self):
        """The next control message from the server."""
        while True:
            for frame in self.reader.frames():
                return wire.decode(frame)
            data = self.tcp.recv(65536)
            assert data, 'the server closed the connection'
            self.reader.feed(data)

    def register(self, name, proof=None):
        """Register and tell the server our public UDP endpoint."""
        self.send_register(name, proof)
        reply = self.receive()
        assert reply.type == wire.REGISTERED, reply
        self.name = name
        self.token = reply.token
        self.mapping(self.token)

    def send_register(self, name, proof=None):
        """Send REGISTER; by default the proof is the name's, as if its key were fixed."""
        self.send(wire.REGISTER, name=name, private=[self.udp.getsockname()],
                  tcp_port=self.tcp.getsockname()[1], proof=proof or proof_of(name))

    def mapping(self, token, port=None):
        """Send a MAPPING request; return the reply and its size."""
        request = wire.encode(wire.MAPPING, token=token, public=('0.0.0.0', 0))
        self.udp.sendto(request, ('127.0.0.1', port or self.port))
        data, _ = self.udp.recvfrom(2048)
        assert len(data) <= len(request)
        return wire.decode(data)

    def close(self):
        """Close both sockets."""
        self.tcp.close()
        self.udp.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def proof_of(name, key=b'test key of everyone'):
    """The proof a user with this key sends for name (to a server on localhost)."""
    return identity.name_proof(key, name, '127.0.0.1')


def introduce(asker, target):
    """asker asks, the server asks target, target agrees: the INTRODUCEs (asker's, target's)."""
    asker.send(wire.CONNECT, target=target.name)
    assert asker.receive() == wire.Message(wire.ASK, wire.FLAG_REPLY, name=target.name)
    assert target.receive() == wire.Message(wire.ASK, name=asker.name)   # a request
    target.send(wire.CONNECT, target=asker.name)
    to_target, to_asker = target.receive(), asker.receive()
    assert (to_asker.type, to_target.type) == (wire.INTRODUCE, wire.INTRODUCE)
    return to_asker, to_target


def sealed(token, type, role=0, **fields):
    """A peer message of this session, as the peer of role would seal it."""
    return identity.SessionKey(token, role).seal(type, **fields)


def test_mapping_reply_holds_the_source_address_and_port(peers):
    alice = peers('alice')
    reply = alice.mapping(alice.token)
    assert reply.type == wire.MAPPING and reply.flags & wire.FLAG_REPLY
    assert reply.public == alice.udp.getsockname()


def test_probe_port_answers_too(server, peers):
    alice = peers('alice')
    reply = alice.mapping(alice.token, port=server[1] + 1)
    assert reply.public == alice.udp.getsockname()


@pytest.mark.parametrize('bind', [[], ['--bind', '0.0.0.0']])
def test_a_wildcard_socket_answers_from_the_address_it_was_asked_at(bind):
    """127.0.0.2 is this host too; the kernel alone would answer from 127.0.0.1."""
    proc, port = start_server(*bind)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(('127.0.0.1', 0))
            udp.settimeout(5)
            udp.sendto(wire.encode(wire.MAPPING, token=bytes(wire.TOKEN_SIZE),
                                   public=('0.0.0.0', 0)), ('127.0.0.2', port))
            data, source = udp.recvfrom(2048)
            assert source == ('127.0.0.2', port)
            assert wire.decode(data).public == udp.getsockname()
    finally:
        proc.stop()


def test_introduce_goes_to_both_with_one_fresh_session(peers):
    alice, bob = peers('alice'), peers('bob')
    to_alice, to_bob = introduce(alice, bob)
    assert to_bob.session == to_alice.session != wire.NO_SESSION
    assert (to_alice.role, to_bob.role) == (0, 1)       # alice asked first
    assert (to_bob.name, to_bob.public) == ('alice', alice.udp.getsockname())
    assert (to_alice.name, to_alice.public) == ('bob', bob.udp.getsockname())
    assert to_alice.private == [bob.udp.getsockname()]
    assert to_alice.port_delta == 0
    alice.send(wire.CONNECT, target='bob')      # consent was given: introduced at once
    assert alice.receive().session != to_alice.session


def test_port_delta_is_zero_only_for_one_port():
    """A random-port NAT's two ports may lie more than 32767 apart: still not zero."""
    peer = rendezvous.Peer.__new__(rendezvous.Peer)     # only its two endpoints matter
    for public, probed, delta in ((40000, 40002, 2), (40000, 39999, -1), (40000, 40000, 0),
                                  (40000, 2000, 27536), (60000, 1100, 6636)):
        peer.public, peer.probed = ('198.51.100.1', public), ('198.51.100.1', probed)
        assert peer.port_delta == delta
    peer.probed = ('198.51.100.9', 1100)        # another address: nothing to compare
    assert peer.port_delta == 0


def test_nobody_else_can_set_a_peers_public_endpoint(peers):
    alice, bob, mallory = peers('alice'), peers('bob'), peers()
    mallory.mapping(os.urandom(wire.TOKEN_SIZE))        # answered, but files nothing
    mallory.send_register('mallory')
    assert mallory.receive().type == wire.REGISTERED
    assert introduce(bob, alice)[0].public == alice.udp.getsockname()


def test_relay_forwards_within_the_pair_only(peers):
    alice, bob, carol = peers('alice'), peers('bob'), peers('carol')
    session = introduce(alice, bob)[0].session
    data = sealed(session, wire.DATA, seq=0, oldest=0, text='via the server')
    alice.send(wire.RELAY, session=session, message=data)
    relayed = bob.receive()
    assert relayed.type == wire.RELAY and relayed.message == data
    carol.send(wire.RELAY, session=session, message=data)
    error = carol.receive()
    assert (error.code, error.text) == (wire.E_NOT_INTRODUCED, 'relay: not a session of yours')


def test_relay_carries_peer_traffic_only(peers):
    alice, bob = peers('alice'), peers('bob')
    session = introduce(alice, bob)[0].session
    alice.send(wire.RELAY, session=session, message=wire.encode(wire.LIST))
    error = alice.receive()
    assert (error.code, error.text) == (wire.E_BAD_MESSAGE, 'relay: carries only peer traffic')


def test_relay_carries_only_messages_of_that_session(peers):
    alice, bob = peers('alice'), peers('bob')
    session = introduce(alice, bob)[0].session
    elsewhere = sealed(os.urandom(wire.TOKEN_SIZE), wire.KEEPALIVE)
    alice.send(wire.RELAY, session=session, message=elsewhere)
    error = alice.receive()
    assert (error.code, error.text) == (wire.E_BAD_MESSAGE, 'relay: carries only peer traffic')


def test_a_peer_that_leaves_is_announced_to_its_partner_without_a_forged_bye(peers):
    alice, bob = peers('alice'), peers('bob')
    session = introduce(alice, bob)[0].session
    bob.close()
    relayed = alice.receive()
    assert (relayed.type, relayed.session, relayed.message) == (wire.RELAY, session, b'')


def test_bye_closes_the_control_connection(peers):
    alice = peers('alice')
    alice.send(wire.BYE)
    assert alice.tcp.recv(100) == b''


def test_requests_before_registering_are_refused(peers):
    stranger = peers()
    stranger.send(wire.CONNECT, target='bob')
    error = stranger.receive()
    assert (error.code, error.text) == (wire.E_NOT_REGISTERED, 'register first')


def test_registering_twice_is_refused(peers):
    alice = peers('alice')
    alice.send_register('alice2')
    assert alice.receive().code == wire.E_ALREADY_REGISTERED


def test_a_broken_stream_is_closed_with_a_reason(server, peers):
    alice, bob = peers('alice'), peers('bob')
    bob.tcp.sendall(b'GET / HTTP/1.0\r\n\r\n')
    error = bob.receive()
    assert error.type == wire.ERROR and error.text.startswith('magic: ')
    assert bob.tcp.recv(100) == b''
    alice.send(wire.LIST)
    assert alice.receive().names == ['alice']


def test_bad_datagrams_are_dropped_and_the_server_goes_on(peers):
    alice = peers('alice')
    for junk in (b'', b'x', os.urandom(100), wire.encode(wire.LIST)):
        alice.udp.sendto(junk, ('127.0.0.1', alice.port))
    assert alice.mapping(alice.token).public == alice.udp.getsockname()


def test_verbose_log_shows_each_message_one_line(server, peers):
    proc, _ = server
    alice = peers('alice')
    alice.send(wire.LIST)
    alice.receive()
    proc.expect_log(r'< REGISTER from 127\.0\.0\.1:\d+ \(tcp\)')
    proc.expect_log(r'> REGISTERED to alice \(tcp\)')
    proc.expect_log(r'< MAPPING from 127\.0\.0\.1:\d+ \(udp \d+\)')
    proc.expect_log(r'> MAPPING to 127\.0\.0\.1:\d+ \(udp \d+\)')
    proc.expect_log(r'< LIST from alice \(tcp\)')
    proc.expect_log(r'> PEERS to alice \(tcp\)')


def test_quiet_server_logs_nothing_for_a_normal_session():
    with socket.socket() as probe:          # -q hides the port: choose it ourselves
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    proc = start(command('rendezvous.py', '-q', '--bind', '127.0.0.1', '--port', port), 'quiet')
    try:
        deadline = time.monotonic() + 10
        while True:                         # until it listens
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and proc.popen.poll() is None, \
                    proc.transcript()
        with RawPeer(port, 'alice') as alice, RawPeer(port, 'bob') as bob:
            introduce(alice, bob)
            alice.send(wire.CONNECT, target='nobody')
            assert alice.receive().type == wire.ERROR
    finally:
        proc.stop()
    assert proc.err.lines == []


def test_a_new_introduction_replaces_the_old_one(peers):
    # Else every repeated CONNECT would keep a session, and memory, forever.
    alice, bob = peers('alice'), peers('bob')
    sessions = [introduce(alice, bob)[0].session]
    for _ in range(2):
        alice.send(wire.CONNECT, target='bob')
        sessions.append(alice.receive().session)
        bob.receive()
    hello = sealed(sessions[0], wire.KEEPALIVE)
    alice.send(wire.RELAY, session=sessions[0], message=hello)
    assert alice.receive().text == 'relay: not a session of yours'
    hello = sealed(sessions[-1], wire.KEEPALIVE)
    alice.send(wire.RELAY, session=sessions[-1], message=hello)
    assert bob.receive().message == hello
