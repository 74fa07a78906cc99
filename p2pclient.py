"""The interactive peer-to-peer client (the article's Listing 3).

    python p2pclient.py alice --server rendezvous.example.org

It registers a name with the rendezvous server over a TCP control
connection (article point 2), learns its public UDP endpoint (point 3),
and then, in one loop over stdin, the control socket and the UDP socket:

* ``/connect bob`` asks the server to introduce us (point 4);
* on INTRODUCE both peers punch (point 5) and lock onto the first endpoint
  that proves the peer, public or private (points 6 and 10);
* chat then goes straight to the peer (point 7), over a small reliable
  layer, with keepalives that hold the hole open (point 9);
* if punching fails, chat goes through the server's relay (point 11).
"""

import argparse
import os
import selectors
import socket
import sys
import time

import p2pcommon as wire
import punch
from reliable import ReliableChannel

CONNECT_TIMEOUT = 5.0       # seconds to reach the rendezvous server
MAX_LINE = 64 * 1024        # an endless stdin line is cut here
HELP = """commands:
  /connect PEER   ask the rendezvous server to introduce PEER, then punch
  /list           the names registered with the server
  /quit           say goodbye and exit (so does end of input)
  /help           this text
anything else is a chat message to the peer you connected to last"""


class Fatal(Exception):
    """An error after which the client cannot go on; the text says why."""


class Session:
    """One introduced peer: the punch, then a direct path or the relay."""

    def __init__(self, client, name, token, targets, now, started):
        self.client = client
        self.name = name
        self.token = token
        self.targets = targets
        self.started = started
        self.relayed = False        # punching failed: chat goes through the server
        self.punch = None
        self.keepalive = punch.Keepalive(client.keepalive_interval, now)
        self.channel = ReliableChannel(self.transmit_data)

    def start_punch(self, now):
        """Punch toward every candidate endpoint (point 5)."""
        previous = self.endpoint
        targets = self.targets + ([previous] if previous and previous not in self.targets else [])
        self.punch = punch.Punch(self.client.send_udp, self.token, targets, now,
                                 self.client.punch_timeout)
        self.punch.tick(now)

    @property
    def endpoint(self):
        """The direct path the punch locked onto, or None."""
        return self.punch.locked if self.punch else None

    @property
    def punching(self):
        """True while PUNCH datagrams are still going out."""
        return self.endpoint is None and not self.relayed

    def send(self, type, **fields):
        """Send a peer message along the current path: direct or relayed."""
        data = wire.encode(type, session=self.token, **fields)
        if self.endpoint is not None:
            self.client.send_udp(data, self.endpoint)
            self.keepalive.sent(time.monotonic())
        elif self.relayed:
            self.client.send_control(wire.RELAY, session=self.token, message=data)

    def transmit_data(self, seq, text):
        """The reliable layer's way out: one DATA."""
        self.send(wire.DATA, seq=seq, text=text)


