"""Tests for reliable.py: sequence numbers, cumulative and selective ACKs,
retransmission, the RTT estimator and the congestion window.

A fake transmit collects (seq, text) pairs and every call gets an explicit
``now``: no sockets, no sleeps.
"""

import collections
import heapq
import random

import pytest

import p2pcommon as p2pwire
import reliable
from reliable import (BACKOFF, INITIAL_CWND, LAST_SEQ, LOSS_TOLERANCE, MAX_SEQ, MAX_TRIES,
                      NO_SACK, RTO_INITIAL, RTO_MAX, RTO_MIN, SACK_BITS, SACK_BYTES, WINDOW,
                      ReliableChannel)


class Wire:
    """A fake transmit: records every (seq, text) the channel puts on the wire."""

    def __init__(self):
        self.sent = []

    def __call__(self, seq, text):
        self.sent.append((seq, text))

    def take(self):
        """Return and forget what was sent so far."""
        sent, self.sent = self.sent, []
        return sent


def make_channel(**options):
    """A channel and its fake wire."""
    wire = Wire()
    return ReliableChannel(wire, **options), wire


def sack_of(ack, *seqs):
    """The SACK bitmap a receiver whose next expected seq is ack sends for seqs."""
    bits = bytearray(SACK_BYTES)
    for seq in seqs:
        i = seq - ack - 1
        bits[i // 8] |= 0x80 >> (i % 8)
    return bytes(bits)


# ---------------------------------------------------------------------------
# Receiving.


def test_in_order_delivery():
    """Messages sent in order are numbered 0, 1, 2... and delivered one by one."""
    sender, wire = make_channel()
    receiver, _ = make_channel()
    for text in ['a', 'b', 'c']:
        sender.send(text, now=0.0)
    assert wire.sent == [(0, 'a'), (1, 'b'), (2, 'c')]
    assert [receiver.receive(seq, text) for seq, text in wire.sent] == [
        (['a'], 1), (['b'], 2), (['c'], 3)]


def test_out_of_order_buffered_and_delivered_in_order():
    """Early messages wait until the gap is filled, then all come out in order."""
    receiver, _ = make_channel()
    assert receiver.receive(2, 'c') == ([], 0)
    assert receiver.receive(1, 'b') == ([], 0)
    assert receiver.receive(4, 'e') == ([], 0)
    assert receiver.receive(0, 'a') == (['a', 'b', 'c'], 3)
    assert receiver.receive(3, 'd') == (['d', 'e'], 5)


def test_duplicates_delivered_once():
    """A duplicate, old or still buffered, is not delivered again; the ACK repeats."""
    receiver, _ = make_channel()
    assert receiver.receive(0, 'a') == (['a'], 1)
    assert receiver.receive(0, 'a') == ([], 1)
    assert receiver.receive(2, 'c') == ([], 1)
    assert receiver.receive(2, 'c') == ([], 1)
    assert receiver.receive(1, 'b') == (['b', 'c'], 3)
    assert receiver.receive(1, 'b') == ([], 3)
    assert receiver.receive(2, 'c') == ([], 3)
    assert receiver.receive(0, 'a') == ([], 3)


def test_far_future_sequence_ignored():
    """A seq 4 windows or more ahead is dropped, not buffered without bound."""
    receiver, _ = make_channel()
    assert receiver.receive(4 * WINDOW, 'far') == ([], 0)
    assert receiver.receive(4 * WINDOW - 1, 'edge') == ([], 0)
    delivered = []
    for seq in range(4 * WINDOW - 1):
        delivered += receiver.receive(seq, str(seq))[0]
    assert delivered[-1] == 'edge'
    assert len(delivered) == 4 * WINDOW
    assert receiver.receive(4 * WINDOW + 1, 'x') == ([], 4 * WINDOW)


# ---------------------------------------------------------------------------
# Sending, acknowledging, retransmitting.


def test_cumulative_ack_removes_in_flight():
    """An ACK of n removes every message below n, and only those."""
    sender, wire = make_channel()
    for i in range(5):
        sender.send(f'm{i}', now=0.0)
    assert sender.unacknowledged == 5
    sender.acknowledge(3, now=0.1)
    assert sender.unacknowledged == 2
    assert list(sender.in_flight) == [3, 4]
    sender.acknowledge(1, now=0.2)             # a stale ACK arriving late changes nothing
    assert list(sender.in_flight) == [3, 4]
    sender.acknowledge(5, now=0.3)
    assert sender.unacknowledged == 0
    assert sender.retransmit(100.0) == []
    assert wire.sent == [(i, f'm{i}') for i in range(5)]   # nothing was resent


def test_acked_message_not_retransmitted():
    """Only what is still unacknowledged is retransmitted."""
    sender, wire = make_channel()
    sender.send('a', 0.0)
    sender.send('b', 0.0)
    wire.take()
    sender.acknowledge(1, 0.2)
    sender.retransmit(RTO_INITIAL)
    assert wire.take() == [(1, 'b')]


def test_retransmission_after_rto_with_doubling_backoff():
    """Resent after RTO_INITIAL, then the wait doubles each time, up to RTO_MAX."""
    sender, wire = make_channel()
    sender.send('a', now=0.0)
    assert wire.take() == [(0, 'a')]
    now, rto, gaps = 0.0, RTO_INITIAL, []
    for _ in range(MAX_TRIES - 1):
        due = now + rto
        assert sender.retransmit(due - 0.001) == []
        assert wire.take() == []                # not yet
        assert sender.retransmit(due) == []
        assert wire.take() == [(0, 'a')]        # exactly one resend, same seq
        gaps.append(due - now)
        now, rto = due, min(rto * 2, RTO_MAX)
    assert gaps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0][:MAX_TRIES - 1]


