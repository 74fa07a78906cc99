"""Inputs that bench/fuzz.py found to break the client, kept as tests (issue #10).

Each case is the shortest sequence the fuzzer's shrinker left, written out
by hand: peer messages sealed with the session's key, delivered as the
client delivers them, and the reply the client then sends sealed in turn
(which is where a field that no longer fits the wire used to raise).
``python bench/fuzz.py --client-units 20000 --seed N --datagrams 0 --frames 0
--no-peers`` (the fuzzer of commit 2980faa) found them, over 200 times per
run, in the code before the fix (f36b9d4); the seeds are in each test.
Those after them came from ``--client-control`` (a hostile server, a
stranger on a punched TCP connection), each on the code before its fix.
"""

import collections
import io
import os
import selectors
import socket

import identity
import p2pclient
import p2pcommon as wire
from test_punch import frames_from, listening_punch
from reliable import MAX_SEQ, ReliableChannel
from transfer import Transfers

TOKEN = bytes(range(16))
PEER = identity.SessionKey(TOKEN, role=0)       # the fuzzer, as the peer
OURS = identity.SessionKey(TOKEN, role=1)
NOW = 1000.0


def from_peer(type, **fields):
    """A peer message as the client receives it: sealed, decoded, its MAC checked."""
    message = wire.decode(PEER.seal(type, **fields))
    assert OURS.check(message)
    return message


def test_data_oldest_max_then_seq_max():
    """Found with --seed 1: one DATA claims oldest 0xFFFFFFFF, the next has seq 0xFFFFFFFF.

    The next expected number became 2**32 and the ACK after it could not be
    encoded: over UDP the client ended with a traceback.
    """
    chat = ReliableChannel(lambda seq, text: None)
    for seq, oldest in [(2432925746, MAX_SEQ), (MAX_SEQ, 0)]:
        message = from_peer(wire.DATA, seq=seq, oldest=oldest, text='x')
        ready, ack = chat.receive(message.seq, message.text, message.oldest)
        OURS.seal(wire.ACK, seq=ack, sack=chat.selective())
    assert ack == 0


def test_data_seq_max_with_oldest_max_minus_one():
    """Found with --seed 4: seq 0xFFFFFFFF after an oldest of 0xFFFFFFFF, oldest one below."""
    chat = ReliableChannel(lambda seq, text: None)
    for seq, oldest in [(704089317, MAX_SEQ), (MAX_SEQ, MAX_SEQ - 1)]:
        message = from_peer(wire.DATA, seq=seq, oldest=oldest, text='a/b')
        ready, ack = chat.receive(message.seq, message.text, message.oldest)
        OURS.seal(wire.ACK, seq=ack, sack=chat.selective())
    assert ack <= MAX_SEQ


def test_chunk_seq_and_oldest_max_in_an_accepted_transfer(tmp_path):
    """Found with --seed 2: an accepted OFFER, then a CHUNK with seq = oldest = 0xFFFFFFFF.

    The receiver's next CHUNK_ACK (sent on the tick after the batch) had
    seq 2**32 and raised in the encoder.
    """
    sent = []

    def send(type, **fields):
        sent.append(wire.decode(OURS.seal(type, **fields)))

    transfers = Transfers('peer', send, lambda text: None, str(tmp_path))
    transfers.handle(from_peer(wire.OFFER, transfer=1, size=2 ** 64 - 1, sha256=b'\xff' * 32,
                               name='x'), NOW)
    transfers.answer(transfers.waiting_for_answer(), True, NOW)
    transfers.tick(NOW)
    transfers.handle(from_peer(wire.CHUNK, transfer=1, seq=MAX_SEQ, oldest=MAX_SEQ,
                               data=bytes(1152)), NOW)
    transfers.tick(NOW + 0.01)
    acks = [m for m in sent if m.type == wire.CHUNK_ACK]
    assert [m.seq for m in acks] == [0]


class ServerLinkStub:
    """A control connection that takes what the client sends, and a free port to punch from."""

    def __init__(self):
        self.connects = collections.deque()
        self.token = b'r' * wire.TOKEN_SIZE
        self.local = ('127.0.0.1', 0)

    def __str__(self):
        return 'the server'

    def send(self, type, **fields):
        """Encode and forget."""
        wire.encode(type, **fields)


def test_a_second_name_with_a_token_in_use_is_ignored(tmp_path):
    """Found by --client-control 2000 --seed 1 (a hostile server): two INTRODUCEs, one token.

    The second session took the first one's place under the same session
    id, and the first one's TCP punch (a listening socket) was left open
    and uncounted: a server that does this again and again takes every
    descriptor the client has.  Now the second introduction is ignored.
    """
    client = p2pclient.Client('alice', [('127.0.0.1', 9)], out=io.StringIO(),
                              downloads=str(tmp_path))
    client.links = [ServerLinkStub()]
    client.udp = wire.UDPSocket(0)          # UDP is punched beside TCP
    opened = len(os.listdir('/proc/self/fd'))
    for name in ['bob', 'carol']:
        client.handle_control(client.links[0], wire.decode(wire.reply(
            wire.INTRODUCE, name=name, session=TOKEN, role=1, public=('127.0.0.1', 9),
            port_delta=0, private=[], tcp_public=('127.0.0.1', 9), tcp_port=9)))
    assert [s.name for s in client.sessions.values()] == ['bob']
    assert 'introduced carol with the session of bob: ignored' in client.out.getvalue()
    for session in list(client.sessions.values()):
        client.end_session(session, 'the test ended')
    assert len(os.listdir('/proc/self/fd')) == opened
    client.selector.close()
    client.udp.close()


def test_a_second_challenge_on_a_stream_closes_it():
    """A stranger's CHALLENGE flood (the --client-control stranger sends floods of 50).

    Each CHALLENGE was answered with a sealed PUNCH, twice its size, queued
    until the stranger read it: one that sent 10 MB and never read left
    10.3 MB queued in our process, and more for as long as it went on (also
    after the punch locked, on a stream nobody closed).  The peer challenges
    once a stream, so a second CHALLENGE is not the peer: the stream closes.
    """
    selector = selectors.DefaultSelector()
    locked = []
    attempt, port = listening_punch(selector, identity.SessionKey(TOKEN, 1), locked)
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=5) as stranger:
            nonces = [bytes(16), b'\x01' * 16]
            stranger.sendall(b''.join(wire.encode(wire.CHALLENGE, nonce=n) for n in nonces * 50))
            heard = frames_from(stranger, selector)
        assert [m.type for m in heard] == [wire.CHALLENGE, wire.PUNCH]
        assert heard[1].nonce == nonces[0]
        assert attempt.streams == [] and not locked
    finally:
        attempt.close()
        selector.close()
