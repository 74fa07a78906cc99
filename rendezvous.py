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
6).  It is the article's select(), through ``selectors``: epoll where there
is one, as select() takes descriptors below 1,024 only (FD_SETSIZE).

``Rendezvous`` is the article's design and no more.  Additions, a module
each, override its hooks ("Hook:") and call ``super()``, as socketserver's
ThreadingMixIn does for TCPServer; ``Server`` composes them.
"""

import functools
import logging
import secrets
import selectors
import socket
import sys
import time

import identity
import p2pcommon as wire
import servermain
import serversockets
from consent import ConsentMixIn
from fastpath import FastMappingMixIn, WriteAtOnceMixIn
from limits import Limits, LimitsMixIn
from names import NameOwnersMixIn
from pktinfo import PktinfoMixIn

log = logging.getLogger('rendezvous')

MAX_REQUEST = 2048              # the largest control message a peer may send


class Peer:
    """One control connection and, once registered, what we know of the peer (point 1)."""

    # A server keeps ten thousand: without a __dict__ each is 300 bytes smaller.
    __slots__ = ('sock', 'address', 'reader', 'output', 'name', 'key', 'token', 'private',
                 'tcp_port', 'public', 'probed', 'sessions')

    def __init__(self, sock, address):
        self.sock = sock
        self.address = address          # of the TCP connection: its public end
        self.reader = wire.FrameReader(MAX_REQUEST)
        self.output = bytearray()       # what the socket did not take yet
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

        Zero for a cone NAT only; for a symmetric NAT that counts up, the
        step to predict.  Modulo 65536, as random ports may lie far apart.
        """
        if self.public is None or self.probed is None or self.public[0] != self.probed[0]:
            return 0
        return (self.probed[1] - self.public[1] + 32768) % 65536 - 32768

    def __str__(self):
        return self.name or wire.format_endpoint(self.address)


class Session:
    """Two introduced peers, their token, and the id their messages carry (point 4).

    Derived from the token (identity.py), the id is kept: a relay costs no HMAC.
    """

    def __init__(self, token, asker, answerer):
        self.token, self.id, self.peers = token, identity.session_id(token), (asker, answerer)

    def other(self, peer):
        """The partner of one of the pair."""
        return self.peers[1] if self.peers[0] is peer else self.peers[0]