def test_gives_up_after_max_tries():
    """After MAX_TRIES sends, the next timeout returns the lost texts and forgets them."""
    sender, wire = make_channel()
    sender.send('a', 0.0)
    sender.send('b', 0.0)
    sender.send('c', 0.0)
    sender.acknowledge(1, 0.1)                 # 'a' got through
    lost, now = [], 0.0
    while not lost:
        now += 0.25
        lost = sender.retransmit(now)
        assert now < 60
    assert lost == ['b', 'c']
    assert sender.unacknowledged == 0
    sent = wire.take()
    assert sent.count((1, 'b')) == MAX_TRIES
    assert sent.count((2, 'c')) == MAX_TRIES
    assert sender.retransmit(now + 100) == []


def test_giving_up_frees_the_window():
    """Messages waiting beyond the window go out when the ones before are given up."""
    sender, wire = make_channel()
    for i in range(WINDOW + 1):
        sender.send(i, 0.0)
    assert len(wire.take()) == WINDOW
    now, lost = 0.0, []
    while not lost:
        now += 0.5
        lost = sender.retransmit(now)
    assert lost == list(range(WINDOW))
    assert wire.take()[-1] == (WINDOW, WINDOW)
    assert sender.unacknowledged == 1


def test_window_limits_in_flight():
    """At most WINDOW messages are in flight; the rest go out as ACKs arrive."""
    sender, wire = make_channel()
    for i in range(WINDOW + 10):
        sender.send(f'm{i}', now=0.0)
    assert wire.take() == [(i, f'm{i}') for i in range(WINDOW)]
    assert sender.unacknowledged == WINDOW
    sender.acknowledge(5, now=0.1)
    assert wire.take() == [(i, f'm{i}') for i in range(WINDOW, WINDOW + 5)]
    assert sender.unacknowledged == WINDOW
    sender.acknowledge(WINDOW, now=0.2)
    assert wire.take() == [(i, f'm{i}') for i in range(WINDOW + 5, WINDOW + 10)]
    assert sender.unacknowledged == 10
    sender.retransmit(0.2 + RTO_INITIAL)       # the window never lets out more than WINDOW
    assert len(wire.take()) == 10


def test_stalled_after_three_tries():
    """stalled turns true when the oldest message has gone out three times unanswered."""
    sender, wire = make_channel()
    assert not sender.stalled                  # nothing in flight
    sender.send('a', 0.0)
    assert not sender.stalled                  # 1 try
    sender.retransmit(0.5)
    assert not sender.stalled                  # 2 tries
    sender.send('b', 1.0)
    sender.retransmit(1.5)
    assert sender.stalled                      # 3 tries of 'a'
    sender.acknowledge(1, 1.6)
    assert not sender.stalled                  # 'b' went out only once
    sender.acknowledge(2, 1.7)
    assert not sender.stalled


def test_hurry_resends_everything_in_flight():
    """hurry() resends every unacknowledged message now, whatever its timer."""
    sender, wire = make_channel()
    for text in 'abcd':
        sender.send(text, 0.0)
    sender.acknowledge(1, 0.05)
    wire.take()
    sender.hurry(0.1)
    assert wire.take() == [(1, 'b'), (2, 'c'), (3, 'd')]
    assert sender.retransmit(0.1 + sender.rto - 0.001) == []
    assert wire.take() == []                   # the timers restarted at the hurry,
    sender.retransmit(0.1 + sender.rto)        # from the measured timeout
    assert wire.take() == [(1, 'b'), (2, 'c'), (3, 'd')]


def test_hurry_with_nothing_in_flight():
    """hurry() on an idle channel sends nothing."""
    sender, wire = make_channel()
    sender.hurry(1.0)
    assert wire.sent == []


def test_hurry_starts_the_tries_afresh():
    """A new path gets its own three tries before it counts as stalled."""
    sender, _ = make_channel()
    sender.send('a', 0.0)
    sender.retransmit(1.0)
    sender.retransmit(3.0)
    assert sender.stalled                      # the old path is dead
    sender.hurry(3.1)                          # a new one: one try so far
    assert not sender.stalled
    sender.retransmit(3.1 + sender.rto)
    sender.retransmit(3.1 + 3 * sender.rto)
    assert sender.stalled


def test_messages_after_a_loss_are_still_delivered():
    """Once a message is reported lost, later messages still get through."""
    sender, wire = make_channel()
    receiver, _ = make_channel()
    sender.send('lost', 0.0)
    now, lost = 0.0, []
    while not lost:                            # the path is dead: drop everything
        now += 0.5
        lost = sender.retransmit(now)
        wire.take()
    assert lost == ['lost']
    sender.send('after', now)                  # the path is back: deliver everything
    delivered = []
    for _ in range(200):
        for seq, text in wire.take():
            ready, ack = receiver.receive(seq, text, sender.oldest)
            delivered += ready
            sender.acknowledge(ack, now)
        now += 0.5
        sender.retransmit(now)
    assert delivered == ['after']


# ---------------------------------------------------------------------------
# A lossy, reordering, duplicating network.


class LossyNetwork:
    """Datagrams in transit: each lost with probability `loss`, delayed at random."""

    def __init__(self, rng, loss=0.3, duplicate=0.05, delay=(0.01, 0.2)):
        self.rng = rng
        self.loss = loss
        self.duplicate = duplicate
        self.delay = delay
        self.queue = []
        self.count = 0
        self.lost = collections.Counter()      # datagram kind -> how many were dropped

    def post(self, now, *datagram):
        """Put a datagram on the network; it may be lost, late or doubled."""
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < self.loss:
                self.lost[datagram[0]] += 1
                continue
            self.count += 1
            arrival = now + self.rng.uniform(*self.delay)
            heapq.heappush(self.queue, (arrival, self.count, datagram))

    def arrivals(self, now):
        """Yield every datagram due by now, in arrival order."""
        while self.queue and self.queue[0][0] <= now:
            yield heapq.heappop(self.queue)[2]


