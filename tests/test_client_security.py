"""What a stranger, a peer or a server can and cannot make our client do.

In-process: a Client with real UDP sockets on loopback, fed the messages an
attacker would send; what it prints and sends is what is checked.
"""

import collections
import io
import socket

import pytest

import p2pcommon as wire
import caps
import repunch
import interfaces
import punch
from identity import SessionKey
from p2pclient import Client

TOKEN = b't' * wire.TOKEN_SIZE


class FakeLink:
    """A control connection that records what the client sends the server."""

    def __init__(self):
        self.sent = []
        self.connects = collections.deque()
        self.token = b'r' * wire.TOKEN_SIZE
        self.local = ('127.0.0.1', 1)

    def send(self, type, **fields):
        """Record one message to the server."""
        self.sent.append(wire.Message(type, **fields))

    def tick(self, now):
        """No timers here."""


@pytest.fixture
def client():
    """alice, with a UDP socket on loopback and a fake server link; yields (client, out)."""
    out = io.StringIO()
    alice = Client('alice', [('127.0.0.1', 9)], out=out, transport='udp')
    alice.links = [FakeLink()]
    alice.udp = wire.UDPSocket(0, '127.0.0.1')
    alice.udp.setblocking(False)
    alice.networks = interfaces.our_networks()
    yield alice, out
    alice.udp.close()


@pytest.fixture
def bob_udp():
    """bob's UDP socket: where the introduction says bob is."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(('127.0.0.1', 0))
        sock.settimeout(5)
        yield sock


def introduce(client, name, endpoint, private=(), token=TOKEN, tcp_port=0):
    """The server introduces name to client (alice answered: role 1)."""
    client.control_introduce(client.links[0], wire.Message(
        wire.INTRODUCE, name=name, session=token, role=1, public=endpoint, port_delta=0,
        private=list(private), tcp_public=endpoint, tcp_port=tcp_port))


def from_bob(client, key, type, source, **fields):
    """A datagram that bob's side sealed arrives at the client from source."""
    if type == wire.PUNCH:
        fields.setdefault('nonce', punch.NO_NONCE)
    client.peer_message(wire.decode(key.seal(type, **fields)), source)


def session_of(client):
    """The client's one session."""
    (session,) = client.sessions.values()
    return session


def test_a_replayed_message_from_elsewhere_does_not_move_the_path(client, bob_udp):
    alice, out = client
    bob = SessionKey(TOKEN, 0)
    introduce(alice, 'bob', bob_udp.getsockname())
    from_bob(alice, bob, wire.PUNCH, bob_udp.getsockname())
    assert session_of(alice).endpoint == bob_udp.getsockname()
    old = bob.seal(wire.DATA, seq=0, oldest=0, text='hello')
    alice.peer_message(wire.decode(old), bob_udp.getsockname())
    alice.peer_message(wire.decode(old), ('127.0.0.66', 4000))       # the same bytes, replayed
    assert session_of(alice).endpoint == bob_udp.getsockname()
    assert out.getvalue().count('<bob> hello') == 1


def test_a_newer_message_from_a_new_source_moves_the_path(client, bob_udp):
    alice, out = client
    bob = SessionKey(TOKEN, 0)
    introduce(alice, 'bob', bob_udp.getsockname())
    from_bob(alice, bob, wire.PUNCH, bob_udp.getsockname())
    from_bob(alice, bob, wire.DATA, ('127.0.0.1', 4001), seq=0, oldest=0, text='moved')
    assert session_of(alice).endpoint == ('127.0.0.1', 4001)
    assert '* bob now reaches us from 127.0.0.1:4001' in out.getvalue()


def test_a_late_punch_from_another_candidate_does_not_move_the_path(client, bob_udp):
    alice, _ = client
    bob = SessionKey(TOKEN, 0)
    introduce(alice, 'bob', bob_udp.getsockname())
    from_bob(alice, bob, wire.PUNCH, bob_udp.getsockname())
    from_bob(alice, bob, wire.PUNCH, ('127.0.0.1', 4002))
    assert session_of(alice).endpoint == bob_udp.getsockname()


def test_our_own_message_reflected_back_and_a_forged_mac_are_ignored(client, bob_udp):
    alice, out = client
    introduce(alice, 'bob', bob_udp.getsockname())
    ours = session_of(alice).key
    from_bob(alice, ours, wire.DATA, bob_udp.getsockname(), seq=0, oldest=0, text='echo')
    forged = bytearray(SessionKey(TOKEN, 0).seal(wire.DATA, seq=0, oldest=0, text='forged'))
    forged[-1] ^= 1
    alice.peer_message(wire.decode(bytes(forged)), bob_udp.getsockname())
    assert session_of(alice).endpoint is None
    assert '<bob>' not in out.getvalue()


def test_nothing_sent_to_a_peer_carries_the_session_token(client, bob_udp):
    alice, _ = client
    bob = SessionKey(TOKEN, 0)
    introduce(alice, 'bob', bob_udp.getsockname())
    session = session_of(alice)
    session.punch.tick(1e9)
    from_bob(alice, bob, wire.PUNCH, bob_udp.getsockname())
    alice.chat('a line')
    received = []
    bob_udp.settimeout(0.5)
    try:
        while True:
            received.append(bob_udp.recv(2048))
    except TimeoutError:
        pass
    assert {wire.decode(data).type for data in received} >= {wire.PUNCH, wire.PUNCH_ACK,
                                                             wire.DATA}
    assert not [data for data in received if TOKEN in data]


