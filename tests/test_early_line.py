"""Issue #11, "A lost early line": no chat line is lost without a word.

In-process, two Clients (alice and bob) with real UDP sockets on loopback
and fake server links: the test plays the server, so it decides who is
introduced first, and hands each datagram over only when it says so.
"""

import io
import select

import pytest

import p2pcommon as wire
import interfaces
from p2pclient import Client
from test_client_security import FakeLink


class Peer:
    """A Client and what it printed."""

    def __init__(self, name):
        self.out = io.StringIO()
        self.client = Client(name, [('127.0.0.1', 9)], out=self.out, transport='udp')
        self.client.links = [FakeLink()]
        self.client.udp = wire.UDPSocket(0, '127.0.0.1')
        self.client.udp.setblocking(False)
        self.client.networks = interfaces.our_networks()

    @property
    def endpoint(self):
        return ('127.0.0.1', self.client.udp.port)

    @property
    def lines(self):
        return self.out.getvalue().splitlines()

    def type(self, line):
        """The user types a line."""
        self.client.command(line)

    def introduce(self, other, token, role):
        """The server introduces other to us."""
        link = self.client.links[0]
        self.client.handle_control(link, wire.Message(
            wire.INTRODUCE, name=other.client.name, session=token, role=role,
            public=other.endpoint, port_delta=0, private=[], tcp_public=other.endpoint,
            tcp_port=0))

    def receive(self):
        """Take every datagram that has reached us (waiting up to 5 s for the first)."""
        assert select.select([self.client.udp], [], [], 5)[0], 'nothing arrived'
        self.client.read_udp(self.client.udp, select.POLLIN)

    def drop(self):
        """Lose every datagram waiting for us: the path is dead."""
        while select.select([self.client.udp], [], [], 0)[0]:
            self.client.udp.recvfrom(wire.MAX_DATAGRAM + 1)

    def close(self):
        self.client.udp.close()


@pytest.fixture
def peers():
    """alice and bob, not yet introduced."""
    alice, bob = Peer('alice'), Peer('bob')
    yield alice, bob
    alice.close()
    bob.close()


def connected(alice, bob, token=b't' * wire.TOKEN_SIZE):
    """The server introduces both (bob first, as it does), and the punches cross."""
    bob.introduce(alice, token, role=1)
    alice.introduce(bob, token, role=0)
    bob.receive()
    alice.receive()


def test_a_line_sent_before_the_peer_is_introduced_arrives_once_it_is(peers):
    """The race of issue #11: alice's INTRODUCE comes first, her line reaches bob too early."""
    alice, bob = peers
    token = b't' * wire.TOKEN_SIZE
    alice.type('/connect bob')
    alice.type('first words')
    alice.introduce(bob, token, role=0)     # bob's INTRODUCE is late: he is busy
    bob.receive()                           # the punch is kept, the line dropped
    assert not [line for line in bob.lines if line.startswith('<alice>')]
    bob.introduce(alice, token, role=1)     # bob answers the kept punch and punches
    alice.receive()                         # the proof: alice sends the line again
    bob.receive()
    assert [line for line in bob.lines if line.startswith('<alice>')] == ['<alice> first words']


def test_a_line_in_flight_when_the_session_is_replaced_goes_on_the_new_one(peers):
    """/connect again while a line waits for its ACK: the new session carries it."""
    alice, bob = peers
    connected(alice, bob)
    bob.drop()
    alice.type('are you there?')
    bob.drop()                              # the old path is dead: lost
    alice.type('/connect bob')
    connected(alice, bob, token=b'u' * wire.TOKEN_SIZE)
    bob.receive()
    assert [line for line in bob.lines if line.startswith('<alice>')] == \
        ['<alice> are you there?']
    assert not [line for line in alice.lines if 'not delivered' in line]


def test_a_line_sent_early_and_then_introduced_again_arrives_once(peers):
    """The line rode alice's first punches; a second INTRODUCE replaced that session."""
    alice, bob = peers
    alice.type('/connect bob')
    alice.type('first words')
    alice.introduce(bob, b't' * wire.TOKEN_SIZE, role=0)
    bob.drop()                              # bob never saw that session
    connected(alice, bob, token=b'u' * wire.TOKEN_SIZE)
    bob.receive()
    assert [line for line in bob.lines if line.startswith('<alice>')] == ['<alice> first words']


def test_a_line_in_flight_when_the_peer_leaves_is_reported(peers):
    alice, bob = peers
    connected(alice, bob)
    bob.drop()
    alice.type('wait for me')
    bob.drop()
    bob.client.do_quit('')                       # bob says GOODBYE before the line got there
    alice.receive()
    assert '* bob left' in alice.lines
    assert '* not delivered to bob: wait for me' in alice.lines


def test_lines_held_when_the_only_server_is_lost_are_reported(peers):
    alice, _ = peers
    alice.type('/connect bob')
    alice.type('hello bob')
    link = alice.client.links[0]
    link.token = None                       # the server went away, and our request with it
    alice.client.relay_lost(link)
    assert alice.lines[-2:] == [
        '* the request to connect to bob went with the server; /connect bob again once '
        'registered',
        '* not delivered to bob: hello bob']
    alice.type('still there?')
    assert '* not connected to bob: /connect bob first' in alice.lines


def test_lines_held_for_an_introduction_we_ignore_are_reported(peers):
    alice, bob = peers
    alice.type('/connect bob')
    alice.type('hello bob')
    alice.client.handle_control(alice.client.links[0], wire.Message(
        wire.INTRODUCE, name='bob', session=b't' * wire.TOKEN_SIZE, role=255,
        public=bob.endpoint, port_delta=0, private=[], tcp_public=bob.endpoint, tcp_port=0))
    assert alice.lines[-2:] == [
        f'* {alice.client.links[0]} introduced bob with role 255, neither 0 nor 1: ignored',
        '* not delivered to bob: hello bob']


@pytest.mark.parametrize('why, said', [(wire.DECLINED, '* bob declined'),
                                       (wire.NO_ANSWER, '* bob did not answer')])
def test_lines_held_for_a_peer_that_says_no_are_reported(peers, why, said):
    alice, _ = peers
    alice.type('/connect bob')
    alice.type('hello bob')
    alice.client.handle_control(alice.client.links[0], wire.Message(
        wire.DECLINE, flags=wire.FLAG_REPLY, name='bob', why=why))
    assert alice.lines[-2:] == [said, '* not delivered to bob: hello bob']