def test_lossy_channel_delivers_everything_once_in_order():
    """With 30% loss both ways, reordering and duplicates, 500 messages each way
    arrive exactly once and in order, and nothing is given up."""
    count = 500
    rng = random.Random(2024)
    net = LossyNetwork(rng)
    clock = {'now': 0.0}
    peers = {}
    for name, other in [('a', 'b'), ('b', 'a')]:
        peers[name] = ReliableChannel(
            lambda seq, text, other=other: net.post(clock['now'], 'data', other, seq, text))
    delivered = {'a': [], 'b': []}
    expected = {name: [f'{name}{i}' for i in range(count)] for name in peers}
    sent = 0
    while clock['now'] < 600:
        now = clock['now'] = round(clock['now'] + 0.01, 2)
        if sent < count:                       # the users type a little faster than the RTT
            for name in peers:
                peers[name].send(f'{name}{sent}', now)
            sent += 1
        for kind, to, seq, text in net.arrivals(now):
            if kind == 'data':
                ready, ack = peers[to].receive(seq, text)
                delivered[to] += ready
                net.post(now, 'ack', 'b' if to == 'a' else 'a', ack, None)
            else:
                peers[to].acknowledge(seq, now)
        for channel in peers.values():
            assert channel.retransmit(now) == []
        if (sent == count and all(c.unacknowledged == 0 for c in peers.values())
                and not net.queue):
            break
    assert delivered['b'] == expected['a']
    assert delivered['a'] == expected['b']
    assert all(not c.waiting and c.unacknowledged == 0 for c in peers.values())


# ---------------------------------------------------------------------------
# Selective acknowledgements: the receiver's bitmap.


def test_selective_empty():
    """With nothing beyond the next expected message, the bitmap is 32 zero bytes."""
    receiver, _ = make_channel()
    assert receiver.selective() == NO_SACK == bytes(64)
    assert SACK_BYTES * 8 == SACK_BITS == 512
    receiver.receive(0, 'a')
    receiver.receive(1, 'b')
    assert receiver.selective() == NO_SACK
    receiver.receive(0, 'a')                   # an old duplicate is not marked
    assert receiver.selective() == NO_SACK


def test_selective_bit_order():
    """Bit i (most significant first) of the bitmap stands for message expected + 1 + i."""
    receiver, _ = make_channel(window=512)
    receiver.receive(2, 'c')
    assert receiver.selective() == b'\x40' + bytes(SACK_BYTES - 1)
    receiver.receive(1, 'b')
    assert receiver.selective() == b'\xc0' + bytes(SACK_BYTES - 1)
    receiver.receive(8, 'i')
    receiver.receive(9, 'j')
    assert receiver.selective()[:2] == b'\xc1\x80'
    receiver.receive(512, 'last')              # i = 511: the very last bit
    assert receiver.selective()[-1] == 0x01
    receiver.receive(513, 'beyond')            # held, but beyond what the bitmap reaches
    assert receiver.selective() == sack_of(0, 1, 2, 8, 9, 512)
    assert len(receiver.selective()) == SACK_BYTES


def test_selective_moves_with_the_cumulative_ack():
    """As the hole fills, the bitmap is relative to the new next expected message."""
    receiver, _ = make_channel()
    for seq in (1, 2, 5):
        assert receiver.receive(seq, seq)[1] == 0
    assert receiver.selective() == sack_of(0, 1, 2, 5)
    assert receiver.receive(0, 0) == ([0, 1, 2], 3)
    assert receiver.selective() == sack_of(3, 5) == b'\x40' + bytes(SACK_BYTES - 1)
    assert receiver.receive(3, 3) == ([3], 4)
    assert receiver.selective() == b'\x80' + bytes(SACK_BYTES - 1)
    assert receiver.receive(4, 4) == ([4, 5], 6)
    assert receiver.selective() == NO_SACK


def test_selective_after_the_sender_gives_up():
    """When oldest moves past a hole, the bitmap is relative to oldest."""
    receiver, _ = make_channel()
    receiver.receive(2, 'c')
    receiver.receive(5, 'f')
    assert receiver.receive(7, 'h', oldest=4) == ([], 4)
    assert receiver.selective() == sack_of(4, 5, 7)
    assert receiver.receive(4, 'e', oldest=4) == (['e', 'f'], 6)


# ---------------------------------------------------------------------------
# Selective acknowledgements: the sender.


def test_sack_removes_marked_messages():
    """Messages the bitmap marks are done; only the holes are retransmitted."""
    sender, wire = make_channel()
    for i in range(10):
        sender.send(f'm{i}', 0.0)
    wire.take()
    sender.acknowledge(2, 0.1, sack_of(2, 4, 5, 9))
    assert list(sender.in_flight) == [2, 3, 6, 7, 8]
    assert sender.unacknowledged == 5
    assert wire.take() == []                   # too early for any retransmission
    assert sender.retransmit(RTO_INITIAL) == []
    assert wire.take() == [(s, f'm{s}') for s in (2, 3, 6, 7, 8)]
    sender.acknowledge(3, 0.6, sack_of(3, 6, 7, 8))
    assert list(sender.in_flight) == [3]
    sender.acknowledge(10, 0.7)
    assert sender.idle


def test_sack_default_is_no_sack():
    """acknowledge() without a bitmap is a cumulative ACK only."""
    sender, _ = make_channel()
    for i in range(4):
        sender.send(i, 0.0)
    sender.acknowledge(1, 0.1)
    sender.acknowledge(1, 0.1, NO_SACK)
    assert list(sender.in_flight) == [1, 2, 3]


def test_sack_for_unknown_messages_ignored():
    """Bits for messages never sent or already acknowledged change nothing."""
    sender, wire = make_channel()
    for i in range(3):
        sender.send(i, 0.0)
    sender.acknowledge(1, 0.1, sack_of(1, 50, 200, 256))
    assert list(sender.in_flight) == [1, 2]
    sender.acknowledge(0, 0.2, sack_of(0, 1))  # a stale ACK marking 1 as arrived: it is
    assert list(sender.in_flight) == [2]
    sender.acknowledge(2, 0.3, b'\xff' * SACK_BYTES)     # 2 itself is the hole
    assert list(sender.in_flight) == [2]
    sender.acknowledge(3, 0.3, b'\xff' * SACK_BYTES)
    assert sender.idle
    assert sender.next_seq == 3


