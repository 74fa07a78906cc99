"""Tests for reliable.py: sequence numbers, cumulative ACKs, retransmission.

A fake transmit collects (seq, text) pairs and every call gets an explicit
``now``: no sockets, no sleeps.
"""

import heapq
import random

from reliable import MAX_TRIES, RTO_INITIAL, RTO_MAX, WINDOW, ReliableChannel


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


def make_channel():
    """A channel and its fake wire."""
    wire = Wire()
    return ReliableChannel(wire), wire


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
    assert sender.retransmit(0.1 + RTO_INITIAL - 0.001) == []
    assert wire.take() == []                   # the timers restarted at the hurry
    sender.retransmit(0.1 + RTO_INITIAL)
    assert wire.take() == [(1, 'b'), (2, 'c'), (3, 'd')]


def test_hurry_with_nothing_in_flight():
    """hurry() on an idle channel sends nothing."""
    sender, wire = make_channel()
    sender.hurry(1.0)
    assert wire.sent == []


def test_hurry_counts_as_tries():
    """Sends made by hurry() count toward stalled."""
    sender, _ = make_channel()
    sender.send('a', 0.0)
    sender.hurry(0.1)
    sender.hurry(0.2)
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

    def __init__(self, rng, loss=0.3, duplicate=0.05):
        self.rng = rng
        self.loss = loss
        self.duplicate = duplicate
        self.queue = []
        self.count = 0

    def post(self, now, *datagram):
        """Put a datagram on the network; it may be lost, late or doubled."""
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            if self.rng.random() < self.loss:
                continue
            self.count += 1
            arrival = now + self.rng.uniform(0.01, 0.2)
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
