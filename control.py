"""The client's control connection to one rendezvous server (article point 2).

Registration, the server's view of our UDP mapping, and reconnecting when
the server goes away: direct chat does not need it meanwhile (point 7).
"""

import collections
import time

import identity
import p2pcommon as wire
import punch
import tcppunch

CONNECT_TIMEOUT = 5.0       # seconds to reach the rendezvous server
REGISTER_TIMEOUT = 20.0     # seconds for its answer: TCP on a lossy path backs off for long
RECONNECT_FIRST = 1.0       # seconds before the first reconnect; doubles each try
RECONNECT_MAX = 30.0
SILENT_AFTER = 3            # keepalive intervals without a word: the server is gone


class Fatal(Exception):
    """An error after which the client cannot go on; the text says why."""


class ServerLink:
    """Our control connection to one rendezvous server (article point 2).

    It frames messages both ways and keeps the server's view of our UDP
    mapping fresh.  When the server goes away, direct chat does not need
    it (point 7): the link reconnects with backoff and registers again.
    """

    def __init__(self, client, address):
        self.client = client
        self.address = address          # (host, port) as the user gave it
        self.sock = None
        self.stream = None              # the FramedStream, once in the loop
        self.reader = wire.FrameReader()
        self.token = None               # from REGISTERED: registered when set
        self.udp = self.probe = None    # the server's two UDP endpoints
        self.connects = collections.deque()   # names we sent CONNECT for, in order
        self.backoff = RECONNECT_FIRST
        self.retry_at = None            # when to reconnect, while lost
        self.next_refresh = 0.0
        self.last_heard = 0.0           # when the server last sent us anything

    def __str__(self):
        return wire.format_endpoint(self.address)

    def open(self):
        """Connect (blocking, with a timeout) and send REGISTER; raises OSError.

        The connection's local port may be shared (SO_REUSEPORT): TCP hole
        punching listens and connects from it too, so that the peer's
        packets match the mapping our NAT made for this connection.
        """
        self.sock = tcppunch.tcp_connect(self.address, CONNECT_TIMEOUT)
        server = wire.plain(self.sock.getpeername())
        self.udp, self.probe = server, (server[0], server[1] + 1)
        self.reader = wire.FrameReader()
        self.connects.clear()
        self.token = None
        route = wire.plain(self.sock.getsockname())[0]
        private = self.client.private_endpoints(self, route)
        proof = identity.name_proof(self.client.key, self.client.name, str(self))
        self.sock.sendall(wire.encode(wire.REGISTER, name=self.client.name, private=private,
                                      tcp_port=self.local[1], proof=proof))

    @property
    def local(self):
        """Our end of the control connection: (address, port)."""
        return wire.plain(self.sock.getsockname())

    def wait_registered(self):
        """Block until REGISTERED; raise Fatal, one line, on anything else that ends it.

        A server may be hostile or simply another program: a frame that
        breaks the wire format ends the registration with a line that says
        so, not with a traceback.
        """
        self.sock.settimeout(REGISTER_TIMEOUT)
        while self.token is None:
            try:
                data = self.sock.recv(65536)
            except OSError as error:
                data, why = b'', error.strerror or str(error)
            else:
                why = 'it closed the connection'
            if not data:
                raise Fatal(f'the rendezvous server at {self} did not register us: {why}')
            self.reader.feed(data)
            try:
                self.take_registration()
            except wire.ProtocolError as error:
                raise Fatal(f'the rendezvous server at {self} sent a bad message: '
                            f'{wire.safe(str(error))}') from None

    def take_registration(self):
        """Read the frames received so far, up to REGISTERED; raise Fatal on ERROR.

        The ERROR's text goes through wire.safe(): it is the server's, and
        may hold escape sequences that would clear or rewrite our screen.
        Frames after REGISTERED stay in the reader, for the loop.
        """
        for frame in self.reader.frames():
            message = wire.decode(frame)
            if message.type == wire.ERROR:
                raise Fatal(f'the rendezvous server at {self} refused to register us: '
                            f'{wire.safe(message.text)}')
            if message.type == wire.REGISTERED:
                self.token = message.token
                return

    def attach(self, selector):
        """Hand the connected socket to the client's loop."""
        self.stream = wire.FramedStream(self.sock, selector, self.message, self.lost,
                                        self.reader)
        self.last_heard = time.monotonic()

    def message(self, message):
        """A message from the server: the client acts on it."""
        self.last_heard = time.monotonic()
        if self.client.narrator:
            self.client.narrator.control('<', message.type, self, message.flags)
        self.client.handle_control(self, message)

    def send(self, type, **fields):
        """Queue a message to the server; it goes out as the socket takes it."""
        if self.stream is not None:
            if self.client.narrator:
                self.client.narrator.control('>', type, self)
            self.stream.send(wire.encode(type, **fields))

    def lost(self, why):
        """The server went away: say so once, and plan to reconnect."""
        self.client.say(f'lost the rendezvous server {self}: {why}; '
                        f'direct chat goes on, reconnecting')
        self.close()
        self.retry_at = time.monotonic() + self.backoff
        self.client.relay_lost(self)

    def close(self):
        """Close the connection (flushing nothing more)."""
        if self.stream is not None:
            self.stream.close()
        elif self.sock is not None:
            self.sock.close()
        self.sock = self.stream = None
        self.token = None

    def state(self, now):
        """Where we stand with this server, for /status."""
        if self.token is not None:
            return f'registered, last heard {now - self.last_heard:.0f} s ago'
        if self.retry_at is not None:
            return f'lost; trying again in {max(0.0, self.retry_at - now):.0f} s'
        return 'registering'

    def tick(self, now):
        """Reconnect when due; refresh the server's view of our mapping."""
        if self.sock is None and self.retry_at is not None and now >= self.retry_at:
            self.reconnect(now)
        if self.token is not None and now - self.last_heard > SILENT_AFTER * self.interval:
            self.lost(f'no answer for {SILENT_AFTER * self.interval:.0f} s')
        elif self.token is not None and now >= self.next_refresh:
            self.refresh_mapping(now)

    @property
    def interval(self):
        """Seconds between keepalives to the server: the client's, never off."""
        interval = self.client.keepalive_interval
        return interval if interval > 0 else punch.KEEPALIVE_INTERVAL

    def reconnect(self, now):
        """Try the server again; on failure wait twice as long (up to a limit)."""
        try:
            self.open()
        except OSError:
            self.close()
            self.backoff = min(self.backoff * 2, RECONNECT_MAX)
            self.retry_at = now + self.backoff
            return
        self.retry_at = None
        self.attach(self.client.selector)

    def registered(self, token, now):
        """REGISTERED after a reconnect: tell the server our mapping again."""
        self.token = token
        self.last_heard = now
        self.backoff = RECONNECT_FIRST
        self.client.say(f'registered as {self.client.name} with {self} again')
        self.refresh_mapping(now)

    def refresh_mapping(self, now):
        """Send MAPPING to both server ports, and ALIVE on TCP (points 3, 6, 9).

        Keeps our NAT's mappings toward the server alive, UDP and TCP (a
        home router may forget an idle TCP connection within minutes, and
        then nobody can reach us), and the server's record of our UDP
        mapping right, so that it introduces us with an endpoint that still
        works.  The server answers ALIVE: its silence tells us it is gone.
        """
        request = punch.mapping_request(self.token)
        self.client.send_udp(request, self.udp)
        self.client.send_udp(request, self.probe)
        self.send(wire.ALIVE)
        self.next_refresh = now + self.interval
