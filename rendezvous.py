"""The rendezvous server, or mediator (the article's Listing 1).

It only introduces peers (article point 1).  Each peer keeps one TCP
control connection to it (point 2) and sends it UDP MAPPING requests, whose
source address is the peer's public endpoint, the mapping its NAT made
(point 3).  When one peer asks to CONNECT to another, the server asks the
target (ASK), and once the target connects back it sends both an INTRODUCE
with the other's public and private endpoints and a fresh session token
(points 4 and 10); the peers then punch (point 5) and talk
directly, without the server (point 7).  Only when punching fails does the
server RELAY their traffic over the control connections (point 11).

One event loop serves every socket: the TCP listener, every control
connection, and two UDP sockets, on PORT and PORT + 1, so that a peer can
see whether its NAT maps both destinations to the same public port (point
6).  The loop uses the ``selectors`` module, which picks epoll or kqueue
where there is one: plain ``select()`` takes descriptors below 1,024
only (FD_SETSIZE), which would cap us at about a thousand peers.
"""

import argparse
import collections
import errno
import hmac
import logging
import resource
import secrets
import selectors
import signal
import socket
import sys
import time

import identity
import names
import p2pcommon as wire
from consent import Asks
from fastpath import FastMappingMixIn
from limits import Limits, RateLimit, TokenBucket, address_key
from pktinfo import PktinfoMixIn

log = logging.getLogger('rendezvous')

MAX_REQUEST = 2048              # the largest control message a peer may send
MAX_SESSIONS = 64               # introductions one peer may hold open at once
UDP_BURST = 64                  # datagrams read per wake-up, before others get a turn
MAPPING_SIZE = wire.HEADER_SIZE + wire.TOKEN_SIZE + wire.Endpoint.SIZE   # request and reply
TYPE_OFFSET = 3                 # the header's type byte: magic (2), version (1), type
SUMMARY_INTERVAL = 60.0         # seconds between reports of dropped datagrams

# TCP keepalives on every control connection: a peer whose machine died or
# whose NAT forgot the mapping sends no FIN, and without probes its
# connection, and its name, would stay with us until our next write.
KEEPALIVE_OPTIONS = [(socket.SOL_SOCKET, 'SO_KEEPALIVE', 1),
                     (socket.IPPROTO_TCP, 'TCP_KEEPIDLE', 60),      # seconds of silence
                     (socket.IPPROTO_TCP, 'TCP_KEEPINTVL', 10),     # between probes
                     (socket.IPPROTO_TCP, 'TCP_KEEPCNT', 3),        # unanswered: closed
                     (socket.IPPROTO_TCP, 'TCP_USER_TIMEOUT', 60_000)]   # ms data waits


