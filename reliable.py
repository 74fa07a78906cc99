"""Reliable, ordered delivery over UDP: chat messages and file chunks.

UDP may lose, duplicate and reorder datagrams, and a punched path may die
under a message.  The article suggests adding "some reliability on top of
UDP"; this is a small layer that gives it:

* every message carries a sequence number, and the receiver delivers them
  in order, each once;
* the receiver acknowledges cumulatively (the next number it expects) and
  selectively (a bitmap of what it holds beyond that), so the sender
  resends only the holes;
* the sender measures the round trip and retransmits after a timeout
  derived from it (RFC 6298), doubling the wait on each try;
* for bulk data (file transfer) a congestion window starts small, doubles
  each round trip while acknowledgements come back, and backs off when a
  round trip loses more than LOSS_TOLERANCE of what it sent, or loses
  everything.  Unlike TCP it does not take every lost packet as a sign of
  congestion: on a radio link or a lossy path, losing a few percent is
  the weather, and halving for each would leave the link idle.

A message still unanswered after MAX_TRIES is reported to the user as
lost, and every message tells the receiver the oldest number still on
offer, so it stops waiting for it.  The same layer runs whether the
datagrams go direct or through the relay, so a switch of path loses
nothing.

Over a punched TCP connection the layer only numbers and acknowledges:
TCP resends and paces by itself, and timers of ours on top of it would
fire whenever TCP repairs a loss, resend into the stream and shrink our
window for nothing.  If the connection dies, the messages it did not
deliver are resent on the next path.

Sequence numbers are 32 bits on the wire, and they do not wrap: the last
number a message may carry is LAST_SEQ, one below the largest, so that the
ACK after it (the next number expected) still fits.  A channel that has
used them all is ``exhausted``, and its session is over.  Wrapping would
need serial-number arithmetic (RFC 1982) in every comparison here, for a
session of 4 billion messages: at 10,000 a second, five days of them.
"""

import collections

import p2pcommon as wire

RTO_INITIAL = 0.5       # seconds before the first retransmission, before any RTT sample
RTO_MIN = 0.2           # a timeout never shorter than this, however fast the path
RTO_MAX = 4.0           # the wait doubles up to this
MAX_TRIES = 10          # about 30 s of trying before we report a loss
WINDOW = 64             # messages in flight before new ones wait
SACK_BYTES = wire.SACK_BYTES
SACK_BITS = SACK_BYTES * 8  # how far beyond the cumulative ACK the bitmap reaches
NO_SACK = bytes(SACK_BYTES)
INITIAL_CWND = 4        # congestion window at the start, in messages
DUPLICATE_THRESHOLD = 3  # this many later messages received: the hole is a loss
LOSS_TOLERANCE = 0.25   # a round trip losing more than this is congestion
BACKOFF = 0.7           # the window shrinks to this share on congestion
MAX_SEQ = 0xFFFFFFFF    # the largest number the 32-bit seq and ack fields hold
LAST_SEQ = MAX_SEQ - 1  # the last a message may carry: the ACK after it says MAX_SEQ


class Outgoing:
    """One message waiting for its acknowledgement."""

    def __init__(self, seq, payload):
        self.seq = seq
        self.payload = payload
        self.tries = 0
        self.resent = False         # sent more than once: its echo is ambiguous
        self.due = 0.0
        self.sent_at = 0.0
        self.rto = RTO_INITIAL


