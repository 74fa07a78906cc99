"""A trace that narrates the article: ``p2pclient.py NAME -v``.

Read beside the article, the protocol is easiest to follow as it happens:
one line per packet in and out, each tagged with the article point it
illustrates, on standard error (the chat stays on standard output).  Each
line starts with the wall-clock time, so that the traces of two peers and
the server's ``-v`` log can be merged into one story in time order
(``make lab`` does, for one pair of NATs).

    21:04:05.123 alice > PUNCH to 198.51.100.2:40000 (pt 5: opens our NAT to them; ...)
    21:04:05.175 alice < PUNCH from 198.51.100.2:40000 (pt 5: through our NAT's new mapping)
    21:04:05.175 alice > PUNCH_ACK to 198.51.100.2:40000 (pt 8: a punch is bounced)
    21:04:05.175 alice = locked on 198.51.100.2:40000 (pt 5: the first proof wins)
"""

import datetime

import p2pcommon as wire

# What each message shows of the article, when it is not the first of its kind.
POINTS = {
    wire.REGISTER: 'pt 2: the control connection',
    wire.REGISTERED: 'pt 2',
    wire.MAPPING: 'pt 3: the server writes back the source it saw',
    wire.CONNECT: 'pt 4: asking for a connection',
    wire.ASK: 'pt 4: the mediator asks the target',
    wire.DECLINE: 'pt 4',
    wire.INTRODUCE: 'pt 4: both sides learn where to punch',
    wire.PUNCH: 'pt 5: punching',
    wire.PUNCH_ACK: 'pt 8: a punch is bounced',
    wire.KEEPALIVE: 'pt 9: keeps the mapping open',
    wire.DATA: 'pt 7: no server in between',
    wire.ACK: 'pt 7',
    wire.RELAY: 'pt 11: through the server',
    wire.ALIVE: 'pt 2: keeps the control connection open',
}


class Narrator:
    """Writes the story of one client's packets to ``out`` (standard error)."""

    def __init__(self, name, out):
        self.name = name
        self.out = out
        self.punched = set()        # endpoints we have sent a PUNCH to
        self.heard = set()          # endpoints a PUNCH came from

    def line(self, arrow, text):
        """One line: the time, who, which way (> out, < in, = a decision), what."""
        now = datetime.datetime.now().strftime('%H:%M:%S.%f')[:-3]
        self.out.write(f'{now} {self.name} {arrow} {text}\n')
        self.out.flush()

    def sent(self, data, endpoint):
        """A datagram we sent (UDP)."""
        message = wire.decode(data)
        why = POINTS.get(message.type, '')
        if message.type == wire.PUNCH and endpoint not in self.punched:
            self.punched.add(endpoint)
            why = 'pt 5: opens our NAT to them; their NAT may drop it'
        elif message.type == wire.DATA and endpoint not in self.heard:
            why = 'pt 5: early, with the punches, before any proof'
        self.line('>', f'{message.name_of_type} to {wire.format_endpoint(endpoint)} ({why})')

    def received(self, message, source):
        """A datagram that reached us (UDP), before we act on it."""
        why = POINTS.get(message.type, '')
        if message.flags & wire.FLAG_REPLY:
            why = 'pt 8: the reply to our punch: the path works both ways'
        if message.type == wire.PUNCH and source not in self.heard:
            self.heard.add(source)
            why = "pt 5: through our NAT's new mapping"
        self.line('<', f'{message.name_of_type} from {wire.format_endpoint(source)} ({why})')

    def control(self, arrow, type, server, flags=0):
        """A message on the control connection, to (>) or from (<) the server."""
        where = 'to' if arrow == '>' else 'from'
        why = POINTS.get(type, 'pt 2')
        if type in (wire.ASK, wire.DECLINE) and flags & wire.FLAG_REPLY:
            why = 'pt 8: the reply flag: an answer to our own request'
        self.line(arrow, f'{wire.TYPE_NAMES[type]} {where} the server {server} ({why})')

    def locked(self, endpoint, how):
        """The punch chose its path."""
        self.line('=', f'locked on {wire.format_endpoint(endpoint)} ({how})')


class NarrateMixIn:
    """The client's side: each datagram in and out, and the lock, told to the narrator.

    (Control messages are told by control.ServerLink.)
    """

    def send_udp(self, data, endpoint):
        """Tell the datagram, then send it."""
        if self.narrator:
            self.narrator.sent(data, endpoint)
        super().send_udp(data, endpoint)

    def datagram(self, message, source):
        """Tell the datagram, then act on it."""
        if self.narrator:
            self.narrator.received(message, source)
        super().datagram(message, source)

    def connected(self, session, now, how, where=''):
        """Tell the lock of a UDP punch (point 5)."""
        if self.narrator and session.endpoint is not None:
            self.narrator.locked(session.endpoint, 'pt 5: the first proof wins')
        super().connected(session, now, how, where)