class Peer:
    """One control connection and, once registered, what we know of the peer."""

    # A server keeps ten thousand of these: without a __dict__ each one is
    # about 300 bytes smaller.
    __slots__ = ('sock', 'address', 'source', 'reader', 'output', 'connected_at', 'heard',
                 'requests', 'lists', 'name', 'key', 'proof', 'token', 'private', 'tcp_port',
                 'public', 'probed', 'sessions')

    def __init__(self, sock, address, now, limits):
        self.sock = sock
        self.address = address          # of the TCP connection, for logs
        self.source = address_key(address[0], limits.ipv6_prefix)   # what limits count
        self.reader = wire.FrameReader(MAX_REQUEST)
        self.output = bytearray()
        self.connected_at = now
        self.heard = now                # when it last sent us anything
        self.requests = TokenBucket(limits.request_rate, now)
        self.lists = TokenBucket(limits.list_rate, now)
        self.name = None
        self.key = None                 # the name as it reads (names.fold): unique
        self.proof = None               # REGISTER's proof that it holds the name's secret
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
        Taken modulo 65536 into the field's -32768..32767, so that it is
        zero only when the ports are the same: a NAT with random ports
        puts them more than 32767 apart a quarter of the time, and the
        peer must still learn that this NAT is symmetric (birthday.py).
        """
        if self.public is None or self.probed is None or self.public[0] != self.probed[0]:
            return 0
        return (self.probed[1] - self.public[1] + 32768) % 65536 - 32768

    def __str__(self):
        return self.name or wire.format_endpoint(self.address)


class Session:
    """Two introduced peers and the token the server gave them (point 4).

    The peers' own messages name the session by an id derived from the
    token (identity.py); the id is kept here, so that checking a relayed
    message costs a comparison and not an HMAC.
    """

    def __init__(self, token, asker, answerer, relay_rate, now):
        self.token = token
        self.id = identity.session_id(token)
        self.peers = (asker, answerer)
        self.relayed = TokenBucket(relay_rate, now)     # bytes: a relay is not a free pipe

    def other(self, peer):
        """The partner of one of the pair."""
        return self.peers[1] if self.peers[0] is peer else self.peers[0]


class Rendezvous:
    """The mediator: a registry of peers and one loop over all sockets."""

    def __init__(self, binds=('::',), port=wire.DEFAULT_PORT, limits=None):
        self.limits = limits or Limits()
        self.mapping_limit = RateLimit(self.limits.mapping_rate)
        self.connect_limit = RateLimit(self.limits.connect_rate)
        self.accept_limit = RateLimit(self.limits.accept_rate)
        self.selector = selectors.DefaultSelector()
        self.peers = {}                 # folded name (names.py) -> Peer (registered)
        self.owners = names.Owners(self.limits.name_hold, self.limits.max_held_names)
        self.by_token = {}              # registration token -> Peer
        self.sessions = {}              # session token -> Session
        self.asks = Asks(self.limits.ask_timeout, self.limits.max_asks)
        self.connections = {}           # socket -> Peer, registered or not
        # Not registered yet, oldest first (dicts keep insertion order): the
        # timer looks at the expired head only, not at every connection.
        self.unregistered = {}          # socket -> Peer
        self.registered = {}            # socket -> Peer, the longest silent first
        self.peers_reply = None         # the encoded PEERS, until the list changes
        self.per_address = collections.Counter()    # open connections per source
        # By a short fixed reason that our code gives, never by a text that
        # holds what a peer sent: a stranger could grow these without end.
        self.dropped = collections.Counter()    # datagrams
        self.unrelayed = collections.Counter()  # relayed messages dropped
        self.refused = collections.Counter()    # ERROR replies and refused connections
        self.next_summary = time.monotonic() + SUMMARY_INTERVAL
        self.port, self.probes = self._open_all(binds, port)

    def _open_all(self, binds, port):
        """On each address: TCP and UDP on port, UDP on port + 1 for probes.

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

    # -- the loop -----------------------------------------------------------

    def serve_forever(self):
        """Run the event loop until interrupted."""
        while True:
            self.serve_once(timeout=1.0)

    def serve_once(self, timeout):
        """Wait for ready sockets, handle each, then the timers."""
        for key, mask in self.selector.select(timeout):
            if self.selector.get_map().get(key.fd) is key:     # not closed meanwhile
                key.data(key.fileobj, mask)
        self.check_timers(time.monotonic())

    def check_timers(self, now):
        """Close connections that never registered or fell silent, end asks; summarise."""
        self.close_stale(self.unregistered, lambda peer: peer.connected_at,
                         self.limits.register_timeout, 'not registered after', now)
        self.close_stale(self.registered, lambda peer: peer.heard,
                         self.limits.idle_timeout, 'silent for', now)
        for asker, target in self.asks.expired(now):
            self.send(asker, wire.DECLINE, name=target.name, why=wire.NO_ANSWER)
        if now >= self.next_summary:
            self.mapping_limit.forget_idle(now)
            self.owners.forget_expired(now)
            self.connect_limit.forget_idle(now)
            self.accept_limit.forget_idle(now)
            self.report_dropped()
            self.next_summary = now + SUMMARY_INTERVAL

    def close_stale(self, peers, since, timeout, why, now):
        """Close the peers whose time since(peer) is more than timeout ago.

        ``peers`` is kept oldest first (dicts keep insertion order), so only
        its expired head is looked at, not every connection.
        """
        while peers:
            peer = next(iter(peers.values()))
            if now - since(peer) <= timeout:
                break           # the rest are younger
            log.info('closing %s: %s %g s', peer, why, timeout)
            self.close(peer)

    def report_dropped(self):
        """One log line each for what was dropped and what was refused.

        A flood of garbage must not become a flood of log lines: what went
        wrong is counted, by a fixed reason, and reported once a minute.
        """
        for what, counts in (('dropped %d datagrams: %s', self.dropped),
                             ('dropped %d relayed messages: %s', self.unrelayed),
                             ('refused %d requests and connections: %s', self.refused)):
            if counts:
                log.warning(what, sum(counts.values()),
                            ', '.join(f'{n} {why}' for why, n in counts.most_common()))
                counts.clear()

    # -- TCP control connections -------------------------------------------

    def accept(self, listener, mask):
        """Take a new control connection, unless its source has too many or too fast."""
        try:
            sock, address = listener.accept()
        except OSError:
            return
        address = wire.plain(address)
        source = address_key(address[0], self.limits.ipv6_prefix)
        now = time.monotonic()
        if self.per_address[source] >= self.limits.max_per_address:
            log.debug('refusing %s: %d connections from that address already',
                      wire.format_endpoint(address), self.limits.max_per_address)
            self.refused['connections per address'] += 1
            sock.close()
            return
        if not self.accept_limit.allow(source, now):
            self.refused['new connections too fast'] += 1
            sock.close()
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)    # replies go out whole
        for level, option, value in KEEPALIVE_OPTIONS:
            if hasattr(socket, option):         # Linux has them all; others fewer
                sock.setsockopt(level, getattr(socket, option), value)
        self.per_address[source] += 1
        peer = Peer(sock, address, now, self.limits)
        self.connections[sock] = peer
        self.unregistered[sock] = peer
        self.selector.register(sock, selectors.EVENT_READ, Connection(self, peer).ready)
        log.debug('connection from %s', peer)

    def close(self, peer):
        """Forget a connection: free its name and its sessions at once."""
        if self.connections.get(peer.sock) is not peer:
            return      # closed already
        self.selector.unregister(peer.sock)
        del self.connections[peer.sock]
        self.unregistered.pop(peer.sock, None)
        self.registered.pop(peer.sock, None)
        peer.sock.close()
        self.per_address[peer.source] -= 1
        if self.per_address[peer.source] <= 0:
            del self.per_address[peer.source]
        for token, session in list(peer.sessions.items()):
            self.forget_session(token)
            # Tell the partner at once that the relay is gone.  An empty
            # message, not a BYE in the peer's name: the server cannot seal
            # a peer message (only the peers hold the MAC key), and the
            # direct path, if there is one, may well live on.
            self.send(session.other(peer), wire.RELAY, session=token, message=b'')
        for asker, _ in self.asks.forget(peer):
            self.send(asker, wire.DECLINE, name=peer.name, why=wire.NO_ANSWER)
        if peer.key and self.peers.get(peer.key) is peer:
            del self.peers[peer.key]
            del self.by_token[peer.token]
            if peer.public:
                self.peers_reply = None         # the list changed
            self.owners.release(peer.key, peer.proof, time.monotonic())
            log.info('%s disconnected', peer)

    def send(self, peer, type, request=False, **fields):
        """Queue a reply for a peer, or with request a request of ours (point 8).

        Drop the peer if it never reads.
        """
        if peer.sock.fileno() < 0:
            return      # it left while we were working on its request
        log.debug('> %s to %s (tcp)', wire.TYPE_NAMES[type], peer)
        data = wire.encode(type, **fields) if request else wire.reply(type, **fields)
        self.send_encoded(peer, data)

    def send_encoded(self, peer, data):
        """Queue an encoded reply; drop the peer if it never reads."""
        if peer.sock.fileno() < 0:
            return
        if len(peer.output) + len(data) > self.limits.max_output:
            log.warning('dropping %s: %d bytes queued and it does not read',
                        peer, len(peer.output))
            self.close(peer)
            return
        if peer.output:
            peer.output += data         # the loop is already waiting to write
            return
        # Nothing queued: write at once.  Waiting for the loop to say the
        # socket is writable (it nearly always is) costs two epoll_ctl calls
        # and a loop turn per reply.
        try:
            sent = peer.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            sent = 0            # Connection.write meets the error again and closes
        if sent < len(data):
            peer.output += data[sent:]
            self.selector.modify(peer.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 self.selector.get_key(peer.sock).data)

    def send_error(self, peer, code, text, why):
        """Tell a peer what was wrong with its request; count it, by why, for the summary."""
        log.debug('error to %s: %s', peer, text)
        self.refused[why] += 1
        self.send(peer, wire.ERROR, code=code, text=cut(text, wire.MAX_TEXT))

    # -- requests on the control connection ---------------------------------

    def handle(self, peer, message):
        """Dispatch one control message from a peer."""
        log.debug('< %s from %s (tcp)', message.name_of_type, peer)
        now = time.monotonic()
        self.heard_from(peer, now)
        if message.type == wire.RELAY:
            self.relay(peer, message, now)      # measured in bytes, per session
        elif not peer.requests.allow(now):
            self.send_error(peer, wire.E_RATE_LIMITED,
                            f'too many requests: at most {self.limits.request_rate:g} '
                            f'a second', 'requests too fast')
        elif message.type == wire.REGISTER:
            self.register(peer, message)
        elif peer.name is None:
            self.send_error(peer, wire.E_NOT_REGISTERED, 'register first', 'not registered')
        elif message.type == wire.ALIVE:
            self.send(peer, wire.ALIVE)
        elif message.type == wire.LIST:
            self.list_peers(peer, now)
        elif message.type == wire.CONNECT:
            if self.connect_limit.allow(peer.name, now):
                self.connect(peer, message.target)
            else:
                self.send_error(peer, wire.E_RATE_LIMITED,
                                f'too many connect requests: at most '
                                f'{self.limits.connect_rate:g} a second', 'connects too fast')
        elif message.type == wire.DECLINE:
            self.decline(peer, message.name)
        elif message.type == wire.BYE:
            self.close(peer)
        else:
            self.send_error(peer, wire.E_BAD_MESSAGE,
                            f'type: {message.name_of_type} is not a request to the server',
                            'not a request')

    def heard_from(self, peer, now):
        """Note that a registered peer is alive: the idle timer counts from now."""
        peer.heard = now
        if peer.name is not None:
            self.registered.pop(peer.sock, None)
            self.registered[peer.sock] = peer       # to the end: heard last

    def list_peers(self, peer, now):
        """Send the names of the peers one can connect to (those with a known mapping).

        The encoded reply is kept until the list changes: up to a thousand
        names, sorted and encoded again for every LIST, would let a few
        connections keep the server busy.
        """
        if not peer.lists.allow(now):
            self.send_error(peer, wire.E_RATE_LIMITED,
                            f'too many list requests: at most {self.limits.list_rate:g} '
                            f'a second', 'lists too fast')
            return
        if self.peers_reply is None:
            listed = sorted(p.name for p in self.peers.values() if p.public)
            self.peers_reply = wire.reply(wire.PEERS, names=listed[:wire.MAX_PEERS_LISTED])
        log.debug('> PEERS to %s (tcp)', peer)
        self.send_encoded(peer, self.peers_reply)

    def register(self, peer, message):
        """Give a name to a connection, if the name reads well and is not someone else's.

        A name belongs to the proof it was first registered with (names.py,
        identity.py).  The owner's new connection takes it over at once:
        the old one is most likely dead and not yet noticed (a laptop that
        slept, a NAT that forgot the mapping).
        """
        if peer.name is not None:
            self.send_error(peer, wire.E_ALREADY_REGISTERED, f'already registered as {peer}',
                            'registered twice')
            return
        try:
            names.check_readable(message.name)
        except wire.ProtocolError as error:
            self.send_error(peer, wire.E_BAD_MESSAGE, str(error), 'unreadable name')
            return
        key = names.fold(message.name)
        if not self.owns(key, message.proof):
            self.refuse_name(peer, message.name, key)
            return
        holder = self.peers.get(key)
        if holder is not None:
            log.info('%s: a new connection with its key takes the name over', holder)
            self.send_error(holder, wire.E_NAME_TAKEN,
                            'a new connection with your key took over your name',
                            'name taken over by its owner')
            self.close(holder)
        peer.name, peer.private, peer.tcp_port = message.name, message.private, message.tcp_port
        peer.key, peer.proof = key, message.proof
        self.unregistered.pop(peer.sock, None)
        self.registered[peer.sock] = peer
        peer.token = secrets.token_bytes(wire.TOKEN_SIZE)
        self.owners.take(key)
        self.peers[key] = peer
        self.by_token[peer.token] = peer
        log.info('%s registered from %s, private %s', peer, wire.format_endpoint(peer.address),
                 ' '.join(map(wire.format_endpoint, peer.private)) or 'none')
        self.send(peer, wire.REGISTERED, token=peer.token)

    def owns(self, key, proof):
        """True when no one else holds or keeps the (folded) name."""
        holder = self.peers.get(key)
        owner = holder.proof if holder else self.owners.proof(key, time.monotonic())
        return owner is None or hmac.compare_digest(owner, proof)

    def refuse_name(self, peer, name, key):
        """Refuse a name that is someone else's, and close: each guess costs a connection.

        (--accept-rate bounds those.)  The ERROR goes first: on a fresh
        connection the kernel takes its few bytes at once, before the FIN.
        """
        holder = self.peers.get(key)
        spelled = holder.name if holder else name
        self.send_error(peer, wire.E_NAME_TAKEN,
                        f'name {name!r} is taken' if spelled == name
                        else f'name {name!r} is taken (it reads as {spelled!r})',
                        'name taken')
        self.close(peer)

    def connect(self, peer, target_name):
        """Ask the target for consent, or, if it asked first, introduce the pair (point 4).

        Nothing about the asker but its name goes to the target before the
        target agrees: not even its addresses.
        """
        target = self.find(target_name)
        if target is None or target.public is None:
            self.send_error(peer, wire.E_UNKNOWN_PEER, f'no peer named {target_name!r}',
                            'unknown peer')
            return
        if target is peer:
            self.send_error(peer, wire.E_UNKNOWN_PEER, 'cannot connect to yourself',
                            'connect to oneself')
            return
        if peer.public is None:
            self.send_error(peer, wire.E_NOT_REGISTERED,
                            'your public endpoint is not known yet: send MAPPING first',
                            'no mapping yet')
            return
        if self.asks.take(target, peer):
            self.pair(target, peer)         # the target asked first: this is consent
        elif any(session.other(peer) is target for session in peer.sessions.values()):
            self.pair(peer, target)         # consent given already: punch again
        elif (peer, target) in self.asks:
            self.send(peer, wire.ASK, name=target.name)     # asked already: it may answer still
        elif self.asks.full(target):
            self.send_error(peer, wire.E_TOO_MANY,
                            f'{target} has {self.limits.max_asks} requests waiting; '
                            f'try again later', 'too many asks')
        else:
            self.asks.add(peer, target, time.monotonic())
            # The mediator asks the target to send a request (point 4): a
            # request of ours, so without the reply flag.  The asker's
            # answer, with it, says that the target was asked.
            self.send(target, wire.ASK, request=True, name=peer.name)
            self.send(peer, wire.ASK, name=target.name)
            log.info('%s asks to connect to %s', peer, target)

    def decline(self, peer, asker_name):
        """The target says no: the asker hears so, and nothing else about it."""
        asker = self.find(asker_name)
        if asker is None or not self.asks.take(asker, peer):
            self.send_error(peer, wire.E_UNKNOWN_PEER, f'no request from {asker_name!r}',
                            'decline without ask')
            return
        self.send(asker, wire.DECLINE, name=peer.name, why=wire.DECLINED)
        log.info('%s declined %s', peer, asker)

    def find(self, name):
        """The registered peer whose name reads as this one, or None."""
        return self.peers.get(names.fold(name))

    def pair(self, peer, target):
        """Introduce two peers to each other with a fresh session token.

        peer asked first: its role is 0, the target's 1.
        """
        # A pair has one session: a new introduction replaces the old one.
        # And a peer has at most MAX_SESSIONS, or repeated CONNECTs would
        # fill our memory: the oldest goes first.
        for old, session in list(peer.sessions.items()):
            if session.other(peer) is target:
                self.forget_session(old)
        for someone in (peer, target):
            while len(someone.sessions) >= MAX_SESSIONS:
                self.forget_session(next(iter(someone.sessions)))
        token = secrets.token_bytes(wire.TOKEN_SIZE)
        session = self.sessions[token] = Session(token, peer, target, self.limits.relay_rate,
                                                 time.monotonic())
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

    def introduce(self, peer, other, token, role):
        """Tell peer how to reach other: public, predicted and private (points 4, 6, 10).

        ``role`` is 0 for the peer that asked first, 1 for the one that
        answered: each seals its messages as its role (identity.py).
        """
        self.send(peer, wire.INTRODUCE, name=other.name, session=token, role=role,
                  public=other.public, port_delta=other.port_delta, private=other.private,
                  tcp_public=other.address, tcp_port=other.tcp_port)

    def relay(self, peer, message, now):
        """Forward peer traffic within an introduced pair, and only that (point 11)."""
        session = self.sessions.get(message.session)
        if session is None or peer not in session.peers:
            self.refuse_relay(peer, wire.E_NOT_INTRODUCED, 'relay: not a session of yours',
                              'relay outside a session', now)
            return
        try:
            inner = wire.decode(message.message)
        except wire.ProtocolError as error:
            self.refuse_relay(peer, wire.E_BAD_MESSAGE, f'relay: {error}', 'bad relayed message',
                              now)
            return
        # Only the pair's own messages, sealed for this session: the relay
        # is no way to send the partner control messages in our name, nor
        # another session's traffic.  (The MAC is the peers' to check.)
        if inner.type not in wire.PEER_TYPES or inner.session != session.id:
            self.refuse_relay(peer, wire.E_BAD_MESSAGE, 'relay: carries only peer traffic',
                              'relay of other traffic', now)
            return
        if not session.relayed.allow(now, len(message.message)):
            # Over the session's byte rate: dropped, as from a full router
            # queue.  The peers' reliable layer resends, and slows down.
            self.unrelayed['over the session rate'] += 1
            return
        other = session.other(peer)
        if len(other.output) > self.limits.max_output // 2:
            # The receiver reads slower than its partner sends.  What we
            # relay is datagrams to the peers (their reliable layer resends
            # what is lost, and slows down), so it is dropped here, as a
            # router drops from a full queue, and the receiver keeps its
            # connection: only a peer that does not read at all fills the
            # other half, with our replies, and is dropped for it.
            self.unrelayed['to a peer that reads too slowly'] += 1
            return
        log.debug('relaying %s from %s to %s', inner.name_of_type, peer, other)
        self.send(other, wire.RELAY, session=message.session, message=message.message)

    def refuse_relay(self, peer, code, text, why, now):
        """Say what is wrong with a relayed message, within the peer's request budget.

        Relayed messages pass no request budget (they have the session's
        byte rate), so that their errors do not become a flood of replies.
        """
        if peer.requests.allow(now):
            self.send_error(peer, code, text, why)
        else:
            self.unrelayed[why] += 1

    # -- UDP: mapping requests (point 3) ------------------------------------

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
        """The article's point 3: write back, in the payload, where the request came from.

        The datagram's source address and port are the mapping the peer's
        NAT made; the reply carries them, and we note them for the peer
        whose registration token the request carries: on the main port its
        public endpoint, on the probe port what a second destination got
        (point 6).  A MAPPING request is all that comes to us over UDP:
        anything else is dropped by its size or type byte, before decoding.
        """
        if len(data) != MAPPING_SIZE or data[TYPE_OFFSET] != wire.MAPPING:
            self.dropped['not a mapping request'] += 1
            return
        try:
            request = wire.decode(data)
            if request.flags & wire.FLAG_REPLY:
                raise wire.ProtocolError('flags: a reply sent to the server')
        except wire.ProtocolError as error:
            self.dropped['malformed mapping request'] += 1
            log.debug('< bad datagram from %s: %s', wire.format_endpoint(source), error)
            return
        public = wire.plain(source)
        port = sock.getsockname()[1]
        log.debug('< MAPPING from %s (udp %d)', wire.format_endpoint(public), port)
        if not self.mapping_limit.allow(address_key(public[0], self.limits.ipv6_prefix), now):
            self.dropped['mappings too fast'] += 1
            return
        self.note_mapping(sock, request.token, public)
        log.debug('> MAPPING to %s (udp %d)', wire.format_endpoint(public), port)
        # The reply has the request's size exactly: no amplification.
        self.send_datagram(sock, wire.reply(wire.MAPPING, token=request.token, public=public),
                           source, arrival)

    def note_mapping(self, sock, token, public):
        """Remember what a registered peer's NAT showed us, by the port it came to."""
        peer = self.by_token.get(token)
        if peer is None:
            return
        if sock in self.probes:
            peer.probed = public
            return
        if peer.public != public:
            log.info('%s has public endpoint %s', peer, wire.format_endpoint(public))
        if peer.public is None:
            self.peers_reply = None     # it can be connected to now: listed
        peer.public = public

    def send_datagram(self, sock, data, destination, arrival=None):
        """Send one datagram; a failure is a lost packet, nothing more.

        ``arrival`` is what pktinfo.py learnt of where the request came to;
        the plain server has none.
        """
        try:
            sock.sendto(data, destination)
        except OSError as error:
            log.debug('udp send to %s: %s', wire.format_endpoint(destination), error)