class Rendezvous(serversockets.ControlIO):
    """The mediator: a registry of peers and one loop over all sockets.

    ControlIO reads each control connection into whole messages for
    ``handle``, and writes what ``send_encoded`` queues.
    """

    def __init__(self, binds=('::',), port=wire.DEFAULT_PORT, limits=None):
        self.limits = limits or Limits()    # the additions' settings: the core reads none
        self.selector = selectors.DefaultSelector()
        self.connections = {}           # socket -> Peer, registered or not
        self.peers = {}                 # name_key(name) -> Peer, registered
        self.by_token = {}              # registration token -> Peer
        self.asks = {}                  # target -> the peers that asked it and wait (point 4)
        self.asked = {}                 # asker -> the peers it asked
        self.sessions = {}              # session token -> Session
        self.port, sockets = serversockets.open_all(binds, port)
        self.probes = {probe for _, _, probe in sockets}
        for listener, udp, probe in sockets:        # on each address given
            self.selector.register(listener, selectors.EVENT_READ, self.accept)
            self.selector.register(udp, selectors.EVENT_READ, self.receive_datagrams)
            self.selector.register(probe, selectors.EVENT_READ, self.receive_datagrams)

    def serve_forever(self):
        """Hook: run the event loop until interrupted."""
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

    # -- 1. the registry -------------------------------------------------------

    def register(self, peer, message):
        """Give a connection a name, and keep its private endpoints (points 1, 10)."""
        if peer.name is not None:
            self.send_error(peer, wire.E_ALREADY_REGISTERED, f'already registered as {peer}',
                            'registered twice')
            return
        key = self.name_key(message.name)
        if not self.may_register(peer, message, key):
            return
        peer.name, peer.key, peer.token = message.name, key, secrets.token_bytes(wire.TOKEN_SIZE)
        peer.private, peer.tcp_port = message.private, message.tcp_port
        self.peers[key] = self.by_token[peer.token] = peer
        log.info('%s registered from %s, private %s', peer, wire.format_endpoint(peer.address),
                 ' '.join(map(wire.format_endpoint, peer.private)) or 'none')
        self.send(peer, wire.REGISTERED, token=peer.token)

    def name_key(self, name):
        """Hook: the key under which a name is unique; here the name as spelled."""
        return name

    def may_register(self, peer, message, key):
        """Hook: may peer take the name (ERROR if not)?  If no one holds it; no proof read."""
        if key in self.peers:
            self.send_error(peer, wire.E_NAME_TAKEN, f'name {message.name!r} is taken',
                            'name taken')
            return False
        return True

    def list_peers(self, peer):
        """Hook: send the names of the peers one can connect to: those with a mapping."""
        listed = sorted(p.name for p in self.peers.values() if p.public)
        self.send(peer, wire.PEERS, names=listed[:wire.MAX_PEERS_LISTED])

    def find(self, name):
        """The registered peer of that name, or None."""
        return self.peers.get(self.name_key(name))

    # -- 2. the control connection ---------------------------------------------

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
        self.selector.register(sock, selectors.EVENT_READ, functools.partial(self.ready, peer))
        log.debug('connection from %s', peer)

    def admit(self, peer):
        """Hook: may a new connection stay?  The article's server takes every one."""
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
        """Close a connection, and forget what it held."""
        if self.connections.get(peer.sock) is peer:     # not closed already
            self.selector.unregister(peer.sock)
            del self.connections[peer.sock]
            peer.sock.close()
            self.forget(peer)

    def forget(self, peer):
        """Hook: a connection closed: free its sessions, its asks and its name at once."""
        for token, session in list(peer.sessions.items()):
            self.forget_session(token)
            # An empty RELAY tells the partner the relay is gone; not a BYE:
            # we cannot seal one, and a direct path may well live on.
            self.send(session.other(peer), wire.RELAY, session=token, message=b'')
        for asker in self.asks.pop(peer, ()):
            self.asked[asker].discard(peer)
        for target in self.asked.pop(peer, ()):
            self.asks[target].discard(peer)
        if peer.key is not None and self.peers.get(peer.key) is peer:
            del self.peers[peer.key], self.by_token[peer.token]
            log.info('%s disconnected', peer)

    # -- 3. the public mapping, over UDP ---------------------------------------

    def receive_datagrams(self, sock, mask):
        """Hook: the loop's handler of a UDP socket: answer the datagram waiting (point 3)."""
        try:
            data, source = sock.recvfrom(wire.MAX_DATAGRAM + 1)
        except OSError as error:    # e.g. an ICMP error from an earlier send
            log.debug('udp: %s', error)
            return
        self.answer_mapping(sock, data, source, time.monotonic())

    def answer_mapping(self, sock, data, source, now, arrival=None):
        """Hook: write back, in the payload, where the request came from (point 3).

        The source address and port are the mapping the peer's NAT made,
        noted for the peer whose token the request carries.  Nothing else
        comes to us over UDP.
        """
        try:
            request = wire.decode(data)
            if request.type != wire.MAPPING:
                raise wire.ProtocolError(f'type: {request.name_of_type} over UDP')
            if request.flags & wire.FLAG_REPLY:     # point 8: a reply is never answered
                raise wire.ProtocolError('flags: a reply sent to the server')
        except wire.ProtocolError as error:
            self.drop(source, 'malformed mapping request', error)
            return
        public = wire.plain(source)
        port = sock.getsockname()[1]
        log.debug('< MAPPING from %s (udp %d)', wire.format_endpoint(public), port)
        if self.allow_mapping(public[0], now):
            self.note_mapping(sock, request.token, public)
            log.debug('> MAPPING to %s (udp %d)', wire.format_endpoint(public), port)
            # The reply has the request's size exactly: no amplification.
            self.send_datagram(sock, wire.reply(wire.MAPPING, token=request.token,
                                                public=public), source, arrival)

    def allow_mapping(self, host, now):
        """Hook: may a MAPPING from this (plain) address be answered?  Here, always."""
        return True

    def drop(self, source, why, error=None):
        """Hook: a datagram is dropped; why is a short fixed reason, error the decoder's."""
        log.debug('< bad datagram from %s: %s', source, error or why)

    def note_mapping(self, sock, token, public):
        """Remember what a registered peer's NAT showed us, by the port it came to (3, 6)."""
        peer = self.by_token.get(token)
        if peer is not None and sock in self.probes:
            peer.probed = public        # a second destination: the NAT symmetric? (point 6)
        elif peer is not None and peer.public != public:
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

    # -- 4. a connection requested: the target asked, both introduced ----------

    def connect(self, peer, target_name):
        """Ask the target, or if it asked first introduce the pair (point 4)."""
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
        """Hook: "the mediator asks the target to send a request" (point 4), by name alone.

        Not even the asker's addresses go to the target before it agrees.
        """
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
        self.asks[target].discard(asker)
        self.asked[asker].discard(target)
        return True

    def pair(self, peer, target):
        """Hook: introduce two peers, peer asked first, with a fresh session token."""
        for old, session in list(peer.sessions.items()):
            if session.other(peer) is target:
                self.forget_session(old)        # a pair has one session: the newest
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

    # -- 6, 10. what an introduction tells: predicted port, private ends -------

    def introduce(self, peer, other, token, role):
        """Tell peer how to reach other: public, predicted and private (points 4, 6, 10).

        Also both ends of other's control connection, for TCP punching, and
        the role (0 asked first, 1 answered) peer seals its messages as.
        """
        self.send(peer, wire.INTRODUCE, name=other.name, session=token, role=role,
                  public=other.public, port_delta=other.port_delta, private=other.private,
                  tcp_public=other.address, tcp_port=other.tcp_port)

    # -- 8. the header's flags: what we send is a reply, or a request ----------

    def send(self, peer, type, request=False, **fields):
        """Send a reply to a peer, or with request a request of ours (point 8)."""
        if peer.sock.fileno() >= 0:     # else it left while we worked on its request
            log.debug('> %s to %s (tcp)', wire.TYPE_NAMES[type], peer)
            self.send_encoded(peer, wire.encode(type, **fields) if request
                              else wire.reply(type, **fields))

    def send_encoded(self, peer, data):
        """Hook: queue an encoded message; the loop writes it when the socket takes it."""
        if peer.sock.fileno() >= 0:
            if not peer.output:         # ask the loop to tell us when we may write
                self.selector.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                     self.selector.get_key(peer.sock).data)
            peer.output += data

    def send_error(self, peer, code, text, why):
        """Hook: tell a peer what was wrong with its request; why is a short fixed reason."""
        log.debug('error to %s: %s', peer, text)
        # At most MAX_TEXT bytes, never cut inside a character: the text
        # may quote the peer's bad name, 4 bytes a character.
        text = text.encode('utf-8')[:wire.MAX_TEXT].decode('utf-8', 'ignore')
        self.send(peer, wire.ERROR, code=code, text=text)

    # -- 11. the relay, when punching fails ------------------------------------

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


class Server(PktinfoMixIn, FastMappingMixIn, LimitsMixIn, WriteAtOnceMixIn, ConsentMixIn,
             NameOwnersMixIn, Rendezvous):
    """The server main() runs: the article's Rendezvous and its additions.

    Each module's docstring says what it adds, and why (README: The code).
    """


def main(argv=None):
    """Run the rendezvous server until interrupted; with --article, Rendezvous alone."""
    args = servermain.parse_args(argv, MAX_REQUEST)
    return servermain.run(Rendezvous if args.article else Server, args)


if __name__ == '__main__':
    sys.exit(main())