def test_sack_reaches_512_messages():
    """The last bit of the bitmap reaches ack + 512, and no further: a file's whole window."""
    sender, wire = make_channel(window=600)
    for i in range(600):
        sender.send(i, 0.0)
    assert sender.unacknowledged == 600
    sender.acknowledge(0, 0.1, sack_of(0, 1, 512))
    assert 512 not in sender.in_flight and 1 not in sender.in_flight
    assert {0, 2, 511, 513} <= set(sender.in_flight)
    assert sender.unacknowledged == 598


def test_receiver_bitmap_drives_the_sender():
    """A receiver's (ack, selective()) leaves exactly the lost messages in flight."""
    sender, wire = make_channel()
    receiver, _ = make_channel()
    for i in range(20):
        sender.send(i, 0.0)
    lost = {3, 7, 8, 15}
    delivered = []
    for seq, payload in wire.take():
        if seq not in lost:
            delivered += receiver.receive(seq, payload)[0]
    assert delivered == [0, 1, 2]
    sender.acknowledge(receiver.expected, 0.1, receiver.selective())
    assert list(sender.in_flight) == sorted(lost)
    sender.retransmit(RTO_INITIAL)
    resent = wire.take()
    assert resent == [(s, s) for s in sorted(lost)]
    for seq, payload in resent:
        delivered += receiver.receive(seq, payload)[0]
    assert delivered == list(range(20))
    sender.acknowledge(receiver.expected, 0.6, receiver.selective())
    assert sender.idle


# ---------------------------------------------------------------------------
# Round trip time (RFC 6298) and Karn's rule.


def test_rtt_before_any_sample():
    """Before any measurement the timeout is RTO_INITIAL."""
    sender, _ = make_channel()
    assert sender.srtt is None
    assert sender.rttvar == 0.0
    assert sender.rto == RTO_INITIAL


def test_rtt_first_and_later_samples():
    """First sample R: SRTT = R, RTTVAR = R/2; then RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R|,
    SRTT = 7/8 SRTT + 1/8 R; RTO = SRTT + 4 RTTVAR."""
    sender, _ = make_channel()
    sender.send('a', 10.0)
    sender.acknowledge(1, 10.1)
    assert sender.srtt == pytest.approx(0.1)
    assert sender.rttvar == pytest.approx(0.05)
    assert sender.rto == pytest.approx(0.3)
    sender.send('b', 11.0)
    sender.acknowledge(2, 11.3)
    assert sender.rttvar == pytest.approx(0.75 * 0.05 + 0.25 * 0.2)
    assert sender.srtt == pytest.approx(0.875 * 0.1 + 0.125 * 0.3)
    assert sender.rto == pytest.approx(sender.srtt + 4 * sender.rttvar)
    assert sender.rto == pytest.approx(0.475)


def test_measured_rto_times_new_messages():
    """A message sent after a measurement is retransmitted after the measured RTO, doubling."""
    sender, wire = make_channel()
    sender.send('a', 0.0)
    sender.acknowledge(1, 0.1)
    rto = sender.rto
    assert rto == pytest.approx(0.3)
    sender.send('b', 5.0)
    wire.take()
    sender.retransmit(5.0 + rto - 0.001)
    assert wire.take() == []
    sender.retransmit(5.0 + rto)
    assert wire.take() == [(1, 'b')]
    sender.retransmit(5.0 + rto + 2 * rto - 0.001)
    assert wire.take() == []
    sender.retransmit(5.0 + rto + 2 * rto)
    assert wire.take() == [(1, 'b')]


def test_rto_clamped_to_rto_min():
    """However fast the path, the timeout is at least RTO_MIN."""
    sender, _ = make_channel()
    now = 0.0
    for i in range(20):
        sender.send(i, now)
        now += 0.001
        sender.acknowledge(i + 1, now)
    assert sender.srtt == pytest.approx(0.001)
    assert sender.rto == RTO_MIN


def test_rto_clamped_to_rto_max():
    """However slow the path, the timeout is at most RTO_MAX."""
    sender, _ = make_channel()
    sender.send('slow', 0.0)
    sender.acknowledge(1, 10.0)                # no retransmit() call: one try only
    assert sender.srtt == pytest.approx(10.0)
    assert sender.rto == RTO_MAX


def test_karn_no_sample_from_a_retransmitted_message():
    """An ACK for a message sent more than once gives no RTT sample."""
    sender, wire = make_channel()
    sender.send('a', 0.0)
    sender.retransmit(RTO_INITIAL)
    assert wire.take() == [(0, 'a'), (0, 'a')]
    sender.acknowledge(1, RTO_INITIAL + 0.05)
    assert sender.srtt is None
    assert sender.rto == RTO_INITIAL


def test_karn_hurried_message_gives_no_sample():
    """hurry() is a retransmission too."""
    sender, _ = make_channel()
    sender.send('a', 0.0)
    sender.hurry(0.01)
    sender.acknowledge(1, 0.02)
    assert sender.srtt is None


def test_karn_samples_only_the_fresh_messages_of_an_ack():
    """One ACK covering a resent and a fresh message samples the fresh one only."""
    sender, wire = make_channel()
    sender.send('x', 0.0)
    sender.acknowledge(1, 0.1)                 # SRTT 0.1, RTTVAR 0.05
    sender.send('a', 1.0)
    sender.retransmit(1.0 + sender.rto)        # 'a' resent
    sender.send('b', 1.5)
    sender.acknowledge(3, 1.6)                 # 'a' (ambiguous) and 'b' (0.1)
    assert sender.srtt == pytest.approx(0.1)
    assert sender.rttvar == pytest.approx(0.75 * 0.05)


