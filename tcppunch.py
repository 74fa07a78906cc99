"""TCP hole punching: the article's future work, "try that first".

The article punches UDP and leaves TCP for later; Ford, Srisuresh and
Kegel (section 4) show how: every socket of ours binds the one local port
that our control connection already has a NAT mapping for, listens on it
and connects from it at the same time, and the stream may come from
connect() or from accept() (a simultaneous open).  ``TcpPunch`` is that
routine; ``tcp_connect`` makes the control connection's port shareable in
the first place, and ``keep_tcp_alive`` is point 9 for TCP.
``TcpPunchMixIn`` is the client's part: TCP raced beside UDP.
"""

import secrets
import selectors
import socket
import time

import p2pcommon as wire
from punch import KEEPALIVE_INTERVAL

# A TCP punch that can work stands within a few connect retries (TCP_RETRY)
# and a challenge round trip; 3 s covers a SYN lost twice on a 250 ms path.
# It is also the grace in which TCP may take a session over from UDP.
TCP_PUNCH_TIMEOUT = 3.0
TCP_RETRY = 0.2             # seconds between connect attempts to one target
TCP_DEAD_AFTER = 20         # seconds data may wait unacknowledged on a punched connection
MAX_TCP_PUNCHES = 4         # TCP punches at once (a listener and a socket per target each)


def shared_socket(family, local=None):
    """A TCP socket whose local port other sockets may share.

    SO_REUSEADDR and SO_REUSEPORT let our control connection, a listener
    and our outgoing connects all use one local port (Ford et al. section
    4): the NAT mapped that port when we reached the server, so packets to
    and from the peer on it look like more of the same to the NAT.
    """
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if local:
        sock.bind(local)
    return sock


def tcp_connect(address, timeout):
    """Connect to (host, port) from a shareable port; like socket.create_connection."""
    error = OSError(f'cannot resolve {address[0]}')
    for family, _, _, _, target in socket.getaddrinfo(*address, type=socket.SOCK_STREAM):
        # Binding first (to any free port) makes the kernel pick a port no
        # other socket has bound, so that TCP punching can listen on it.
        sock = shared_socket(family, ('::' if family == socket.AF_INET6 else '0.0.0.0', 0))
        sock.settimeout(timeout)
        try:
            sock.connect(target)
            return sock
        except OSError as failure:
            sock.close()
            error = failure
    raise error


