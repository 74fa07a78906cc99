"""Inputs that bench/fuzz.py found to break the client, kept as tests (issue #10).

Each case is the shortest sequence the fuzzer's shrinker left, written out
by hand: peer messages sealed with the session's key, delivered as the
client delivers them, and the reply the client then sends sealed in turn
(which is where a field that no longer fits the wire used to raise).
``python bench/fuzz.py --client-units 20000 --seed N --datagrams 0 --frames 0
--no-peers`` (the fuzzer of commit 2980faa) found them, over 200 times per
run, in the code before the fix (f36b9d4); the seeds are in each test.
"""

import identity
import p2pcommon as wire
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