def test_sack_gives_rtt_samples():
    """A message acknowledged by the bitmap is a sample like any other."""
    sender, _ = make_channel()
    sender.send('a', 0.0)
    sender.send('b', 0.0)
    sender.acknowledge(0, 0.2, sack_of(0, 1))
    assert sender.srtt == pytest.approx(0.2)
    assert list(sender.in_flight) == [0]


# ---------------------------------------------------------------------------
# Fast retransmit of the holes the bitmap shows.


def measured_channel(last=6):
    """A channel with SRTT 0.1 s, RTTVAR 0.05 s, and seqs 1 to last sent at t=1.0."""
    sender, wire = make_channel()
    sender.send('m0', 0.0)
    sender.acknowledge(1, 0.1)
    for i in range(1, last + 1):
        sender.send(f'm{i}', 1.0)
    wire.take()
    return sender, wire


def test_fast_retransmit_after_three_sacked():
    """A hole with three later messages SACKed is resent once srtt + 4 rttvar has passed
    since it was sent, before its timeout, and not again right away."""
    sender, wire = measured_channel()
    sack = sack_of(1, 2, 3, 4)
    sender.acknowledge(1, 1.1, sack)
    assert wire.take() == []                   # sent only 0.1 s ago: the ACK may be coming
    threshold = sender.srtt + 4 * sender.rttvar
    due = sender.in_flight[1].due
    assert 0.1 < threshold < due - 1.0
    sender.acknowledge(1, 1.0 + threshold - 0.01, sack)
    assert wire.take() == []
    now = 1.0 + threshold + 0.001
    sender.acknowledge(1, now, sack)
    assert wire.take() == [(1, 'm1')]          # not 5 and 6: nothing later was SACKed
    assert sender.in_flight[1].tries == 2
    sender.acknowledge(1, now + 0.01, sack)    # a duplicate ACK right after: not again
    assert wire.take() == []
    assert reliable.DUPLICATE_THRESHOLD == 3


def test_no_fast_retransmit_with_two_sacked():
    """Two later messages are not enough: the hole waits for its timeout."""
    sender, wire = measured_channel()
    sack = sack_of(1, 2, 3)
    sender.acknowledge(1, 1.1, sack)
    due = sender.in_flight[1].due
    sender.acknowledge(1, due - 0.001, sack)
    assert wire.take() == []
    sender.retransmit(due)
    assert (1, 'm1') in wire.take()


def test_fast_retransmit_then_no_rtt_sample():
    """The hole resent by fast retransmit gives no RTT sample when it is acknowledged."""
    sender, wire = measured_channel()
    sack = sack_of(1, 2, 3, 4)
    sender.acknowledge(1, 1.1, sack)
    now = 1.0 + sender.srtt + 4 * sender.rttvar + 0.001
    sender.acknowledge(1, now, sack)
    assert wire.take() == [(1, 'm1')]
    srtt, rttvar = sender.srtt, sender.rttvar
    sender.acknowledge(5, now + 0.05)          # only 1 is newly acknowledged
    assert (sender.srtt, sender.rttvar) == (srtt, rttvar)
    assert list(sender.in_flight) == [5, 6]


def test_fast_retransmit_only_holes_with_three_later_sacked():
    """Of holes 1 and 4-10 with 2, 3 and 11 SACKed, only 1 has three later messages in."""
    sender, wire = measured_channel(last=11)
    sack = sack_of(1, 2, 3, 11)
    sender.acknowledge(1, 1.1, sack)
    now = 1.0 + sender.srtt + 4 * sender.rttvar + 0.001
    assert now < sender.in_flight[1].due
    sender.acknowledge(1, now, sack)
    assert wire.take() == [(1, 'm1')]


# ---------------------------------------------------------------------------
# The congestion window.


def exchange(sender, wire, receiver, now, drop=()):
    """Deliver what the sender put on the wire (but the seqs in drop); ACK it at now.

    Returns (cwnd before the ACK, how many in-flight messages the ACK newly covers).
    """
    for seq, payload in wire.take():
        if seq not in drop:
            receiver.receive(seq, payload)
    ack, sack = receiver.expected, receiver.selective()
    bits = int.from_bytes(sack, 'big')
    newly = sum(1 for s in sender.in_flight
                if s < ack or (0 <= s - ack - 1 < SACK_BITS
                               and bits >> (SACK_BITS - 1 - (s - ack - 1)) & 1))
    before = sender.cwnd
    sender.acknowledge(ack, now, sack)
    return before, newly


def congested(window=128, messages=2000):
    """A sender with congestion control, with plenty waiting, and its receiver."""
    sender, wire = make_channel(window=window, congestion=True)
    receiver, _ = make_channel(window=window)
    for i in range(messages):
        sender.send(i, 0.0)
    return sender, wire, receiver


def test_congestion_off_window_is_fixed():
    """Without congestion control the window is always `window`, whatever happens."""
    sender, wire = make_channel(window=10)
    assert sender.cwnd == 10
    for i in range(20):
        sender.send(i, 0.0)
    assert len(wire.take()) == 10
    for now in (1.0, 2.0, 5.0, 10.0):
        sender.retransmit(now)
    assert sender.cwnd == 10
    sender.acknowledge(5, 10.1)
    assert sender.cwnd == 10


def test_initial_cwnd():
    """With congestion control, INITIAL_CWND messages go out at first."""
    sender, wire, _ = congested()
    assert sender.cwnd == INITIAL_CWND
    assert [s for s, _ in wire.sent] == list(range(INITIAL_CWND))


def test_slow_start_one_more_per_delivered_message():
    """Each acknowledged message adds one to the window: one ACK lets out two messages."""
    sender, wire, _ = congested()
    wire.take()
    sender.acknowledge(1, 0.1)
    assert sender.cwnd == INITIAL_CWND + 1
    assert [s for s, _ in wire.take()] == [INITIAL_CWND, INITIAL_CWND + 1]
    sender.acknowledge(3, 0.1)
    assert sender.cwnd == INITIAL_CWND + 3
    assert len(wire.take()) == 4


