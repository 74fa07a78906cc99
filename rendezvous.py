"""The rendezvous server, or mediator (the article's Listing 1).

It only introduces peers (article point 1).  Each peer keeps one TCP
control connection to it (point 2) and sends it UDP MAPPING requests, whose
source address is the peer's public endpoint, the mapping its NAT made
(point 3).  When one peer asks to CONNECT to another, the server asks the
target (ASK), and once the target connects back it sends both an INTRODUCE
with the other's public, predicted and private endpoints and a fresh
session token (points 4, 6 and 10); the peers then punch (point 5) and talk
directly, without the server (point 7).  Only when punching fails does the
server RELAY their traffic over the control connections (point 11).

One event loop serves every socket: the TCP listener, every control
connection, and two UDP sockets, on PORT and PORT + 1, so that a peer can
see whether its NAT maps both destinations to the same public port (point
6).  The loop uses the ``selectors`` module, which picks epoll or kqueue
where there is one: plain ``select()`` takes descriptors below 1,024
only (FD_SETSIZE), which would cap us at about a thousand peers.

``Rendezvous`` is the article's design and nothing more.  What a server
on the open internet needs beyond it comes in additions, one module each,
that override its hooks (listed in its docstring) and call ``super()``,
as socketserver's ThreadingMixIn does for TCPServer: ``Server``, at the
end, composes them, and ``--article`` runs ``Rendezvous`` alone.
"""

import argparse
import errno
import logging
import secrets
import selectors
import signal
import socket
import sys
import time

import identity
import p2pcommon as wire
from consent import ConsentMixIn
from fastpath import FastMappingMixIn
from limits import Limits, LimitsMixIn
from names import NameOwnersMixIn
from pktinfo import PktinfoMixIn

log = logging.getLogger('rendezvous')

MAX_REQUEST = 2048              # the largest control message a peer may send
UDP_BURST = 64                  # datagrams read per wake-up, before others get a turn
MAPPING_SIZE = wire.HEADER_SIZE + wire.TOKEN_SIZE + wire.Endpoint.SIZE   # request and reply
TYPE_OFFSET = 3                 # the header's type byte: magic (2), version (1), type


class Peer:
    """One control connection and, once registered, what we know of the peer (point 1)."""

    # A server keeps ten thousand of these: without a __dict__ each one is
    # about 300 bytes smaller.
    __slots__ = ('sock', 'address', 'reader', 'output', 'name', 'key', 'token', 'private',
                 'tcp_port', 'public', 'probed', 'sessions')

    def __init__(self, sock, address):
        self.sock = sock
        self.address = address          # of the TCP connection: its public end (point 10)
        self.reader = wire.FrameReader(MAX_REQUEST)
        self.output = bytearray()       # replies the socket did not take yet
        self.name = None
        self.key = None                 # the name as the registry compares it (name_key)
        self.token = None               # registration token: ties MAPPING to us
        self.private = []               # endpoints the peer reported (point 10)
        self.tcp_port = 0               # the local port of its end of this connection
        self.public = None              # seen on our main UDP port (point 3)
        self.probed = None              # seen on the probe port (point 6)
        self.sessions = {}              # session token -> Session, oldest first

    @property
    def port_delta(self):
        """How far the NAT moved our port between the two server ports (point 6).

        Zero for a cone NAT, which keeps one mapping for every destination;
        for a symmetric NAT that counts up, the step to predict the next.
        """
        if self.public is None or self.probed is None or self.public[0] != self.probed[0]:
            return 0
        delta = self.probed[1] - self.public[1]
        return delta if -32768 <= delta < 32768 else 0

    def __str__(self):
        return self.name or wire.format_endpoint(self.address)


class Session:
    """Two introduced peers and the token the server gave them (point 4).

    The peers' own messages name the session by an id derived from the
    token (identity.py); the id is kept here, so that checking a relayed
    message costs a comparison and not an HMAC.
    """

    def __init__(self, token, asker, answerer):
        self.token = token
        self.id = identity.session_id(token)
        self.peers = (asker, answerer)

    def other(self, peer):
        """The partner of one of the pair."""
        return self.peers[1] if self.peers[0] is peer else self.peers[0]


