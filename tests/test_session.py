"""One introduced peer: which path its messages take, before and after the punch."""

import p2pcommon as wire
import punch
from session import Session

SESSION = b's' * wire.TOKEN_SIZE
PUBLIC = ('198.51.100.2', 40000)
PRIVATE = ('198.18.1.7', 5000)      # bob's LAN address: on ours, it may be a stranger


class FakeClient:
    """What a Session needs of the client: a UDP socket that records what it sends."""

    punch_timeout = punch.PUNCH_TIMEOUT
    keepalive_interval = punch.KEEPALIVE_INTERVAL
    downloads = '.'

    def __init__(self):
        self.sent = []              # (message, endpoint)

    def send_udp(self, data, endpoint):
        """Record one datagram."""
        self.sent.append((wire.decode(data), endpoint))

    def say(self, text):
        """Status lines are not what these tests look at."""


def punching_session():
    """A session punching toward bob's public and private endpoints."""
    client = FakeClient()
    session = Session(client, link=None, name='bob', token=SESSION,
                      targets=[PUBLIC, PRIVATE], now=0.0, started=0.0)
    session.start_punch(0.0)
    return client, session


def test_a_line_typed_while_punching_goes_with_the_punches_to_the_public_endpoint_only():
    client, session = punching_session()
    assert {endpoint for message, endpoint in client.sent} == {PUBLIC, PRIVATE}
    client.sent.clear()
    session.channel.send('early words', 0.0)
    assert [(m.type, m.text, endpoint) for m, endpoint in client.sent] == \
        [(wire.DATA, 'early words', PUBLIC)]


def test_once_the_punch_locks_the_line_is_resent_on_the_proven_path():
    client, session = punching_session()
    session.channel.send('early words', 0.0)
    client.sent.clear()
    session.punch.receive(wire.decode(wire.encode(wire.PUNCH_ACK, session=SESSION)), PRIVATE)
    session.channel.hurry(0.1)              # what the client does on the lock
    assert [(m.type, m.text, endpoint) for m, endpoint in client.sent] == \
        [(wire.DATA, 'early words', PRIVATE)]


def test_nothing_but_chat_goes_out_before_the_path_is_proven():
    client, session = punching_session()
    client.sent.clear()
    session.send(wire.OFFER, transfer=1, size=5, sha256=bytes(32), name='a.txt')
    session.send(wire.KEEPALIVE)
    assert client.sent == []


class FakeTcpPunch:
    """A TCP punch that has not locked yet; records the early messages it is given."""

    locked = None

    def __init__(self):
        self.early = []

    def send_early(self, data):
        """Record one early message."""
        self.early.append(wire.decode(data).text)


def test_while_tcp_is_punched_an_early_line_goes_to_it_once_however_long_it_takes():
    client = FakeClient()
    session = Session(client, link=None, name='bob', token=SESSION,
                      targets=[PUBLIC, PRIVATE], now=0.0, started=0.0)
    session.tcp = FakeTcpPunch()
    session.channel.send('early words', 0.0)
    assert session.channel.retransmit(2.9) == []    # TCP has 3 s: nothing resent meanwhile
    assert session.tcp.early == ['early words']
    assert client.sent == []                        # and nothing over UDP