def test_slow_start_doubles_each_round_trip():
    """Acknowledging a whole window doubles it, up to the maximum window."""
    sender, wire, receiver = congested(window=64)
    now, sizes = 0.0, []
    while sender.cwnd < 64:
        in_flight = sender.unacknowledged
        assert in_flight == int(sender.cwnd)
        sizes.append(in_flight)
        now += 0.1
        exchange(sender, wire, receiver, now)
    assert sizes == [4, 8, 16, 32]
    assert sender.cwnd == 64
    now += 0.1
    exchange(sender, wire, receiver, now)
    assert sender.cwnd == 64                   # capped at the window
    assert sender.unacknowledged == 64


def test_congestion_avoidance_after_ssthresh():
    """At or above ssthresh, each delivered message adds 1/cwnd: about one per round trip."""
    sender, wire, _ = congested()
    sender.ssthresh = INITIAL_CWND
    expected = float(INITIAL_CWND)
    for i in range(40):
        sender.acknowledge(i + 1, 0.1 + i * 0.01)
        expected += 1 / expected
        assert sender.cwnd == pytest.approx(expected)
        assert sender.unacknowledged == int(sender.cwnd)
    assert 9.5 < sender.cwnd < 10              # cwnd² grows by about 2 a message: √(16 + 80)


def grown(window=128):
    """A congested sender after three clean round trips: cwnd 32, all sent at t=0.3."""
    sender, wire, receiver = congested(window=window)
    for now in (0.1, 0.2, 0.3):
        exchange(sender, wire, receiver, now)
    assert sender.cwnd == 32
    return sender, wire, receiver


def test_backoff_when_a_round_trip_loses_too_much():
    """A round trip that loses more than LOSS_TOLERANCE shrinks the window to BACKOFF of it."""
    sender, wire, receiver = grown()
    base = next(iter(sender.in_flight))
    drop = {base + i for i in range(32) if i % 4}          # 24 of 32 lost
    assert len(drop) > LOSS_TOLERANCE * 32
    exchange(sender, wire, receiver, 0.4, drop)
    assert sender.cwnd == 40                   # 8 delivered; the losses are not known yet
    due = sender.in_flight[base + 1].due
    sender.retransmit(due)
    assert sender.cwnd == 40                   # timed out, but ACKs came within the rto
    before, newly = exchange(sender, wire, receiver, due + 0.1)
    peak = min(before + newly, sender.max_window)
    assert sender.cwnd == sender.ssthresh == max(2, int(peak * BACKOFF))
    assert sender.cwnd < peak
    # And after the backoff, growth is linear: 1/cwnd per delivered message.
    cwnd = sender.cwnd
    exchange(sender, wire, receiver, due + 0.2)
    assert cwnd < sender.cwnd < cwnd + 2


def test_no_backoff_for_light_loss():
    """Losing a few percent is the weather, not congestion: the window keeps growing."""
    sender, wire, receiver = grown()
    base = next(iter(sender.in_flight))
    history = [sender.cwnd]
    exchange(sender, wire, receiver, 0.4, {base + 5})
    history.append(sender.cwnd)
    due = sender.in_flight[base + 5].due
    assert sender.retransmit(due) == []
    assert (base + 5, base + 5) in wire.sent
    for now in (due + 0.1, due + 0.2, due + 0.3):
        exchange(sender, wire, receiver, now)
        history.append(sender.cwnd)
    assert history == sorted(history)
    assert sender.cwnd == sender.max_window


def test_collapse_when_nothing_is_acknowledged_for_an_rto():
    """No ACK at all for a whole rto: cwnd 2, ssthresh BACKOFF of the old window."""
    sender, wire, receiver = congested()
    exchange(sender, wire, receiver, 0.1)
    exchange(sender, wire, receiver, 0.2)
    assert sender.cwnd == 16
    wire.take()
    rto = sender.rto
    sender.retransmit(0.2 + rto - 0.001)
    assert sender.cwnd == 16
    sender.retransmit(0.2 + rto + 0.001)
    assert sender.cwnd == 2
    assert sender.ssthresh == int(16 * BACKOFF)
    assert sender.unacknowledged == 16         # what is in flight stays in flight
    assert len(wire.take()) == 16              # and was resent
    sender.retransmit(0.2 + rto + 0.01)
    assert sender.ssthresh == int(16 * BACKOFF)   # not collapsed again at once
    assert sender.cwnd == 2
    # The first ACK after the collapse: 15 are still in flight, more than the window.
    sender.acknowledge(next(iter(sender.in_flight)) + 1, 0.2 + rto + 0.05)
    assert sender.cwnd <= 3
    assert wire.take() == []


def test_slow_start_after_a_collapse():
    """After a collapse the window climbs in slow start back to ssthresh (BACKOFF of the
    window before it), one more per delivered message."""
    sender, wire, receiver = congested()
    exchange(sender, wire, receiver, 0.1)
    exchange(sender, wire, receiver, 0.2)
    assert sender.cwnd == 16
    now = 0.2 + sender.rto + 0.001
    sender.retransmit(now)
    assert (sender.cwnd, sender.ssthresh) == (2, int(16 * BACKOFF))
    exchange(sender, wire, receiver, now + 0.1)    # the path is back: all 16 arrive
    assert sender.ssthresh == int(16 * BACKOFF)
    assert sender.ssthresh <= sender.cwnd < sender.ssthresh + 1


def test_collapse_repeats_while_the_path_stays_dead():
    """Each further rto without an ACK collapses again; ssthresh bottoms out at 2."""
    sender, wire, _ = congested()
    now = 0.0
    for _ in range(30):
        now += 0.25
        sender.retransmit(now)
    assert sender.cwnd == 2
    assert sender.ssthresh == 2