class Rendezvous:
    """The mediator: a registry of peers and one loop over all sockets.

    The hooks an addition overrides (each calls super() for the rest):
    ``check_timers`` (each turn of the loop), ``admit`` (a new connection),
    ``handle`` (each control message), ``forget`` (a closed connection),
    ``name_key`` and ``may_register`` (how names compare, who may take
    one), ``list_peers``, ``set_public`` (a peer's mapping is new),
    ``ask`` and ``pair`` (point 4), ``answer_mapping``, ``allow_mapping``,
    ``drop`` and ``send_datagram`` (UDP), ``send_encoded`` and
    ``send_error`` (TCP), ``may_relay`` and ``refuse_relay`` (point 11).
    """

    def __init__(self, binds=('::',), port=wire.DEFAULT_PORT, limits=None):
        # The additions' settings, one option each (limits.py): the
        # article's server reads none of them.
        self.limits = limits or Limits()
        self.selector = selectors.DefaultSelector()
        self.connections = {}           # socket -> Peer, registered or not
        self.peers = {}                 # name_key(name) -> Peer (registered)
        self.by_token = {}              # registration token -> Peer
        self.asks = {}                  # target -> the peers that asked it, waiting (point 4)
        self.asked = {}                 # asker -> the peers it asked
        self.sessions = {}              # session token -> Session
        self.port, self.probes = self._open_all(binds, port)

    def _open_all(self, binds, port):
        """On each address: TCP and UDP on port, UDP on port + 1 for probes (point 6).

        Port 0 means any free pair.  Returns the port and the set of probe
        sockets.
        """
        for _ in range(20 if port == 0 else 1):
            opened = []
            try:
                chosen = port
                for bind in binds:
                    family = wire.family_of(bind)
                    opened.append(self._open(family, socket.SOCK_STREAM, bind, chosen))
                    chosen = opened[-1].getsockname()[1]
                    opened.append(self._open(family, socket.SOCK_DGRAM, bind, chosen))
                    opened.append(self._open(family, socket.SOCK_DGRAM, bind, chosen + 1))
            except OSError as error:
                for sock in opened:
                    sock.close()
                if port or error.errno != errno.EADDRINUSE:
                    raise
                continue        # port + 1 was taken: try another pair
            for listener, udp, probe in zip(*[iter(opened)] * 3):
                listener.listen(128)
                self.selector.register(listener, selectors.EVENT_READ, self.accept)
                self.selector.register(udp, selectors.EVENT_READ, self.receive_datagrams)
                self.selector.register(probe, selectors.EVENT_READ, self.receive_datagrams)
            return chosen, set(opened[2::3])
        raise OSError(errno.EADDRINUSE, 'no free pair of ports')

    @staticmethod
    def _open(family, kind, bind, port):
        """One non-blocking socket of kind bound to (bind, port).

        SO_REUSEADDR on the TCP listener only: a restarted server may then
        listen again while its old connections are in TIME_WAIT.  On UDP
        it lets a second socket share the port: a server started later on
        PORT - 1, whose probe port is our PORT, would get our MAPPINGs.
        """
        sock = socket.socket(family, kind)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind == '::':
            # One socket for both: IPv4 peers appear as ::ffff:a.b.c.d.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bind, port))
        sock.setblocking(False)
        return sock

    def serve_forever(self):
        """Run the event loop until interrupted: the article's select() (selectors)."""
        while True:
            self.serve_once(timeout=1.0)

    def serve_once(self, timeout):
        """Wait for ready sockets, handle each, then the timers."""
        for key, mask in self.selector.select(timeout):
            if self.selector.get_map().get(key.fd) is key:     # not closed meanwhile
                key.data(key.fileobj, mask)
        self.check_timers(time.monotonic())

    def check_timers(self, now):
        """Hook: what runs out with time.  The article's server waits for nothing."""

    # -- 1. the registry ----------------------------------------------------

    def register(self, peer, message):
        """Give a name to a connection, with the private endpoints it reported (points 1, 10)."""
        if peer.name is not None:
            self.send_error(peer, wire.E_ALREADY_REGISTERED, f'already registered as {peer}',
                            'registered twice')
            return
        key = self.name_key(message.name)
        if not self.may_register(peer, message, key):
            return
        peer.name, peer.key = message.name, key
        peer.private, peer.tcp_port = message.private, message.tcp_port
        peer.token = secrets.token_bytes(wire.TOKEN_SIZE)
        self.peers[key] = peer
        self.by_token[peer.token] = peer
        log.info('%s registered from %s, private %s', peer, wire.format_endpoint(peer.address),
                 ' '.join(map(wire.format_endpoint, peer.private)) or 'none')
        self.send(peer, wire.REGISTERED, token=peer.token)

    def name_key(self, name):
        """Hook: the key under which a name is unique.  Here, the name as spelled."""
        return name

    def may_register(self, peer, message, key):
        """Hook: may the peer take this name?  Here, if no one holds it.

        Says why not to the peer.  (REGISTER's proof of the name's key, in
        the wire format, is for names.py: the article's server ignores it.)
        """
        if key in self.peers:
            self.send_error(peer, wire.E_NAME_TAKEN, f'name {message.name!r} is taken',
                            'name taken')
            return False
        return True

    def list_peers(self, peer):
        """Hook: send the names of the peers one can connect to (those with a mapping)."""
        listed = sorted(p.name for p in self.peers.values() if p.public)
        self.send(peer, wire.PEERS, names=listed[:wire.MAX_PEERS_LISTED])

    def find(self, name):
        """The registered peer of that name, or None."""
        return self.peers.get(self.name_key(name))

    # -- 2. the control connection ------------------------------------------

    def accept(self, listener, mask):
        """Take a new control connection (point 2)."""
        try:
            sock, address = listener.accept()
        except OSError:
            return
        peer = Peer(sock, wire.plain(address))
        if not self.admit(peer):
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # replies go out whole
        self.connections[sock] = peer
        self.selector.register(sock, selectors.EVENT_READ, Connection(self, peer).ready)
        log.debug('connection from %s', peer)

    def admit(self, peer):
        """Hook: may this new connection stay?  The article's server takes every one."""
        return True

    def handle(self, peer, message):
        """Hook: dispatch one control message from a peer."""
        log.debug('< %s from %s (tcp)', message.name_of_type, peer)
        if message.type == wire.RELAY:
            self.relay(peer, message)
        elif message.type == wire.REGISTER:
            self.register(peer, message)
        elif peer.name is None:
            self.send_error(peer, wire.E_NOT_REGISTERED, 'register first', 'not registered')
        elif message.type == wire.ALIVE:
            self.send(peer, wire.ALIVE)
        elif message.type == wire.LIST:
            self.list_peers(peer)
        elif message.type == wire.CONNECT:
            self.connect(peer, message.target)
        elif message.type == wire.BYE:
            self.close(peer)
        else:
            self.send_error(peer, wire.E_BAD_MESSAGE,
                            f'type: {message.name_of_type} is not a request to the server',
                            'not a request')

    def close(self, peer):
        """Close a connection and forget what it held: its name, its asks, its sessions."""
        if self.connections.get(peer.sock) is not peer:
            return      # closed already
        self.selector.unregister(peer.sock)
        del self.connections[peer.sock]
        peer.sock.close()
        self.forget(peer)

    def forget(self, peer):
        """Hook: a connection closed; free its name and its sessions at once."""
        for token, session in list(peer.sessions.items()):
            self.forget_session(token)
            # Tell the partner at once that the relay is gone.  An empty
            # message, not a BYE in the peer's name: the server cannot seal
            # a peer message (only the peers hold the MAC key), and the
            # direct path, if there is one, may well live on.
            self.send(session.other(peer), wire.RELAY, session=token, message=b'')
        for asker in list(self.asks.get(peer, ())):
            self.withdraw(asker, peer)
        for target in list(self.asked.get(peer, ())):
            self.withdraw(peer, target)
        if peer.key is not None and self.peers.get(peer.key) is peer:
            del self.peers[peer.key]
            del self.by_token[peer.token]
            log.info('%s disconnected', peer)

    # -- 3. the public mapping, over UDP ------------------------------------

    def receive_datagrams(self, sock, mask):
        """Answer the MAPPING requests waiting on a UDP socket (point 3).

        Reads up to UDP_BURST datagrams before returning to the loop: one
        wake-up per datagram would spend most of the time in select().
        """
        now = time.monotonic()
        for _ in range(UDP_BURST):
            try:
                data, source = sock.recvfrom(wire.MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:    # e.g. an ICMP error from an earlier send
                log.debug('udp: %s', error)
                continue
            self.answer_mapping(sock, data, source, now)

    def answer_mapping(self, sock, data, source, now, arrival=None):
        """Hook: the article's point 3: write back, in the payload, where the request came from.

        The datagram's source address and port are the mapping the peer's
        NAT made; the reply carries them, and we note them for the peer
        whose registration token the request carries.  A MAPPING request is
        all that comes to us over UDP: anything else is dropped by its size
        or type byte, before decoding.  ``arrival`` is where the request
        came to, when pktinfo.py knows it.
        """
        if len(data) != MAPPING_SIZE or data[TYPE_OFFSET] != wire.MAPPING:
            self.drop(source, 'not a mapping request')
            return
        try:
            request = wire.decode(data)
            if request.flags & wire.FLAG_REPLY:     # point 8: a reply is never answered
                raise wire.ProtocolError('flags: a reply sent to the server')
        except wire.ProtocolError as error:
            self.drop(source, 'malformed mapping request', error)
            return
        public = wire.plain(source)
        port = sock.getsockname()[1]
        log.debug('< MAPPING from %s (udp %d)', wire.format_endpoint(public), port)
        if not self.allow_mapping(public[0], now):
            return
        self.note_mapping(sock, request.token, public)
        log.debug('> MAPPING to %s (udp %d)', wire.format_endpoint(public), port)
        # The reply has the request's size exactly: no amplification.
        self.send_datagram(sock, wire.reply(wire.MAPPING, token=request.token, public=public),
                           source, arrival)

    def allow_mapping(self, host, now):
        """Hook: may a MAPPING from this (plain) address be answered?  Here, always."""
        return True

    def drop(self, source, why, error=None):
        """Hook: a datagram is dropped, for a short fixed reason (and the decoder's error)."""
        log.debug('< bad datagram from %s: %s', wire.format_endpoint(source), error or why)

    def note_mapping(self, sock, token, public):
        """Remember what a registered peer's NAT showed us, by the port it came to (3, 6)."""
        peer = self.by_token.get(token)
        if peer is None:
            return
        if sock in self.probes:
            peer.probed = public        # a second destination: symmetric? (point 6)
        elif peer.public != public:
            self.set_public(peer, public)

    def set_public(self, peer, public):
        """Hook: a peer's public endpoint is new, or its NAT moved it."""
        log.info('%s has public endpoint %s', peer, wire.format_endpoint(public))
        peer.public = public

    def send_datagram(self, sock, data, destination, arrival=None):
        """Hook: send one datagram; a failure is a lost packet, nothing more."""
        try:
            sock.sendto(data, destination)
        except OSError as error:
            log.debug('udp send to %s: %s', wire.format_endpoint(destination), error)

    # -- 4. a connection requested: the target asked, both introduced -------

    def connect(self, peer, target_name):
        """Ask the target for consent, or, if it asked first, introduce the pair (point 4).

        Nothing about the asker but its name goes to the target before the
        target agrees: not even its addresses.
        """
        target = self.find(target_name)
        if target is None or target.public is None:
            self.send_error(peer, wire.E_UNKNOWN_PEER, f'no peer named {target_name!r}',
                            'unknown peer')
        elif target is peer:
            self.send_error(peer, wire.E_UNKNOWN_PEER, 'cannot connect to yourself',
                            'connect to oneself')
        elif peer.public is None:
            self.send_error(peer, wire.E_NOT_REGISTERED,
                            'your public endpoint is not known yet: send MAPPING first',
                            'no mapping yet')
        elif self.withdraw(target, peer):
            self.pair(target, peer)         # the target asked first: this is consent
        elif any(session.other(peer) is target for session in peer.sessions.values()):
            self.pair(peer, target)         # consent given already: punch again
        elif peer in self.asks.get(target, ()):
            self.send(peer, wire.ASK, name=target.name)     # asked already: it may answer still
        else:
            self.ask(peer, target)

    def ask(self, peer, target):
        """Hook: "the mediator asks the target to send a request" (point 4)."""
        self.asks.setdefault(target, set()).add(peer)
        self.asked.setdefault(peer, set()).add(target)
        # A request of ours, so without the reply flag (point 8).  The
        # asker's answer, with it, says that the target was asked.
        self.send(target, wire.ASK, request=True, name=peer.name)
        self.send(peer, wire.ASK, name=target.name)
        log.info('%s asks to connect to %s', peer, target)

    def withdraw(self, asker, target):
        """Forget that asker waits for target's answer; True if it was waiting."""
        if asker not in self.asks.get(target, ()):
            return False
        for index, key, value in ((self.asks, target, asker), (self.asked, asker, target)):
            index[key].discard(value)
            if not index[key]:
                del index[key]
        return True

    def pair(self, peer, target):
        """Hook: introduce two peers to each other with a fresh session token.

        peer asked first: its role is 0, the target's 1.  A pair has one
        session: a new introduction replaces the old one.
        """
        for old, session in list(peer.sessions.items()):
            if session.other(peer) is target:
                self.forget_session(old)
        token = secrets.token_bytes(wire.TOKEN_SIZE)
        session = self.sessions[token] = Session(token, peer, target)
        peer.sessions[token] = target.sessions[token] = session
        # Both at once: each side must punch toward the other (point 5).
        self.introduce(target, peer, token, role=1)
        self.introduce(peer, target, token, role=0)
        log.info('introduced %s (%s) and %s (%s)', peer, wire.format_endpoint(peer.public),
                 target, wire.format_endpoint(target.public))

    def forget_session(self, token):
        """The pair of this session may no longer relay through us."""
        session = self.sessions.pop(token, None)
        for peer in session.peers if session else ():
            peer.sessions.pop(token, None)

    # -- 6, 10. what an introduction tells: predicted ports, private ends ---

    def introduce(self, peer, other, token, role):
        """Tell peer how to reach other: public, predicted and private (points 4, 6, 10).

        The private endpoints are the peer's own report (point 10), and
        the control connection's two ends are where TCP punching aims.
        ``role`` is 0 for the peer that asked first, 1 for the one that
        answered: each seals its messages as its role (identity.py).
        """
        self.send(peer, wire.INTRODUCE, name=other.name, session=token, role=role,
                  public=other.public, port_delta=other.port_delta, private=other.private,
                  tcp_public=other.address, tcp_port=other.tcp_port)

    # -- 8. the header's flags: our answers are replies ---------------------

    def send(self, peer, type, request=False, **fields):
        """Queue a reply for a peer, or with request a request of ours (point 8)."""
        if peer.sock.fileno() < 0:
            return      # it left while we were working on its request
        log.debug('> %s to %s (tcp)', wire.TYPE_NAMES[type], peer)
        data = wire.encode(type, **fields) if request else wire.reply(type, **fields)
        self.send_encoded(peer, data)

    def send_encoded(self, peer, data):
        """Hook: write an encoded message to a peer, or queue what the socket does not take."""
        if peer.sock.fileno() < 0:
            return
        if peer.output:
            peer.output += data         # the loop is already waiting to write
            return
        # Nothing queued: write at once.  Waiting for the loop to say the
        # socket is writable (it nearly always is) costs two epoll_ctl calls
        # and a loop turn per reply.
        try:
            sent = peer.sock.send(data)
        except OSError:
            sent = 0            # full, or broken: Connection.write meets the error and closes
        if sent < len(data):
            peer.output += data[sent:]
            self.selector.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 self.selector.get_key(peer.sock).data)

    def send_error(self, peer, code, text, why):
        """Hook: tell a peer what was wrong with its request; why is a short fixed reason.

        The wire counts bytes: an error that quotes a peer's bad name can
        be over MAX_TEXT bytes of UTF-8, and is cut, never inside a character.
        """
        log.debug('error to %s: %s', peer, text)
        text = text.encode('utf-8')[:wire.MAX_TEXT].decode('utf-8', 'ignore')
        self.send(peer, wire.ERROR, code=code, text=text)

    # -- 11. the relay, when punching fails ----------------------------------

    def relay(self, peer, message):
        """Hook: forward peer traffic within an introduced pair, and only that (point 11)."""
        session = self.sessions.get(message.session)
        if session is None or peer not in session.peers:
            self.send_error(peer, wire.E_NOT_INTRODUCED, 'relay: not a session of yours',
                            'relay outside a session')
            return
        try:
            inner = wire.decode(message.message)
        except wire.ProtocolError as error:
            self.send_error(peer, wire.E_BAD_MESSAGE, f'relay: {error}', 'bad relayed message')
            return
        # Only the pair's own messages, sealed for this session: the relay
        # is no way to send the partner control messages in our name, nor
        # another session's traffic.  (The MAC is the peers' to check.)
        if inner.type not in wire.PEER_TYPES or inner.session != session.id:
            self.send_error(peer, wire.E_BAD_MESSAGE, 'relay: carries only peer traffic',
                            'relay of other traffic')
            return
        other = session.other(peer)
        log.debug('relaying %s from %s to %s', inner.name_of_type, peer, other)
        self.send(other, wire.RELAY, session=message.session, message=message.message)