def test_private_candidates_off_our_networks_are_never_punched(client, bob_udp):
    alice, out = client
    victims = [(f'198.51.100.{i}', 53) for i in range(1, 16)]      # someone else's hosts
    introduce(alice, 'bob', bob_udp.getsockname(), private=victims)
    assert session_of(alice).targets == [bob_udp.getsockname()]
    assert '198.51.100.' not in out.getvalue()


def test_a_relayed_request_to_punch_again_is_taken_once_per_interval(client, bob_udp):
    alice, out = client
    bob = SessionKey(TOKEN, 0)
    introduce(alice, 'bob', bob_udp.getsockname())
    from_bob(alice, bob, wire.PUNCH, bob_udp.getsockname())
    session = session_of(alice)
    session.started -= repunch.REPUNCH_EVERY          # the connect was a while ago
    for _ in range(50):
        alice.control_relay(alice.links[0], wire.Message(
            wire.RELAY, session=TOKEN, message=bob.seal(wire.PUNCH, nonce=punch.NO_NONCE)))
    assert out.getvalue().count('bob lost the direct path; punching again') == 1


def test_a_flood_of_introductions_is_capped(client):
    alice, out = client
    for i in range(200):
        introduce(alice, f'peer{i}', ('127.0.0.1', 9), token=i.to_bytes(16, 'big'),
                  tcp_port=9)
    assert len(alice.sessions) == caps.MAX_SESSIONS
    assert f'{caps.MAX_SESSIONS} sessions are open: ignored' in out.getvalue()


def test_a_flood_of_asks_shows_only_so_many(client):
    alice, out = client
    for i in range(100):
        alice.handle_control(alice.links[0], wire.Message(wire.ASK, name=f'asker{i}'))
    assert out.getvalue().count('asks to connect') == caps.MAX_ASKS


@pytest.mark.parametrize('allow', [['bob'], ['*']])
def test_allow_says_yes_for_us(client, allow):
    alice, out = client
    alice.allow = set(allow)
    alice.handle_control(alice.links[0], wire.Message(wire.ASK, name='bob'))
    assert alice.links[0].sent == [wire.Message(wire.CONNECT, target='bob')]
    assert '* bob asks to connect; accepted (--allow)' in out.getvalue()


def test_an_ask_is_only_a_question_until_the_user_answers(client):
    alice, out = client
    alice.handle_control(alice.links[0], wire.Message(wire.ASK, name='mallory'))
    assert alice.links[0].sent == []                    # nothing goes anywhere
    alice.command('/reject mallory')
    assert alice.links[0].sent == [wire.Message(wire.DECLINE, name='mallory',
                                                why=wire.DECLINED)]
    assert '* declined mallory' in out.getvalue()


def test_a_new_session_does_not_take_the_typed_lines(client, bob_udp):
    alice, out = client
    bob = SessionKey(TOKEN, 0)
    alice.command('/connect bob')
    introduce(alice, 'bob', bob_udp.getsockname())
    from_bob(alice, bob, wire.PUNCH, bob_udp.getsockname())
    alice.allow = {'*'}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mallory_udp:
        mallory_udp.bind(('127.0.0.1', 0))
        mallory = SessionKey(b'm' * 16, 0)
        introduce(alice, 'mallory', mallory_udp.getsockname(), token=b'm' * 16)
        from_bob(alice, mallory, wire.PUNCH, mallory_udp.getsockname())
        assert '* what you type still goes to bob; /to mallory to change' in out.getvalue()
        assert alice.chosen == 'bob'


def test_a_session_that_used_every_number_ends_with_a_word(client, bob_udp):
    alice, out = client
    bob = SessionKey(TOKEN, 0)
    introduce(alice, 'bob', bob_udp.getsockname())
    from_bob(alice, bob, wire.PUNCH, bob_udp.getsockname())
    from_bob(alice, bob, wire.DATA, bob_udp.getsockname(), seq=2**32 - 2, oldest=2**32 - 2,
             text='the last one')
    alice.check_timers(1e9)
    assert '<bob> the last one' in out.getvalue()
    assert 'used up its 4 billion message numbers; /connect bob for a new one' in out.getvalue()
    assert alice.sessions == {}


def test_old_asks_make_room_for_new_ones(client):
    alice, out = client
    for i in range(caps.MAX_ASKS):
        alice.handle_control(alice.links[0], wire.Message(wire.ASK, name=f'asker{i}'))
    for name, (link, when) in alice.asks.items():
        alice.asks[name] = (link, when - caps.ASKS_KEPT)     # a minute ago
    alice.handle_control(alice.links[0], wire.Message(wire.ASK, name='bob'))
    assert '* bob asks to connect' in out.getvalue()


def test_an_introduction_with_a_role_that_is_neither_0_nor_1_is_ignored(client):
    alice, out = client
    alice.control_introduce(alice.links[0], wire.Message(
        wire.INTRODUCE, name='bob', session=TOKEN, role=255, public=('127.0.0.1', 9),
        port_delta=0, private=[], tcp_public=('127.0.0.1', 9), tcp_port=0))
    assert alice.sessions == {}
    assert 'introduced bob with role 255, neither 0 nor 1: ignored' in out.getvalue()