def cut(text, size):
    """text shortened to at most size bytes of UTF-8, never inside a character.

    The wire counts bytes: 1,000 characters of an error that quotes a
    peer's bad name ('\\x01' for each control byte, 'é' for two bytes) can
    be 1,001 bytes, which the encoder refuses.
    """
    data = text.encode('utf-8')
    return data[:size].decode('utf-8', 'ignore') if len(data) > size else text


class Connection:
    """The loop's handler for one control connection: read, frame, write."""

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


class Server(PktinfoMixIn, FastMappingMixIn, Rendezvous):
    """The server main() runs: the article's Rendezvous and two additions.

    As socketserver composes a TCPServer with ThreadingMixIn, each
    addition overrides a hook of Rendezvous (answer_mapping,
    send_datagram, and the loop's handler of a socket) and calls the plain
    one for what it does not handle: fastpath.py answers the common
    MAPPING from bytes, pktinfo.py answers from the address a request
    came to.
    """


def main(argv=None):
    """Run the rendezvous server until interrupted."""
    args = parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    logging.basicConfig(level=level, format='%(asctime)s %(message)s', stream=sys.stderr)
    raise_descriptor_limit()
    try:
        limits = Limits.from_args(args)
        server = Server(args.bind, args.port, limits)
    except (OSError, ValueError) as error:
        ports = f'port {args.port} (tcp, udp) and {args.port + 1} (udp)' if args.port \
            else 'port 0 (any free pair)'
        log.error('cannot listen on %s %s: %s', ' '.join(args.bind), ports,
                  getattr(error, 'strerror', None) or error)
        return 1
    log.info('rendezvous listening on %s (tcp, udp) and udp port %d for probes',
             ' '.join(wire.format_endpoint((bind, server.port)) for bind in args.bind),
             server.port + 1)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.report_dropped()
        log.info('stopped')
    return 0


def stop(signum, frame):
    """SIGTERM stops the server as Ctrl-C does, with the last report."""
    raise KeyboardInterrupt


def raise_descriptor_limit():
    """Allow as many open connections as the system lets this process have.

    The soft limit is often 1,024 descriptors, one per peer; the hard limit
    is usually far higher, and a server may raise its own soft limit to it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


if __name__ == '__main__':
    sys.exit(main())