class Client:
    """The peer: registration, the event loop and the user's commands."""

    def __init__(self, name, server, udp_port=0, keepalive=punch.KEEPALIVE_INTERVAL,
                 punch_timeout=punch.PUNCH_TIMEOUT, out=sys.stdout):
        self.name = name
        self.server = server
        self.udp_port = udp_port
        self.keepalive_interval = keepalive
        self.punch_timeout = punch_timeout
        self.out = out
        self.sessions = {}          # session token -> Session
        self.current = None         # the Session that chat lines go to
        self.asked = {}             # peer name -> when we sent CONNECT
        self.early_punches = []     # (message, source) before their INTRODUCE
        self.control = None
        self.reader = wire.FrameReader()
        self.output = bytearray()
        self.stdin = None
        self.selector = selectors.DefaultSelector()
        self.next_mapping = 0.0
        self.running = True

    # -- output -------------------------------------------------------------

    def say(self, text):
        """Print a status line; they all start with '* '."""
        self.out.write(f'* {text}\n')
        self.out.flush()

    def show_chat(self, name, text):
        """Print a peer's chat line, made safe for the terminal."""
        self.out.write(f'<{name}> {safe(text)}\n')
        self.out.flush()

    # -- start-up: register, then learn the mapping -------------------------

    def start(self):
        """Connect to the server, register, and learn our public endpoint."""
        host, port = self.server
        try:
            address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4]
            self.control = socket.create_connection(address[:2], timeout=CONNECT_TIMEOUT)
        except OSError as error:
            raise Fatal(f'cannot reach the rendezvous server at '
                        f'{wire.format_endpoint(self.server)}: '
                        f'{error.strerror or error}') from None
        family = self.control.family
        self.server_udp = address[:2]
        self.server_probe = (address[0], address[1] + 1)
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.udp.bind(('::' if family == socket.AF_INET6 else '0.0.0.0', self.udp_port))
        except OSError as error:
            raise Fatal(f'cannot use UDP port {self.udp_port}: {error.strerror}') from None
        private = (self.control.getsockname()[0], self.udp.getsockname()[1])
        self.control.sendall(wire.encode(wire.REGISTER, name=self.name, private=[private]))
        token = self.wait_registered()
        try:
            self.mapping = punch.discover_mapping(self.udp, self.server_udp,
                                                  self.server_probe, token)
        except TimeoutError as error:
            raise Fatal(f'{error}: UDP to the rendezvous server is blocked') from None
        self.token = token
        self.say(f'registered as {self.name} with {wire.format_endpoint(self.server)}; '
                 f'public endpoint {wire.format_endpoint(self.mapping.public)} '
                 f'({self.mapping.describe()})')
        self.control.setblocking(False)
        self.udp.setblocking(False)
        self.next_mapping = time.monotonic() + self.keepalive_interval

    def wait_registered(self):
        """Block until REGISTERED (return its token) or an ERROR (Fatal)."""
        while True:
            try:
                data = self.control.recv(65536)
            except OSError as error:
                data, why = b'', error.strerror
            else:
                why = 'it closed the connection'
            if not data:
                raise Fatal(f'the rendezvous server did not register us: {why}')
            self.reader.feed(data)
            for frame in self.reader.frames():
                message = wire.decode(frame)
                if message.type == wire.REGISTERED:
                    return message.token
                if message.type == wire.ERROR:
                    raise Fatal(message.text)

    # -- the loop -----------------------------------------------------------

    def run(self, stdin_fd=0):
        """Serve stdin, the control socket and the UDP socket until /quit."""
        self.stdin = LineReader(stdin_fd)
        self.selector.register(stdin_fd, selectors.EVENT_READ, self.read_stdin)
        self.selector.register(self.control, selectors.EVENT_READ, self.read_control)
        self.selector.register(self.udp, selectors.EVENT_READ, self.read_udp)
        while self.running:
            punching = any(s.punching for s in self.sessions.values())
            timeout = punch.PUNCH_INTERVAL / 2 if punching else 0.2
            for key, mask in self.selector.select(timeout):
                key.data(key.fileobj, mask)
            self.check_timers(time.monotonic())

    def check_timers(self, now):
        """Drive punches, retransmissions and keepalives."""
        for session in list(self.sessions.values()):
            self.check_session(session, now)
        if self.keepalive_interval > 0 and now >= self.next_mapping:
            # Keeps the server's view of our mapping fresh, so that it
            # introduces us with an endpoint that still works (point 9).
            self.send_udp(wire.encode(wire.MAPPING, token=self.token,
                                      public=self.mapping.public), self.server_udp)
            self.next_mapping = now + self.keepalive_interval

    def check_session(self, session, now):
        """One session's timers: punch, relay fallback, keepalive, loss."""
        if session.punching:
            session.punch.tick(now)
            if session.punch.expired(now):
                session.relayed = True
                self.say(f'connected to {session.name} (relayed through the rendezvous server)')
                session.channel.hurry(now)
        for text in session.channel.retransmit(now):
            self.say(f'not delivered to {session.name}: {safe(text)}')
        if session.endpoint is None:
            return
        if session.keepalive.due(now):
            session.send(wire.KEEPALIVE)
        if session.keepalive.dead(now) or session.channel.stalled:
            self.punch_again(session, now)

    def punch_again(self, session, now):
        """The direct path died: punch again, and ask the peer to, via the relay."""
        self.say(f'lost the direct path to {session.name}; punching again')
        session.start_punch(now)
        session.keepalive.heard(now)
        self.send_control(wire.RELAY, session=session.token,
                          message=wire.encode(wire.PUNCH, session=session.token))

    # -- stdin: commands and chat -------------------------------------------

    def read_stdin(self, fd, mask):
        """Act on each complete line the user typed; quit at end of input."""
        lines, ended = self.stdin.read()
        for line in lines:
            if self.running:
                self.command(line)
        if ended and self.running:
            self.quit()

    def command(self, line):
        """Act on one line: a /command, or chat to the current peer."""
        words = line.split()
        if not line.startswith('/'):
            self.chat(line)
        elif words[0] == '/connect' and len(words) == 2:
            self.connect(words[1])
        elif words[0] == '/list' and len(words) == 1:
            self.send_control(wire.LIST)
        elif words[0] == '/quit':
            self.quit()
        elif words[0] == '/help':
            self.out.write(HELP + '\n')
            self.out.flush()
        else:
            self.say(f'unknown command {safe(line)!r}; /help lists the commands')

    def connect(self, name):
        """Ask the server to introduce us to name (point 4)."""
        try:
            wire.check_name(name)
        except wire.ProtocolError as error:
            self.say(f'bad peer name: {error}')
            return
        self.asked[name] = time.monotonic()
        self.say(f'asking the rendezvous server to introduce {name}')
        self.send_control(wire.CONNECT, target=name)

    def chat(self, line):
        """Send a chat line to the current peer, in pieces that fit a datagram."""
        if not line:
            return
        if self.current is None:
            self.say('not connected: /connect PEER first')
            return
        now = time.monotonic()
        for piece in split_utf8(line, wire.MAX_TEXT):
            self.current.channel.send(piece, now)

    def quit(self):
        """Say BYE to every peer and to the server, then stop the loop."""
        for session in self.sessions.values():
            session.send(wire.BYE)
        self.send_control(wire.BYE, session=wire.NO_SESSION)
        self.flush_control()
        self.running = False

    # -- the control connection ---------------------------------------------

    def send_control(self, type, **fields):
        """Queue a message to the server on the control connection."""
        if self.control is None:
            return
        self.output += wire.encode(type, **fields)
        self.flush_control()

    def flush_control(self):
        """Write what the socket takes now; the loop writes the rest later."""
        if self.control is None:
            return
        try:
            sent = self.control.send(self.output)
            del self.output[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as error:
            self.lost_server(error.strerror)
            return
        if self.control in self.selector.get_map():
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.output else 0)
            self.selector.modify(self.control, events, self.read_control)

    def read_control(self, sock, mask):
        """Read from the server; handle each complete message."""
        if mask & selectors.EVENT_WRITE:
            self.flush_control()
        if not mask & selectors.EVENT_READ or self.control is None:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.lost_server(error.strerror)
            return
        if not data:
            self.lost_server('it closed the connection')
            return
        self.reader.feed(data)
        try:
            for frame in self.reader.frames():
                self.handle_control(wire.decode(frame))
        except wire.ProtocolError as error:
            self.lost_server(f'it sent a bad message ({error})')

    def lost_server(self, why):
        """The server is gone; direct chat goes on without it (point 7)."""
        self.say(f'lost the rendezvous server: {why}; direct chat goes on')
        self.selector.unregister(self.control)
        self.control.close()
        self.control = None

    def handle_control(self, message):
        """Act on one message from the server."""
        if message.type == wire.INTRODUCE:
            self.introduced(message)
        elif message.type == wire.RELAY:
            self.relayed(message)
        elif message.type == wire.PEERS:
            names = ', '.join(message.names) or 'nobody'
            self.say(f'peers: {names}')
        elif message.type == wire.ERROR:
            self.say(f'error from the rendezvous server: {safe(message.text)}')

    def introduced(self, message):
        """The server introduced a peer: start punching toward it (points 4, 5)."""
        now = time.monotonic()
        started = self.asked.pop(message.name, now)
        targets = punch.candidates(message)
        session = Session(self, message.name, message.session, targets, now, started)
        self.sessions[message.session] = session
        self.say(f'introduced to {message.name}; punching to '
                 f'{" ".join(map(wire.format_endpoint, targets))}')
        session.start_punch(now)
        early, self.early_punches = self.early_punches, []
        for early_message, source in early:
            self.peer_message(early_message, source)

    def relayed(self, message):
        """Peer traffic that came through the server's relay (point 11)."""
        try:
            inner = wire.decode(message.message)
        except wire.ProtocolError:
            return
        session = self.sessions.get(message.session)
        if session is None or inner.type not in wire.PEER_TYPES:
            return
        if inner.type == wire.PUNCH:
            # The peer lost its path to us and punches again: so must we.
            if not session.punching:
                self.say(f'{session.name} lost the direct path; punching again')
                session.start_punch(time.monotonic())
            return
        self.session_message(session, inner, source=None)

    # -- UDP: mapping refreshes and peer traffic -----------------------------

    def send_udp(self, data, endpoint):
        """Send one datagram; a failure here is a lost packet, nothing more."""
        try:
            self.udp.sendto(data, endpoint)
        except OSError:
            pass

    def read_udp(self, sock, mask):
        """Read every waiting datagram; ignore any that is not for us."""
        while True:
            try:
                data, source = sock.recvfrom(wire.MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue    # an ICMP error for something we sent earlier
            try:
                message = wire.decode(data)
            except wire.ProtocolError:
                continue    # not our protocol: garbage is dropped silently
            if message.type == wire.MAPPING:
                self.mapping_refreshed(message, source)
            elif message.type in wire.PEER_TYPES:
                self.peer_message(message, (source[0], source[1]))

    def mapping_refreshed(self, message, source):
        """A MAPPING reply to our refresh: note when our public endpoint moved."""
        if message.token != self.token or not wire.same_endpoint(source, self.server_udp):
            return
        if not wire.same_endpoint(message.public, self.mapping.public):
            self.mapping.public = message.public
            self.say(f'our public endpoint is now {wire.format_endpoint(message.public)}')

    def peer_message(self, message, source):
        """A datagram from a peer: accepted only with a session token we hold."""
        session = self.sessions.get(message.session)
        if session is None:
            if message.type == wire.PUNCH and len(self.early_punches) < 16:
                # The peer's INTRODUCE reached it before ours reached us:
                # keep its punch until ours arrives, then answer it.
                self.early_punches.append((message, source))
            return
        self.session_message(session, message, source)

    def session_message(self, session, message, source):
        """Act on a valid peer message; source is None when it was relayed."""
        now = time.monotonic()
        session.keepalive.heard(now)
        if source is not None and message.type != wire.BYE:
            self.punched(session, message, source, now)
        if message.type == wire.DATA:
            ready, ack = session.channel.receive(message.seq, message.text)
            session.send(wire.ACK, seq=ack)
            for text in ready:
                self.show_chat(session.name, text)
        elif message.type == wire.ACK:
            session.channel.acknowledge(message.seq, now)
        elif message.type == wire.BYE:
            self.say(f'{session.name} left')
            del self.sessions[session.token]
            if self.current is session:
                self.current = None

    def punched(self, session, message, source, now):
        """A datagram of this session straight from the peer: proof of a path.

        The punch bounces a PUNCH and locks onto the first proof (points 5,
        8); a proof that comes after we gave up and relayed opens the
        direct path all the same.
        """
        was_locked = session.endpoint is not None
        session.punch.receive(message, source)
        if was_locked:
            return
        session.relayed = False
        elapsed = (now - session.started) * 1000
        self.say(f'connected to {session.name} at {wire.format_endpoint(session.endpoint)} '
                 f'(direct, {elapsed:.0f} ms)')
        self.current = session
        session.channel.hurry(now)


class LineReader:
    """Whole lines from a non-blocking file descriptor (stdin)."""

    def __init__(self, fd):
        self.fd = fd
        self.partial = bytearray()
        os.set_blocking(fd, False)

    def read(self):
        """Return (complete lines, True at end of input).

        A line longer than MAX_LINE is cut there, so that endless input
        without a newline cannot fill our memory.
        """
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return [], False
        self.partial += data
        lines = []
        while b'\n' in self.partial or len(self.partial) >= MAX_LINE or \
                (not data and self.partial):
            end = self.partial.find(b'\n')
            end = min(MAX_LINE, len(self.partial)) if end < 0 else end
            lines.append(self.partial[:end].decode('utf-8', 'replace').rstrip('\r'))
            del self.partial[:end + 1]
        return lines, not data


class RawChat:
    """Plain lines over UDP, one datagram each: the article's netcat demo.

    ``nc -u -p 17000 PEER 17000`` at both ends; this speaks the same way,
    with no rendezvous and no header, so it can talk to a real netcat.
    """

    def __init__(self, peer, port, out=sys.stdout):
        self.peer = peer
        self.out = out
        self.udp = socket.socket(wire.family_of(peer[0]), socket.SOCK_DGRAM)
        self.udp.bind(('::' if self.udp.family == socket.AF_INET6 else '0.0.0.0', port))
        self.udp.setblocking(False)

    def run(self, stdin_fd=0):
        """Send each line typed; print each datagram from the peer."""
        stdin = LineReader(stdin_fd)
        selector = selectors.DefaultSelector()
        selector.register(stdin_fd, selectors.EVENT_READ)
        selector.register(self.udp, selectors.EVENT_READ)
        while True:
            for key, _ in selector.select():
                if key.fileobj is self.udp:
                    self.receive()
                    continue
                lines, ended = stdin.read()
                for line in lines:
                    self.send(line + '\n')
                if ended:
                    return

    def send(self, line):
        """One line, one datagram."""
        try:
            self.udp.sendto(line.encode('utf-8'), self.peer)
        except OSError:
            pass    # like netcat: a lost datagram is not an error

    def receive(self):
        """Print what the peer sent; datagrams from anyone else are ignored."""
        try:
            data, source = self.udp.recvfrom(65536)
        except OSError:
            return
        if wire.same_endpoint(source, self.peer):
            for line in data.decode('utf-8', 'replace').splitlines():
                self.out.write(safe(line) + '\n')
            self.out.flush()


def safe(text):
    """Text a peer sent, with control characters shown as escapes.

    Nothing a peer sends may move our cursor, clear our screen or start a
    line that looks like one of our own status lines.
    """
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def split_utf8(text, limit):
    """Cut text into pieces of at most limit bytes of UTF-8, on characters."""
    data = text.encode('utf-8')
    pieces = []
    while data:
        cut = min(limit, len(data))
        while cut < len(data) and (data[cut] & 0xC0) == 0x80:
            cut -= 1        # don't split inside a multi-byte character
        pieces.append(data[:cut].decode('utf-8'))
        data = data[cut:]
    return pieces


def parse_args(argv):
    """The command line."""
    parser = argparse.ArgumentParser(
        description='Chat peer to peer through NATs: a rendezvous server introduces '
                    'the peers, UDP hole punching connects them directly.')
    parser.add_argument('name', nargs='?',
                        help='your name: 1-32 bytes, printable, no spaces')
    parser.add_argument('--server', default=f'127.0.0.1:{wire.DEFAULT_PORT}',
                        metavar='HOST[:PORT]',
                        help=f'the rendezvous server (default: 127.0.0.1:{wire.DEFAULT_PORT})')
    parser.add_argument('--port', type=int, default=0, metavar='UDP_PORT',
                        help='local UDP port to punch from (default: any free port)')
    parser.add_argument('--connect', metavar='PEER', help='connect to PEER at once')
    parser.add_argument('--keepalive', type=float, default=punch.KEEPALIVE_INTERVAL,
                        metavar='SECONDS',
                        help=f'keepalive interval; 0 turns keepalives off '
                             f'(default: {punch.KEEPALIVE_INTERVAL:.0f})')
    parser.add_argument('--punch-timeout', type=float, default=punch.PUNCH_TIMEOUT,
                        metavar='SECONDS',
                        help=f'give up punching and relay after this long '
                             f'(default: {punch.PUNCH_TIMEOUT:.0f})')
    parser.add_argument('--raw', action='store_true',
                        help='plain-text UDP with --peer, as netcat does: no rendezvous, '
                             'no header, one datagram per line')
    parser.add_argument('--peer', metavar='IP:PORT', help='with --raw: the peer to talk to')
    args = parser.parse_args(argv)
    try:
        if args.raw:
            if not args.peer:
                parser.error('--raw needs --peer IP:PORT')
            args.peer = wire.parse_endpoint(args.peer)
            wire.family_of(args.peer[0])
        elif args.name is None:
            parser.error('a name is needed (or --raw --peer IP:PORT)')
        else:
            wire.check_name(args.name)
        args.server = wire.parse_endpoint(args.server)
    except (wire.ProtocolError, ValueError) as error:
        parser.error(str(error))
    return args


def main(argv=None):
    """Run the client; exit 0 on /quit or end of input, 1 on a fatal error."""
    args = parse_args(argv)
    if args.raw:
        return run_raw(args)
    client = Client(args.name, args.server, args.port, args.keepalive, args.punch_timeout)
    try:
        client.start()
        if args.connect:
            client.connect(args.connect)
        client.run()
    except Fatal as error:
        client.say(str(error))
        return 1
    except KeyboardInterrupt:
        client.quit()
    return 0


def run_raw(args):
    """The --raw mode: exit 0 at end of input, 1 if the port is not free."""
    try:
        chat = RawChat(args.peer, args.port)
    except OSError as error:
        print(f'* cannot use UDP port {args.port}: {error.strerror}')
        return 1
    try:
        chat.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == '__main__':
    sys.exit(main())