def test_no_collapse_before_an_rto_has_passed_at_a_late_clock():
    """A fresh channel at now=1000 keeps INITIAL_CWND until an rto passes without an ACK."""
    sender, wire = make_channel(congestion=True)
    for i in range(10):
        sender.send(i, 1000.0)
    sender.retransmit(1000.0)
    sender.retransmit(1000.0 + RTO_INITIAL / 2)
    assert sender.cwnd == INITIAL_CWND
    assert sender.ssthresh == WINDOW


def test_window_never_exceeded_with_congestion():
    """In flight never exceeds the maximum window, however many ACKs arrive."""
    sender, wire, receiver = congested(window=20)
    now = 0.0
    while not sender.idle:
        now += 0.1
        exchange(sender, wire, receiver, now)
        assert sender.unacknowledged <= 20
        assert sender.cwnd <= 20


# ---------------------------------------------------------------------------
# Bulk data with congestion control and SACK over a bad network.


def test_lossy_bulk_transfer_with_congestion_and_sack():
    """2000 messages over 10% loss both ways with reordering and duplicates arrive once and
    in order; retransmissions stay below twice the data losses."""
    count = 2000
    rng = random.Random(6298)
    net = LossyNetwork(rng, loss=0.1, duplicate=0.02, delay=(0.02, 0.1))
    clock = {'now': 0.0}
    transmissions = collections.Counter()

    def transmit(seq, payload):
        transmissions[seq] += 1
        net.post(clock['now'], 'data', seq, payload)

    sender = ReliableChannel(transmit, congestion=True)
    receiver = ReliableChannel(None)
    delivered, reordered, last_seq = [], 0, -1
    for i in range(count):
        sender.send(i, 0.0)
    while not sender.idle or net.queue:
        now = clock['now'] = round(clock['now'] + 0.005, 3)
        assert now < 300, 'the transfer never finished'
        for kind, seq, payload in net.arrivals(now):
            if kind == 'data':
                reordered += seq < last_seq
                last_seq = seq
                ready, ack = receiver.receive(seq, payload, sender.oldest)
                delivered += ready
                net.post(now, 'ack', ack, receiver.selective())
            else:
                sender.acknowledge(seq, now, payload)
        assert sender.retransmit(now) == []
        assert sender.cwnd <= sender.max_window
    assert delivered == list(range(count))
    assert set(transmissions) == set(range(count))
    retransmissions = sum(transmissions.values()) - count
    losses = net.lost['data']
    assert reordered > 50                      # the network did reorder
    assert losses > 100
    assert retransmissions < 2 * losses, (retransmissions, losses)
    print(f'{losses} data losses, {net.lost["ack"]} ACK losses, {reordered} reordered, '
          f'{retransmissions} retransmissions, {now:.1f} s')
    assert sender.srtt is not None and 0.02 < sender.srtt < 0.3
    assert RTO_MIN <= sender.rto <= RTO_MAX


# ---------------------------------------------------------------------------
# Over a stream (a punched TCP connection): TCP resends and paces.


def test_on_a_stream_nothing_times_out_and_the_whole_window_is_used():
    """TCP repairing a loss for seconds is not our loss: no resend, no backoff."""
    sender, wire = make_channel(window=64, congestion=True, over_stream=lambda: True,
                                stream_window=512)
    for i in range(600):
        sender.send(i, 0.0)
    assert len(wire.take()) == 512                  # not INITIAL_CWND: TCP paces
    assert sender.window == 512
    assert sender.retransmit(RTO_MAX * MAX_TRIES * 2) == []
    assert wire.take() == []
    sender.acknowledge(512, 30.0)
    assert [seq for seq, _ in wire.take()] == list(range(512, 600))


def test_when_the_stream_dies_what_it_did_not_deliver_is_resent_on_the_next_path():
    on_tcp = [True]
    sender, wire = make_channel(congestion=True, over_stream=lambda: on_tcp[0])
    for i in range(10):
        sender.send(i, 0.0)
    sender.acknowledge(4, 0.1)
    wire.take()
    on_tcp[0] = False                               # the connection closed: UDP now
    assert sender.retransmit(5.0) == []
    assert [seq for seq, _ in wire.take()] == list(range(4, 10))


# ---------------------------------------------------------------------------
# Boundaries: sequence numbers are 32 bits on the wire, and peers may lie.

BOUNDARY_SEQS = [0, 1, LAST_SEQ - 1, LAST_SEQ, MAX_SEQ]


def ack_datagram(receiver):
    """The ACK a receiver sends now, encoded as on the wire (raises if a field overflows)."""
    return p2pwire.encode(p2pwire.ACK, session=bytes(8), counter=1, seq=receiver.expected,
                          sack=receiver.selective(), mac=p2pwire.NO_MAC)


@pytest.mark.parametrize('seq', BOUNDARY_SEQS)
@pytest.mark.parametrize('oldest', BOUNDARY_SEQS)
def test_any_seq_and_oldest_leave_an_ack_that_fits_the_wire(seq, oldest):
    """Whatever seq and oldest a DATA or CHUNK says, the next ACK can be packed.

    seq = oldest = 0xFFFFFFFF used to make the next expected number 2**32,
    and packing the ACK ended the client with a traceback.
    """
    receiver, _ = make_channel()
    receiver.receive(seq, 'x', oldest)
    assert 0 <= receiver.expected <= MAX_SEQ
    assert p2pwire.decode(ack_datagram(receiver)).seq == receiver.expected


def test_seq_max_is_ignored_whole():
    """No real sender numbers a message 0xFFFFFFFF: neither it nor its oldest counts."""
    receiver, _ = make_channel()
    assert receiver.receive(MAX_SEQ, 'x', oldest=MAX_SEQ) == ([], 0)
    assert receiver.receive(MAX_SEQ, 'x', oldest=5) == ([], 0)
    assert receiver.early == {}