class Connection:
    """The loop's handler for one control connection: read, frame, write (point 2)."""

    def __init__(self, server, peer):
        self.server = server
        self.peer = peer

    def ready(self, sock, mask):
        """Called by the loop when the socket can be read or written."""
        if mask & selectors.EVENT_WRITE:
            self.write()
        if mask & selectors.EVENT_READ:
            self.read()

    def read(self):
        """Read what is there; handle every complete message in it."""
        peer = self.peer
        try:
            data = peer.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b''
        if not data:
            self.server.close(peer)
            return
        peer.reader.feed(data)
        try:
            for frame in peer.reader.frames():
                self.handle_frame(frame)
                if peer.sock.fileno() < 0:
                    return      # the message closed the connection
        except wire.FramingError as error:
            log.debug('closing %s: %s', peer, error)
            self.server.send_error(peer, wire.E_BAD_MESSAGE, str(error), 'broken stream')
            self.write()
            self.server.close(peer)

    def handle_frame(self, frame):
        """Decode one frame; a bad one gets an ERROR, the stream goes on."""
        try:
            message = wire.decode(frame)
        except wire.FramingError:
            raise
        except wire.ProtocolError as error:
            log.debug('bad message from %s: %s', self.peer, error)
            self.server.send_error(self.peer, wire.E_BAD_MESSAGE, str(error), 'bad message')
            return
        self.server.handle(self.peer, message)

    def write(self):
        """Send what is queued; stop asking for EVENT_WRITE when done."""
        peer = self.peer
        try:
            sent = peer.sock.send(peer.output)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.server.close(peer)
            return
        del peer.output[:sent]
        if not peer.output and peer.sock.fileno() >= 0:
            self.server.selector.modify(peer.sock, selectors.EVENT_READ, self.ready)


