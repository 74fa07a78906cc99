"""One introduced peer, as the client sees it: how we reach it, what we send it.

A Session is made when the rendezvous server introduces a peer (article
point 4).  It holds the punch (UDP, point 5) and, raced beside it, the TCP
punch; the path they lock onto, or the relay (point 11); the keepalive
(point 9); and the reliable channel for chat (files add their own:
transfer.FilesMixIn).  Its ``send`` picks the path, so nothing above it
needs to know which one is in use.
"""

import time

import p2pcommon as wire
import punch
from identity import SessionKey
from reliable import ReliableChannel


class Session:
    """One introduced peer: the punch, then a direct path or the relay."""

    def __init__(self, client, link, name, token, role, targets, now, started):
        self.client = client
        self.link = link            # the server that introduced us: it relays
        self.name = name
        self.token = token          # the session's secret: never leaves the control connection
        self.key = SessionKey(token, role)
        self.targets = targets
        self.started = started
        self.relayed = False        # no direct path (yet): chat goes through the server
        self.announced = False      # '* connected to ...' said once already
        self.relay_gone = False     # the server said the peer's control connection closed
        self.doubted = None         # since then: when we began asking whether it is there
        self.tcp = None             # TCP hole punching, beside UDP's
        self.tcp_since = None       # when a TCP connection took the session over
        # Made now, so that a UDP proof from the peer is taken even with
        # --tcp-only; it sends nothing until start_punch.
        self.punch = punch.Punch(client.send_udp, self.key.seal, targets, now,
                                 client.punch_timeout)
        self.punch_running = False  # PUNCH datagrams go out: from start_punch to a lock or give-up
        self.keepalive = punch.Keepalive(client.keepalive_interval, now,
                                         lambda: self.send(wire.KEEPALIVE))
        self.channel = ReliableChannel(self.transmit_data, over_stream=self.over_stream)

    def start_punch(self, now):
        """Punch toward every candidate endpoint (point 5)."""
        previous = self.endpoint
        targets = self.targets + ([previous] if previous and previous not in self.targets else [])
        self.punch = punch.Punch(self.client.send_udp, self.key.seal, targets, now,
                                 self.client.punch_timeout)
        self.punch_running = True
        self.punch.tick(now)

    @property
    def endpoint(self):
        """The direct path the punch locked onto, or None."""
        return self.punch.locked if self.punch else None

    @property
    def on_tcp(self):
        """True while a punched TCP connection carries our messages."""
        return self.tcp is not None and self.tcp.locked is not None and self.tcp.locked.open

    def over_stream(self):
        """The reliable layer asks: does TCP resend and pace for us now?

        Also while TCP is being punched and no other path stands: a message
        that goes nowhere yet is sent on the lock (hurry), and resending it
        into no path would only count tries.
        """
        return self.on_tcp or (self.trying_tcp and not self.direct and not self.relayed)

    @property
    def trying_tcp(self):
        """True while TCP hole punching is under way."""
        return self.tcp is not None and self.tcp.locked is None

    @property
    def punching(self):
        """True while PUNCH datagrams are still going out (even while relayed)."""
        return self.punch_running and self.endpoint is None

    @property
    def direct(self):
        """True when a punched path, TCP or UDP, reaches the peer."""
        return self.on_tcp or self.endpoint is not None

    @property
    def path(self):
        """How messages to the peer travel now, in a few words for /status."""
        if self.on_tcp:
            peer = wire.plain(self.tcp.locked.sock.getpeername())
            return f'direct, tcp, at {wire.format_endpoint(peer)}'
        if self.endpoint is not None:
            return f'direct, udp, at {wire.format_endpoint(self.endpoint)}'
        if self.relayed:
            still = ' (still punching)' if self.punching or self.trying_tcp else ''
            return f'relayed through {self.link}{still}'
        if self.trying_tcp:
            return 'punching UDP and TCP' if self.punching else 'punching TCP'
        return 'punching'

    def stop_tcp(self):
        """Close the TCP attempt and its connections."""
        if self.tcp is not None:
            self.tcp.close()
            self.tcp = None

    def send(self, type, **fields):
        """Send a peer message along the current path: TCP, UDP or relayed."""
        data = self.key.seal(type, **fields)
        if self.on_tcp:
            self.tcp.locked.send(data)
        elif self.endpoint is not None:
            self.client.send_udp(data, self.endpoint)
            self.keepalive.sent(time.monotonic())
        elif self.relayed:
            self.link.send(wire.RELAY, session=self.token, message=data)
        elif self.punching and type == wire.DATA:
            # Early data: a chat line typed before the path is proven goes
            # out with the punches, to the public endpoint the server saw
            # (candidates() puts it first; never to a private candidate,
            # which may be a stranger on our own LAN).  If the peer's punch
            # has already opened its NAT, the line arrives a round trip
            # sooner; if not, the reliable layer resends it on the lock.
            self.client.send_udp(data, self.targets[0])

    def transmit_data(self, seq, text):
        """The reliable layer's way out: one DATA."""
        self.send(wire.DATA, seq=seq, oldest=self.channel.oldest, text=text)