class ReliableChannel:
    """Sequence numbers, acknowledgements and retransmission, one direction each way.

    ``transmit(seq, payload)`` is called to put a message on the wire; the
    caller sends ACKs itself with what ``receive`` and ``selective`` return.
    With ``congestion`` on, at most a congestion window of messages is in
    flight (never more than ``window``); without it, always ``window``.
    ``over_stream()`` says whether the path is, right now, a TCP connection
    (or a TCP punch that will be one): then there are no timeouts and no
    congestion window, and up to ``stream_window`` messages (default:
    ``window``) may wait in TCP's buffers for their acknowledgement.
    """

    def __init__(self, transmit, window=WINDOW, congestion=False, over_stream=lambda: False,
                 stream_window=None):
        self.transmit = transmit
        self.over_stream = over_stream
        self.max_window = window
        self.stream_window = stream_window or window
        self.congestion = congestion
        self.cwnd = INITIAL_CWND if congestion else window
        self.ssthresh = window
        self.srtt = None                              # smoothed round trip, seconds
        self.rttvar = 0.0
        self.rto = RTO_INITIAL
        self.next_seq = 0
        self.in_flight = collections.OrderedDict()   # seq -> Outgoing
        self.waiting = collections.deque()            # payloads beyond the window
        self.expected = 0                             # next seq to deliver
        self.early = {}                               # seq -> payload, arrived out of order
        self.round_end = 0                            # first seq sent after this round trip
        self.round_delivered = 0
        self.round_lost = 0
        self.last_progress = 0.0                      # when something was last acknowledged
        self.sacked, self.sacked_ack = 0, 0           # the last SACK bitmap and its ack

    # -- sending -------------------------------------------------------------

    def send(self, payload, now):
        """Queue a message; it goes out now if the window has room."""
        if not self.in_flight:
            self.last_progress = now    # the silence before this was not a stall
        self.waiting.append(payload)
        self._fill_window(now)

    def acknowledge(self, ack, now, sack=NO_SACK):
        """Take an ACK: everything below ``ack`` has arrived, and what ``sack`` marks.

        Bit i of ``sack`` stands for message ack + 1 + i.  Only what we
        have sent can have arrived: an ACK beyond it is a lie (or a
        confused peer) and is ignored whole, and bits for messages never
        sent are dropped, so that nothing counts as delivered before it left.
        """
        if ack > self.next_seq:
            return
        while self.in_flight and next(iter(self.in_flight)) < ack:
            self._delivered(self.in_flight.popitem(last=False)[1], now)
        bits = self._sent_only(ack, sack)
        # Only the bits this ACK adds: the previous bitmap, moved to this ack
        # number, marks messages taken off in_flight already.
        moved = ack - self.sacked_ack
        seen = self.sacked << moved if 0 <= moved < SACK_BITS else 0
        self.sacked, self.sacked_ack = bits, ack
        marked = bits & ~seen
        while marked:
            lowest = marked & -marked
            marked ^= lowest
            out = self.in_flight.pop(ack + SACK_BITS - lowest.bit_length() + 1, None)
            if out:
                self._delivered(out, now)
        self._resend_holes(ack, bits, now)
        self._end_round(ack)
        self._fill_window(now)

    def _sent_only(self, ack, sack):
        """The bitmap as a number, its bits for messages never sent cleared.

        Bit SACK_BITS-1-i of the number stands for message ack+1+i; we have
        sent messages up to next_seq-1, so only the first next_seq-ack-1
        bits can be true.
        """
        sent = min(max(self.next_seq - ack - 1, 0), SACK_BITS)
        return int.from_bytes(sack, 'big') & (((1 << sent) - 1) << (SACK_BITS - sent))

    def _delivered(self, out, now):
        """One message has arrived: learn the round trip, open the window."""
        self.last_progress = now
        if not out.resent:              # Karn: a resent message's echo is ambiguous
            self._sample_rtt(now - out.sent_at)
        self._grow_window()

    def retransmit(self, now):
        """Resend what is overdue; return the payloads given up on.

        Nothing is overdue on a stream: what the connection took, it delivers.
        """
        if self.over_stream():
            return []
        lost = []
        for out in list(self.in_flight.values()):
            if now < out.due:
                continue
            if out.tries >= MAX_TRIES:
                del self.in_flight[out.seq]
                lost.append(out.payload)
            else:
                out.rto = min(out.rto * 2, RTO_MAX)
                self.round_lost += 1
                self._transmit(out, now)
        if self.congestion and self.in_flight and now - self.last_progress > self.rto:
            # Nothing at all came back for a whole timeout: the window was
            # far too big for the path.  Start again small.
            self.ssthresh = max(2, int(self.cwnd * BACKOFF))
            self.cwnd = 2
            self.last_progress = now
            self._start_round()         # those timeouts are paid for: count afresh
        if lost:
            self._fill_window(now)
        return lost

    def hurry(self, now):
        """Resend everything in flight now: the path under us has changed.

        The tries start again from one: what failed on the old path says
        nothing about the new one.
        """
        for out in self.in_flight.values():
            out.resent = True
            out.tries = 0
            out.rto = self.rto
            self._transmit(out, now)

    def take_unacknowledged(self):
        """Take back every message not yet acknowledged, in order; the channel forgets them.

        For a channel that ends (its session is over or replaced): those
        sent and those still waiting for room in the window.  A sent one
        may have arrived with only its ACK lost; the caller cannot know.
        """
        payloads = [out.payload for out in self.in_flight.values()] + list(self.waiting)
        self.in_flight.clear()
        self.waiting.clear()
        return payloads

    @property
    def oldest(self):
        """The lowest sequence number we still offer (sent with every message)."""
        return next(iter(self.in_flight), self.next_seq)

    @property
    def exhausted(self):
        """True when either side has used every sequence number: the session is over.

        We send nothing more (messages wait in vain), and the peer cannot.
        A session needs 4 billion messages for that.
        """
        return self.next_seq > LAST_SEQ or self.expected > LAST_SEQ

    @property
    def window(self):
        """How many messages may be in flight now."""
        if self.over_stream():
            return self.stream_window
        return min(int(self.cwnd), self.max_window)

    @property
    def unacknowledged(self):
        """How many sent messages still wait for an ACK."""
        return len(self.in_flight)

    @property
    def idle(self):
        """True when nothing waits to be sent or acknowledged."""
        return not self.in_flight and not self.waiting

    @property
    def stalled(self):
        """True when the oldest message has been sent three times unanswered.

        That is the sign that the path under us has died (a NAT forgot our
        mapping): time to punch again or to relay.
        """
        oldest = next(iter(self.in_flight.values()), None)
        return oldest is not None and oldest.tries >= 3

    # -- receiving -----------------------------------------------------------

    def receive(self, seq, payload, oldest=0):
        """Take a message; return (payloads now deliverable in order, ack number).

        ``oldest`` is the lowest sequence number the sender still offers:
        when it has given up on a message (and told its user), we stop
        waiting for it, or every later message would wait forever.

        A real sender's ``oldest`` is never above the message that carries
        it (that message is in flight, and oldest is the lowest in flight):
        a larger claim is a lie, and ignored.  It is not bounded by our own
        ``expected``: a sender that gave up on a long outage's worth of
        messages may rightly be far ahead of us, and refusing its claim
        would stop the channel for good.  A seq above LAST_SEQ no real
        sender has (see the module's docstring): ignored.
        """
        if seq > LAST_SEQ:
            return [], self.expected
        if self.expected < oldest <= seq:
            self.early = {s: p for s, p in self.early.items() if s >= oldest}
            self.expected = oldest
        if 0 <= seq - self.expected < 4 * self.max_window:     # else a stray or a lie
            self.early[seq] = payload
        ready = []
        while self.expected in self.early:
            ready.append(self.early.pop(self.expected))
            self.expected += 1
        return ready, self.expected

    def selective(self):
        """The SACK bitmap: which messages after the next expected one we hold."""
        bits = bytearray(SACK_BYTES)
        for seq in self.early:
            i = seq - self.expected - 1
            if 0 <= i < SACK_BITS:
                bits[i // 8] |= 0x80 >> (i % 8)
        return bytes(bits)

    # -- inside --------------------------------------------------------------

    def _fill_window(self, now):
        window = self.window
        while self.waiting and len(self.in_flight) < window and self.next_seq <= LAST_SEQ:
            out = Outgoing(self.next_seq, self.waiting.popleft())
            out.rto = self.rto
            self.next_seq += 1
            self.in_flight[out.seq] = out
            self._transmit(out, now)

    def _transmit(self, out, now):
        out.resent = out.resent or out.tries > 0
        out.tries += 1
        out.sent_at = now
        out.due = now + out.rto
        self.transmit(out.seq, out.payload)

    def _sample_rtt(self, rtt):
        """RFC 6298: smoothed round trip and its variation give the timeout."""
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(max(self.srtt + 4 * self.rttvar, RTO_MIN), RTO_MAX)

    def _grow_window(self):
        """Slow start doubles the window each round trip; then one more per round trip."""
        self.round_delivered += 1
        if not self.congestion:
            return
        if self.cwnd < self.ssthresh:
            self.cwnd += 1
        else:
            self.cwnd += 1 / self.cwnd
        self.cwnd = min(self.cwnd, self.max_window)

    def _end_round(self, ack):
        """Once a round trip: back off if it lost more than LOSS_TOLERANCE."""
        if ack < self.round_end:
            return
        sent = self.round_delivered + self.round_lost
        if self.congestion and sent and self.round_lost > LOSS_TOLERANCE * sent:
            self.ssthresh = max(2, int(self.cwnd * BACKOFF))
            self.cwnd = self.ssthresh
        self._start_round()

    def _start_round(self):
        self.round_delivered = self.round_lost = 0
        self.round_end = self.next_seq

    def _resend_holes(self, ack, bits, now):
        """Fast retransmit: a message with three later ones received is lost.

        So is a resent one whose later neighbours keep arriving more than a
        round trip after we resent it: the copy was lost too.
        """
        if bits.bit_count() < DUPLICATE_THRESHOLD:
            return
        highest = ack + SACK_BITS - (bits & -bits).bit_length() + 1   # the lowest set bit
        for out in self.in_flight.values():
            if out.seq >= highest:
                break
            later = bits & ((1 << (ack + SACK_BITS - out.seq)) - 1)   # indices above out's
            if later.bit_count() < DUPLICATE_THRESHOLD:
                continue
            if self.srtt is None or now - out.sent_at < self.srtt + 4 * self.rttvar:
                continue        # its acknowledgement may still be on the way
            self.round_lost += 1
            self._transmit(out, now)
