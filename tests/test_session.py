"""One introduced peer: which path its messages take, before and after the punch."""

import p2pcommon as wire
import punch
from identity import SessionKey
from session import Session

SESSION = b's' * wire.TOKEN_SIZE
ROLE = 0                            # we asked for bob: the peer's role is 1
PUBLIC = ('198.51.100.2', 40000)
PRIVATE = ('198.18.1.7', 5000)      # bob's LAN address: on ours, it may be a stranger


class FakeClient:
    """What a Session needs of the client: a UDP socket that records what it sends."""

    punch_timeout = punch.PUNCH_TIMEOUT
    keepalive_interval = punch.KEEPALIVE_INTERVAL
    downloads = '.'

    def __init__(self):
        self.sent = []              # (message, endpoint)
        self.raw = []               # the datagrams themselves

    def send_udp(self, data, endpoint):
        """Record one datagram."""
        self.raw.append(data)
        self.sent.append((wire.decode(data), endpoint))

    def say(self, text):
        """Status lines are not what these tests look at."""


def bob():
    """The peer's side of the session's key."""
    return SessionKey(SESSION, 1 - ROLE)


def new_session(client):
    """A session with bob, not punching yet."""
    return Session(client, link=None, name='bob', token=SESSION, role=ROLE,
                   targets=[PUBLIC, PRIVATE], now=0.0, started=0.0)


def punching_session():
    """A session punching toward bob's public and private endpoints."""
    client = FakeClient()
    session = new_session(client)
    session.start_punch(0.0)
    return client, session


def test_a_line_typed_while_punching_goes_with_the_punches_to_the_public_endpoint_only():
    client, session = punching_session()
    assert {endpoint for message, endpoint in client.sent} == {PUBLIC, PRIVATE}
    client.sent.clear()
    session.channel.send('early words', 0.0)
    assert [(m.type, m.text, endpoint) for m, endpoint in client.sent] == \
        [(wire.DATA, 'early words', PUBLIC)]


def test_everything_a_session_sends_is_sealed_for_the_peer_and_hides_the_token():
    """Punches and the early line check with bob's key, and the token is in none of them."""
    client, session = punching_session()
    session.channel.send('early words', 0.0)
    peer = bob()
    assert [m.type for m, _ in client.sent] == [wire.PUNCH, wire.PUNCH, wire.DATA]
    assert all(peer.check(m) for m, _ in client.sent)
    assert all(SESSION not in data for data in client.raw)
    assert not any(session.key.check(m) for m, _ in client.sent)     # not as bob's own


def test_once_the_punch_locks_the_line_is_resent_on_the_proven_path():
    client, session = punching_session()
    session.channel.send('early words', 0.0)
    client.sent.clear()
    proof = wire.decode(bob().seal(wire.PUNCH_ACK))
    session.punch.receive(proof, PRIVATE)
    session.channel.hurry(0.1)              # what the client does on the lock
    assert [(m.type, m.text, endpoint) for m, endpoint in client.sent] == \
        [(wire.DATA, 'early words', PRIVATE)]


def test_nothing_but_chat_goes_out_before_the_path_is_proven():
    client, session = punching_session()
    client.sent.clear()
    session.send(wire.OFFER, transfer=1, size=5, sha256=bytes(32), name='a.txt')
    session.send(wire.KEEPALIVE)
    assert client.sent == []


class FakeLink:
    """The control connection to the server that introduced us; records what it sends."""

    def __init__(self):
        self.sent = []

    def send(self, type, **fields):
        """Record one message to the server."""
        self.sent.append((type, fields))


def test_relayed_messages_give_the_token_to_the_server_alone():
    """Over the relay the server sees its token; the message inside is sealed for bob."""
    client, link = FakeClient(), FakeLink()
    session = Session(client, link, name='bob', token=SESSION, role=ROLE,
                      targets=[PUBLIC], now=0.0, started=0.0)
    session.relayed = True
    session.send(wire.DATA, seq=0, oldest=0, text='via the server')
    (type, fields), = link.sent
    assert type == wire.RELAY and fields['session'] == SESSION
    inner = wire.decode(fields['message'])
    assert bob().check(inner) and inner.text == 'via the server'
    assert SESSION not in fields['message']
    assert client.sent == []


class FakeStream:
    """A punched TCP stream that records what is sent on it."""

    open = True

    def __init__(self):
        self.sent = []

    def send(self, data):
        """Record one message."""
        self.sent.append(wire.decode(data))


class FakeTcpPunch:
    """A TCP punch that has not locked yet."""

    locked = None

    def close(self):
        """Nothing to close."""


def test_while_tcp_is_punched_an_early_line_waits_for_the_lock_and_goes_once():
    """Nothing is resent or sent over UDP while TCP tries; on the lock the line goes, sealed."""
    client = FakeClient()
    session = new_session(client)
    session.tcp = FakeTcpPunch()
    session.channel.send('early words', 0.0)
    assert session.channel.retransmit(2.9) == []    # TCP has 3 s: nothing resent meanwhile
    assert client.sent == []                        # and nothing over UDP
    session.tcp.locked = FakeStream()
    session.channel.hurry(3.0)                      # what the client does on the lock
    sent = session.tcp.locked.sent
    assert [(m.type, m.text) for m in sent] == [(wire.DATA, 'early words')]
    assert bob().check(sent[0])
    assert client.sent == []