def keep_tcp_alive(sock):
    """Point 9 for TCP: probes that hold the NAT's mapping, and a deadline.

    An idle connection sends TCP's own keepalive probe every
    KEEPALIVE_INTERVAL, which holds the NAT's TCP mapping open as our
    KEEPALIVE datagrams hold the UDP one.  A connection whose path has died
    (data unacknowledged for TCP_DEAD_AFTER seconds, or probes unanswered
    for as long) is closed by the kernel, and the session punches UDP,
    instead of TCP retrying for a quarter of an hour while messages queue.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, int(KEEPALIVE_INTERVAL))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_DEAD_AFTER * 1000)


class TcpPunch:
    """TCP hole punching toward one peer: listen and connect at once.

    From the local port of our control connection we listen, and connect to
    the peer's control-connection endpoints: public (as the server saw it)
    and private.  Each side's SYN opens its own NAT for the other's; the
    two SYNs may even cross, and the kernel then makes one connection out
    of both (a simultaneous open).  A connect that fails (RST from the
    other NAT, which had no mapping yet) is tried again.

    Whoever is at the other end of a stream may be a stranger (a private
    address is someone's on every LAN), so a stream starts with a
    challenge-response and nothing else: each side sends a random nonce
    (CHALLENGE) and answers the other's with a PUNCH that echoes it under
    the session's MAC.  The first stream whose PUNCH answers our nonce
    wins, whether it came from connect() or from accept(); before that, a
    stranger has learnt nothing about the session it could use.

    ``on_locked(stream)`` is called with that FramedStream, whose further
    messages go to ``on_message(stream, message)`` once they pass the MAC
    check; anything else closes the stream.
    """

    def __init__(self, selector, local, targets, key, now, on_locked, on_message,
                 timeout=TCP_PUNCH_TIMEOUT):
        self.selector = selector
        self.local = local
        self.family = socket.AF_INET6 if ':' in local[0] else socket.AF_INET
        self.targets = [t for t in targets if (':' in t[0]) == (self.family == socket.AF_INET6)]
        self.key = key
        self.deadline = now + timeout
        self.on_locked = on_locked
        self.on_message = on_message
        self.connecting = {}        # socket -> (target, when to try again)
        self.retry_at = {target: now for target in self.targets}
        self.streams = []           # established, proving or proven
        self.nonces = {}            # stream -> the challenge we sent on it
        self.proven = set()         # streams whose PUNCH answered our challenge
        self.answered = set()       # streams whose challenge we answered (once each)
        self.locked = None
        self.listener = shared_socket(self.family, local)
        self.listener.listen(8)
        self.listener.setblocking(False)
        selector.register(self.listener, selectors.EVENT_READ, self.accept)

    def tick(self, now):
        """Start a connect to every target whose retry is due."""
        if self.locked is not None or now >= self.deadline:
            return
        for target, when in self.retry_at.items():
            if now >= when and target not in self.connecting.values():
                self.connect(target)
                self.retry_at[target] = now + TCP_RETRY

    def expired(self, now):
        """True when no stream proved the peer within the timeout."""
        return self.locked is None and now >= self.deadline

    def connect(self, target):
        """One non-blocking connect from our shared port."""
        sock = shared_socket(self.family, self.local)
        sock.setblocking(False)
        try:
            sock.connect(target)
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            return
        self.connecting[sock] = target
        self.selector.register(sock, selectors.EVENT_WRITE, self.connected)

    def connected(self, sock, mask):
        """A connect finished: a stream, or an error to retry after a while."""
        self.selector.unregister(sock)
        del self.connecting[sock]
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            sock.close()
            return
        self.start_stream(sock)

    def accept(self, listener, mask):
        """The peer's connect reached our listener."""
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        self.start_stream(sock)

    def start_stream(self, sock):
        """Challenge whoever is at the other end: a random nonce, nothing of the session."""
        keep_tcp_alive(sock)
        stream = wire.FramedStream(sock, self.selector,
                                   lambda message: self.received(stream, message),
                                   lambda why: self.dropped(stream))
        self.streams.append(stream)
        self.nonces[stream] = secrets.token_bytes(wire.NONCE_SIZE)
        stream.send(wire.encode(wire.CHALLENGE, nonce=self.nonces[stream]))
        return stream

    def received(self, stream, message):
        """A message on one of our streams: answer challenges, lock on the first proof."""
        if message.type == wire.CHALLENGE and stream not in self.answered:
            self.answered.add(stream)
            stream.send(self.key.seal(wire.PUNCH, nonce=message.nonce))
        elif message.type == wire.CHALLENGE:
            # The peer challenges once a stream: answers to a flood would
            # pile up in memory for as long as the sender does not read.
            self.reject(stream)
        elif message.type not in wire.PEER_TYPES or not self.key.check(message):
            self.reject(stream)             # not our peer: nobody else gets a stream
        elif stream in self.proven:
            if message.type not in (wire.PUNCH, wire.PUNCH_ACK):
                self.on_message(stream, message)
        elif message.type == wire.PUNCH and message.nonce == self.nonces[stream]:
            self.proven.add(stream)
            if self.locked is None:
                self.locked = stream
                self.stop_trying()
                self.on_locked(stream)
        else:
            self.reject(stream)             # a proof that answers no challenge of ours

    def reject(self, stream):
        """Close a stream whose other end did not prove the session."""
        stream.close()
        self.dropped(stream)

    def dropped(self, stream):
        """A stream closed; forget it."""
        if stream in self.streams:
            self.streams.remove(stream)
        self.nonces.pop(stream, None)
        self.proven.discard(stream)
        self.answered.discard(stream)

    def stop_trying(self):
        """No more connects, no more listening; proven streams stay open.

        Each side may have locked a different stream (one from connect, one
        from accept): both stay open, and messages are read from either.
        """
        for sock in list(self.connecting):
            self.selector.unregister(sock)
            sock.close()
        self.connecting.clear()
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None

    def close(self):
        """Give up: close every socket of this attempt."""
        self.stop_trying()
        for stream in list(self.streams):
            stream.close()
        self.streams.clear()


class TcpPunchMixIn:
    """The client punches TCP beside UDP, and moves a session to TCP when it stands.

    Both punches start at the introduction, as Happy Eyeballs (RFC 8305)
    races the ways to connect instead of trying them in turn: the first
    proven path carries chat at once.  A TCP connection that stands within
    its TCP_PUNCH_TIMEOUT takes the session over even from a working UDP
    path: the kernel then resends and paces for us, which moves files
    faster under loss (bench/README), and the unacknowledged lines are
    sent on it once more (the peer keeps one copy of each).

    ``transport`` is 'both' (the race), 'tcp' (TCP, else the relay) or 'udp'.
    """

    def __init__(self, *args, transport='both', **kwargs):
        super().__init__(*args, **kwargs)
        self.transport = transport

    def busy(self):
        """A TCP punch needs the loop awake as often as a UDP one."""
        return super().busy() or any(s.trying_tcp for s in self.sessions.values())

    def start_paths(self, session, link, message, now):
        """Punch UDP (unless --tcp-only) and, from our control connection's port, TCP."""
        tcp_punches = sum(1 for s in self.sessions.values() if s.trying_tcp)
        if self.transport == 'udp' or not message.tcp_port or tcp_punches >= MAX_TCP_PUNCHES:
            super().start_paths(session, link, message, now)
            return
        private = [(host, message.tcp_port) for host, _ in message.private]
        targets = [message.tcp_public] + [endpoint for endpoint in private
                                          if endpoint[0] in {t[0] for t in session.targets}]
        targets = list(dict.fromkeys(targets))
        where = ' '.join(map(wire.format_endpoint, targets))
        if self.transport == 'tcp':
            self.say(f'introduced to {message.name}; punching TCP to {where}')
        else:
            super().start_paths(session, link, message, now)
            self.say(f'and TCP to {where}, at the same time')
        try:
            session.tcp = TcpPunch(
                self.selector, link.local, targets, session.key, now,
                lambda stream: self.tcp_locked(session, stream),
                lambda stream, inner: self.session_message(session, inner, None))
        except OSError as error:        # the port cannot be shared here
            session.tcp = None
            self.after_tcp(session, f'cannot punch TCP ({error.strerror})', now)

    def tcp_locked(self, session, stream):
        """A TCP connection proved the peer: chat goes over it, whatever carried it before."""
        now = time.monotonic()
        try:
            peer = wire.plain(stream.sock.getpeername())
        except OSError:             # it closed as it proved the peer: as if it never stood
            session.stop_tcp()
            return
        session.punch_running = False       # no more PUNCHes: TCP carries the session
        session.relayed = False
        session.tcp_since = now
        elapsed = (now - session.started) * 1000
        self.connected(session, now, f'direct, tcp, {elapsed:.0f} ms',
                       f' at {wire.format_endpoint(peer)}')

    def check_session(self, session, now):
        """On a timeout, or when its connection dies, go on without TCP."""
        if session.trying_tcp:
            session.tcp.tick(now)
            if session.tcp.expired(now):
                session.stop_tcp()
                self.after_tcp(session, f'no TCP path to {session.name}', now)
        elif session.tcp is not None and not session.on_tcp:
            session.stop_tcp()
            self.after_tcp(session, f'lost the TCP connection to {session.name}', now, lost=True)
        super().check_session(session, now)

    def after_tcp(self, session, why, now, lost=False):
        """TCP gave up: UDP goes on (punching again if TCP was the path); --tcp-only relays."""
        if self.transport == 'tcp':
            self.say(why)
            if not session.relayed:
                self.relay(session, now)
        elif lost:
            self.say(f'{why}; punching UDP')
            session.start_punch(now)
        else:
            self.say(f'{why}; ' + ('chat goes over UDP' if session.endpoint is not None else
                                   'still punching UDP' if session.punching else
                                   'chat stays on the relay'))

    def peer_message(self, message, source):
        """With --tcp-only we take no datagram at all: the user asked for no UDP path."""
        if self.transport != 'tcp':
            super().peer_message(message, source)

    def punched(self, session, message, source, now):
        """A datagram while TCP carries the session: bounce it, or follow the peer to UDP.

        While the race may still run (TCP_PUNCH_TIMEOUT after our lock), and
        for hole punching traffic at any time, UDP only proves a path.  Past
        it, the peer's regular traffic over UDP means it has left our TCP
        connection (its end died: it punched again, and sends on UDP), so we
        follow, instead of sending into that connection until ours times out.
        """
        if session.on_tcp and (message.flags & wire.FLAG_PUNCHING or
                               now - session.tcp_since < TCP_PUNCH_TIMEOUT):
            session.punch.receive(message, source)
            return
        if session.on_tcp:
            self.say(f'{session.name} left the TCP connection; chat goes over UDP')
            session.stop_tcp()
        super().punched(session, message, source, now)

    def end_session(self, session, why):
        """Close the session's TCP connections too."""
        super().end_session(session, why)
        session.stop_tcp()
