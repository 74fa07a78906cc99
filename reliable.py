"""Reliable, ordered delivery of chat messages over UDP.

UDP may lose, duplicate and reorder datagrams, and a punched path may die
under a message.  The article suggests adding "some reliability on top of
UDP"; this is the smallest layer that gives it: every DATA carries a
sequence number, the receiver answers with a cumulative ACK (the next
sequence number it expects), and the sender retransmits what is not
acknowledged, waiting longer after each try.  The same layer runs whether
the datagrams go direct or through the relay, so a switch of path loses
nothing.
"""

import collections

RTO_INITIAL = 0.5       # seconds before the first retransmission
RTO_MAX = 4.0           # the wait doubles up to this
MAX_TRIES = 10          # about 30 s of trying before we report a loss
WINDOW = 64             # messages in flight before new ones wait


class Outgoing:
    """One message waiting for its acknowledgement."""

    def __init__(self, seq, text):
        self.seq = seq
        self.text = text
        self.tries = 0
        self.due = 0.0
        self.rto = RTO_INITIAL


class ReliableChannel:
    """Sequence numbers, acknowledgements and retransmission for one peer.

    ``transmit(seq, text)`` is called to put a DATA on the wire; the caller
    sends ACKs itself with the number that ``receive`` returns.
    """

    def __init__(self, transmit):
        self.transmit = transmit
        self.next_seq = 0
        self.in_flight = collections.OrderedDict()   # seq -> Outgoing
        self.waiting = collections.deque()            # texts beyond the window
        self.expected = 0                             # next seq to deliver
        self.early = {}                               # seq -> text, arrived out of order

    def send(self, text, now):
        """Queue a message; it goes out now if the window has room."""
        self.waiting.append(text)
        self._fill_window(now)

    def receive(self, seq, text, oldest=0):
        """Take a DATA; return (texts now deliverable in order, ack number).

        ``oldest`` is the lowest sequence number the sender still offers:
        when it has given up on a message (and told its user), we stop
        waiting for it, or every later message would wait forever.
        """
        if oldest > self.expected:
            self.early = {s: t for s, t in self.early.items() if s >= oldest}
            self.expected = oldest
        if seq >= self.expected and seq - self.expected < 4 * WINDOW:
            self.early[seq] = text
        ready = []
        while self.expected in self.early:
            ready.append(self.early.pop(self.expected))
            self.expected += 1
        return ready, self.expected

    def acknowledge(self, ack, now):
        """Take a cumulative ACK: everything below ack has arrived."""
        for seq in [s for s in self.in_flight if s < ack]:
            del self.in_flight[seq]
        self._fill_window(now)

    def retransmit(self, now):
        """Resend what is overdue; return the texts given up on."""
        lost = []
        for out in list(self.in_flight.values()):
            if now < out.due:
                continue
            if out.tries >= MAX_TRIES:
                del self.in_flight[out.seq]
                lost.append(out.text)
            else:
                out.rto = min(out.rto * 2, RTO_MAX)
                self._transmit(out, now)
        if lost:
            self._fill_window(now)
        return lost

    def hurry(self, now):
        """Resend everything in flight now: the path under us has changed."""
        for out in self.in_flight.values():
            self._transmit(out, now)

    @property
    def oldest(self):
        """The lowest sequence number we still offer (sent with every DATA)."""
        return next(iter(self.in_flight), self.next_seq)

    @property
    def unacknowledged(self):
        """How many sent messages still wait for an ACK."""
        return len(self.in_flight)

    @property
    def stalled(self):
        """True when the oldest message has been sent three times unanswered.

        That is the sign that the path under us has died (a NAT forgot our
        mapping): time to punch again or to relay.
        """
        oldest = next(iter(self.in_flight.values()), None)
        return oldest is not None and oldest.tries >= 3

    def _fill_window(self, now):
        while self.waiting and len(self.in_flight) < WINDOW:
            out = Outgoing(self.next_seq, self.waiting.popleft())
            self.next_seq += 1
            self.in_flight[out.seq] = out
            self._transmit(out, now)

    def _transmit(self, out, now):
        out.tries += 1
        out.due = now + out.rto
        self.transmit(out.seq, out.text)