class Server(PktinfoMixIn, FastMappingMixIn, LimitsMixIn, ConsentMixIn, NameOwnersMixIn,
             Rendezvous):
    """The server main() runs: the article's Rendezvous and its additions.

    As socketserver composes a TCPServer with ThreadingMixIn, each
    addition overrides hooks of Rendezvous and calls super() for the rest:
    pktinfo.py answers from the address a request came to, fastpath.py
    answers the common MAPPING from bytes, limits.py bounds what a
    stranger may cost, consent.py lets asks run out and be declined,
    names.py keeps each name, as it reads, for its owner's key.
    """


def server_port(text):
    """An argparse type: a port for TCP and UDP that leaves room for the probe port, PORT+1."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not 0 <= port <= 65534:
        raise argparse.ArgumentTypeError(f'{port} is not a port for the server: give 0-65534 '
                                         f'(65535 would leave no room for the probe port, PORT+1)')
    return port


def parse_args(argv):
    """The command line; every limit is an option, its default in --help."""
    parser = argparse.ArgumentParser(
        description='Rendezvous server for UDP hole punching: introduces peers, '
                    'tells them their public endpoints, relays when punching fails.',
        epilog=f'Control messages over {MAX_REQUEST} bytes, or a stream that is not '
               f'this protocol, close the connection.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # SUPPRESS: the help says the default in its own words, and the
    # formatter would add a second one, '(default: None)', for None.
    parser.add_argument('--bind', action='append', metavar='ADDRESS', default=argparse.SUPPRESS,
                        help=f'address to listen on, may be given several times (default: '
                             f'{default_bind()}, which is IPv6 and IPv4 alike, on every address; '
                             f'each UDP answer leaves from the address its request came to)')
    parser.add_argument('--port', type=server_port, default=wire.DEFAULT_PORT,
                        help='TCP and UDP port; PORT+1 is the UDP probe port (0: any free)')
    parser.add_argument('--article', action='store_true',
                        help="run only the article's design: no additions (no limits, names "
                             "compared as spelled, asks that wait for ever)")
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='log every message in and out, one line each')
    parser.add_argument('-q', '--quiet', action='store_true', help='log errors only')
    parser.add_argument('--version', action='version', version=f'p2pnat {wire.__version__}')
    Limits.add_options(parser)
    args = parser.parse_args(argv)
    args.bind = getattr(args, 'bind', None) or [default_bind()]
    return args


def default_bind():
    """'::' (IPv6 and IPv4 on one socket) where the system has IPv6, else 0.0.0.0."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        return '0.0.0.0'
    return '::'


def main(argv=None):
    """Run the rendezvous server until interrupted."""
    args = parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    logging.basicConfig(level=level, format='%(asctime)s %(message)s', stream=sys.stderr)
    try:
        server = (Rendezvous if args.article else Server)(args.bind, args.port,
                                                          Limits.from_args(args))
    except (OSError, ValueError) as error:
        ports = f'port {args.port} (tcp, udp) and {args.port + 1} (udp)' if args.port \
            else 'port 0 (any free pair)'
        log.error('cannot listen on %s %s: %s', ' '.join(args.bind), ports,
                  getattr(error, 'strerror', None) or error)
        return 1
    log.info('rendezvous listening on %s (tcp, udp) and udp port %d for probes%s',
             ' '.join(wire.format_endpoint((bind, server.port)) for bind in args.bind),
             server.port + 1, " (the article's design only)" if args.article else '')
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        log.info('stopped')
    return 0


def stop(signum, frame):
    """SIGTERM stops the server as Ctrl-C does, with the last report."""
    raise KeyboardInterrupt


if __name__ == '__main__':
    sys.exit(main())