def test_last_seq_is_delivered_and_the_ack_says_max():
    """The last usable number arrives; the ACK after it is 0xFFFFFFFF, and the peer is done."""
    receiver, _ = make_channel()
    assert receiver.receive(LAST_SEQ, 'last', oldest=LAST_SEQ) == (['last'], MAX_SEQ)
    assert receiver.exhausted
    assert receiver.receive(MAX_SEQ, 'beyond', oldest=MAX_SEQ) == ([], MAX_SEQ)
    assert receiver.receive(0, 'wrapped', oldest=0) == ([], MAX_SEQ)


def test_one_below_last_seq():
    """max-1 of the usable numbers: delivered, and the channel can take one more."""
    receiver, _ = make_channel()
    assert receiver.receive(LAST_SEQ - 1, 'a', oldest=LAST_SEQ - 1) == (['a'], LAST_SEQ)
    assert not receiver.exhausted
    assert receiver.receive(LAST_SEQ, 'b', oldest=LAST_SEQ) == (['b'], MAX_SEQ)


def test_wrapped_seq_after_the_end_is_a_stray():
    """Numbers do not wrap: 0 and 1 near the end are old strays, not new messages."""
    receiver, _ = make_channel()
    receiver.receive(LAST_SEQ - 2, 'a', oldest=LAST_SEQ - 2)
    assert receiver.receive(0, 'wrapped', oldest=0) == ([], LAST_SEQ - 1)
    assert receiver.receive(1, 'wrapped', oldest=1) == ([], LAST_SEQ - 1)


def test_oldest_above_its_own_seq_is_ignored():
    """oldest never exceeds the seq of the message it rides on: a larger claim is a lie."""
    receiver, _ = make_channel()
    assert receiver.receive(3, 'd', oldest=MAX_SEQ) == ([], 0)
    assert receiver.receive(0, 'a', oldest=1) == (['a'], 1)
    assert 3 in receiver.early


def test_oldest_far_ahead_is_taken_when_the_message_is_there():
    """A sender that gave up on a long outage may be far ahead: we follow, or stall for good."""
    receiver, _ = make_channel()
    far = 100 * WINDOW
    assert receiver.receive(far, 'x', oldest=far) == (['x'], far + 1)


def test_oldest_zero_and_one():
    """oldest 0 changes nothing; oldest 1 skips message 0 when message 1 carries it."""
    receiver, _ = make_channel()
    assert receiver.receive(0, 'a', oldest=0) == (['a'], 1)
    other, _ = make_channel()
    assert other.receive(1, 'b', oldest=1) == (['b'], 2)


def sent_three():
    """A sender with messages 0, 1 and 2 in flight."""
    sender, wire = make_channel()
    for i in range(3):
        sender.send(f'm{i}', 0.0)
    wire.take()
    return sender, wire


@pytest.mark.parametrize('ack', [4, 5, LAST_SEQ, MAX_SEQ])
def test_ack_beyond_what_was_sent_is_ignored(ack):
    """An ACK for messages never sent marks nothing delivered, whatever its bitmap."""
    sender, wire = sent_three()
    sender.acknowledge(ack, 0.1, b'\xff' * SACK_BYTES)
    assert list(sender.in_flight) == [0, 1, 2]
    assert sender.srtt is None                  # no round trip learnt from a lie
    assert wire.take() == []


def test_ack_equal_to_next_seq_takes_everything():
    """ack = next_seq is the honest 'all arrived'."""
    sender, _ = sent_three()
    sender.acknowledge(3, 0.1, b'\xff' * SACK_BYTES)
    assert sender.idle


def test_sack_all_ones_marks_only_what_was_sent():
    """All 512 bits set after ack 0: messages 1 and 2 arrived; 0 is still the hole."""
    sender, wire = sent_three()
    sender.acknowledge(0, 0.1, b'\xff' * SACK_BYTES)
    assert list(sender.in_flight) == [0]
    assert sender.sacked.bit_count() == 2
    assert wire.take() == []                    # two later ones are not yet a loss


@pytest.mark.parametrize('ack', [0, 1, 2])
def test_ack_at_zero_and_one_with_any_bitmap(ack):
    """Small acks with full, empty and one-bit bitmaps never raise, and stay consistent."""
    for sack in (NO_SACK, b'\xff' * SACK_BYTES, b'\x80' + bytes(SACK_BYTES - 1),
                 bytes(SACK_BYTES - 1) + b'\x01'):
        sender, _ = sent_three()
        sender.acknowledge(ack, 0.1, sack)
        assert all(seq >= ack for seq in sender.in_flight)
        sender.acknowledge(3, 0.2)
        assert sender.idle


def test_a_stale_ack_after_a_newer_one():
    """An ACK older than the last one (reordered) changes nothing already settled."""
    sender, _ = sent_three()
    sender.acknowledge(2, 0.1)
    sender.acknowledge(0, 0.2)
    sender.acknowledge(1, 0.2, NO_SACK)
    assert list(sender.in_flight) == [2]


def test_sender_stops_at_the_last_seq():
    """The last usable number goes out; after it nothing does, and the channel says so."""
    sender, wire = make_channel()
    sender.next_seq = LAST_SEQ            # as if 4 billion messages had gone before
    sender.send('last', 0.0)
    sender.send('too many', 0.0)
    assert wire.take() == [(LAST_SEQ, 'last')]
    assert sender.exhausted
    assert list(sender.waiting) == ['too many']
    sender.acknowledge(MAX_SEQ, 0.1)       # honest now: LAST_SEQ was sent
    assert not sender.in_flight
    assert wire.take() == []


def test_not_exhausted_one_before_the_end():
    """With LAST_SEQ still unused, the channel is not exhausted."""
    sender, wire = make_channel()
    sender.next_seq = LAST_SEQ - 1
    sender.send('a', 0.0)
    assert wire.take() == [(LAST_SEQ - 1, 'a')]
    assert not sender.exhausted
