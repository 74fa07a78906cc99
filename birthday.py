"""A symmetric NAT against a cone NAT, met by the birthday paradox (issue #13).

Article point 6 predicts a symmetric NAT's next port from the step between
two of its ports.  Linux (``masquerade random``) and many home routers
draw each new port at random instead: there is nothing to predict, and
punching fails against a port-restricted cone, whose NAT lets in only the
address *and port* it has sent to, while the symmetric NAT's port toward
the cone is one that nobody has seen.  Many tries at once find one anyway:

* the symmetric side opens many sockets (``Sockets``), each sending one
  PUNCH to the cone's public endpoint: each gets a mapping of its own, at
  a random port of the symmetric NAT's address;
* the cone side sends PUNCHes from its one socket to random ports of that
  address (``Probes``): each opens the cone's NAT to one port.

A probe to one of those ports is let in by the symmetric NAT (it looks
like the reply to that socket's punch); and when the probe left first, the
socket's punch is let in by the cone's NAT (it looks like the reply to the
probe).  Either way round, the two meet.  With n sockets and k probes over
the 64,512 ports a NAT hands out (1024-65535), none meet with probability
(1 - n/64,512)^k, about exp(-nk/64,512): the birthday paradox, as two
people in a room share a birthday far sooner than one person has yours.

Who does which is decided from what both sides know: our own mapping (the
server's two ports saw two ports of ours: symmetric) and the peer's
``port_delta`` in INTRODUCE (the server's same comparison for the peer: 0
for a cone).  The MAC still decides who the peer is: a probe is a PUNCH
sealed for the session, and a socket wins only with a message that passes
the session's MAC check; anything else that reaches these sockets is
ignored.

Nothing here blocks: the client's loop calls ``tick`` and reads the
sockets.  ``BirthdayMixIn`` is the client's side: the search starts with
UDP punching and runs beside it (and beside the relay, which carries the
chat meanwhile: upgrade.py); punching gives up no sooner than the search
does.  The socket that met the peer becomes the session's path
(everything the session sends to the peer leaves from it, keepalives
too), and the others close at once.
"""

import functools
import math
import random
import selectors

import p2pcommon as wire
import punch

FIRST_PORT = 1024           # NATs map our ephemeral ports to 1024-65535 (Linux does)
PORTS = 65536 - FIRST_PORT  # 64,512 ports where a symmetric NAT's mapping may be

# The bounds, with what each costs a home router.  Every socket we open,
# and every port we probe, is one entry in our own router's connection
# table, kept 30 s unanswered (Linux's nf_conntrack_udp_timeout), and a
# full table drops every new connection in the house.  Linux sizes that
# table from the router's memory: 512 hash buckets on a 32 MB router (the
# kernel's own comment), 4 entries a bucket, 2,048 entries in all; vendor
# firmware for such routers says "~2k records for 16Mb devices and ~4k
# for 32Mb".  So each side adds a few hundred at the most: 512 sockets,
# and 100 probes a second for 6 s (600 ports), under a third of the
# smallest table, gone 30 s later.  They meet with probability
# 1 - (1 - 512/64,512)^600 = 99.2%; sockets and probes both at 100 a
# second, the odds are even after about 210 of each: 2.1 s.
# 512 sockets also stay well inside the 1,024 descriptors a process may
# open by default (ulimit -n).
SOCKETS = 512               # sockets the symmetric side opens, at most
RATE = 100.0                # birthday datagrams per second, each side
GIVE_UP = 6.0               # seconds; then the relay keeps the chat

OPEN = 'open'               # our role: the symmetric side, many sockets
PROBE = 'probe'             # our role: the cone side, many ports

_random = random.SystemRandom()     # ports nobody can guess from our earlier ones


def role(mapping, introduction):
    """OPEN, PROBE or None: what we do for this introduction.

    Both sides decide from the same facts, so their answers fit: we open
    sockets when our NAT is symmetric (with one address, so that the
    server's port_delta tells the peer so) and the peer's port_delta is 0,
    a cone; we probe when we know ours is a cone and the peer's port_delta
    is not 0.  Two symmetric NATs would each need the other's unknown
    port: that is left to the relay (article point 11).  IPv6 has no NAT.
    """
    if mapping is None or mapping.probed is None or ':' in introduction.public[0]:
        return None
    if mapping.symmetric:
        one_address = mapping.public[0] == mapping.probed[0]
        return OPEN if one_address and not introduction.port_delta else None
    return PROBE if introduction.port_delta else None


class Search:
    """What both sides share: a rate, a deadline, and the datagrams sent."""

    winner = None               # the socket that met the peer (Sockets only)
    peer = None                 # and where the peer's message to it came from

    def __init__(self, seal, now, rate, give_up):
        self.seal = seal            # encodes a PUNCH sealed with the session's MAC
        self.started = now
        self.rate = rate
        self.deadline = now + give_up
        self.sent = 0               # birthday datagrams sent so far

    def due(self, now):
        """How many datagrams the rate allows by now, beyond those sent."""
        if now >= self.deadline:
            return 0
        return int((now - self.started) * self.rate) + 1 - self.sent

    def expired(self, now):
        """True once the search has run its time."""
        return now >= self.deadline


class Probes(Search):
    """The cone side: PUNCHes from our one socket to random ports of the peer's address.

    ``send(data, endpoint)`` is the client's way out through that socket.
    Each port is probed once (a second probe there opens nothing new), in
    a random order, ``rate`` a second, until the deadline.
    """

    def __init__(self, send, seal, address, now, rate=RATE, give_up=GIVE_UP):
        super().__init__(seal, now, rate, give_up)
        self.send = send
        self.address = address
        count = min(PORTS, math.ceil(rate * give_up))     # one each 1/rate s, from 0
        self.ports = _random.sample(range(FIRST_PORT, 65536), count)

    def tick(self, now):
        """Send the probes that are due."""
        for _ in range(self.due(now)):
            if self.sent == len(self.ports):
                return
            port = self.ports[self.sent]
            self.sent += 1
            self.send(self.seal(wire.PUNCH, nonce=punch.NO_NONCE), (self.address, port))

    def close(self):
        """Nothing to close: the probes leave from the client's own socket."""


class Sockets(Search):
    """The symmetric side: fresh sockets, each with one PUNCH to the peer's public endpoint.

    Each socket is registered with ``selector``; ``read(sock, mask)`` is
    called when one has a datagram.  Opened ``rate`` a second, up to
    ``limit``: each is a new mapping of our NAT, at a port the peer's
    probes may hit.  ``keep(sock)`` makes one the winner and closes the
    rest; ``close`` closes them all.
    """

    def __init__(self, selector, read, seal, target, now, limit=SOCKETS, rate=RATE,
                 give_up=GIVE_UP):
        super().__init__(seal, now, rate, give_up)
        self.selector = selector
        self.read = read
        self.target = target
        self.limit = limit
        self.open = []              # the sockets still open, the winner too

    def tick(self, now):
        """Open the sockets that are due, each sending its PUNCH."""
        for _ in range(self.due(now)):
            if self.sent == self.limit or self.winner is not None:
                return
            try:
                sock = wire.UDPSocket()
            except OSError:         # out of descriptors: these are all we get
                self.limit = self.sent
                return
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, self.read)
            self.open.append(sock)
            self.sent += 1
            try:
                sock.sendto(self.seal(wire.PUNCH, nonce=punch.NO_NONCE), self.target)
            except OSError:
                pass                # a lost datagram: the others still go

    def keep(self, sock, peer):
        """sock met the peer, at endpoint peer: it stays, for the session's path.

        The rest close now.
        """
        self.winner = sock
        self.peer = peer
        for other in self.open:
            if other is not sock:
                self._close(other)
        self.open = [sock]

    def close(self):
        """Close every socket, the winner's too (the session is over)."""
        for sock in self.open:
            self._close(sock)
        self.open = []

    def _close(self, sock):
        """Forget one socket: out of the selector, then closed."""
        self.selector.unregister(sock)
        sock.close()


class BirthdayMixIn:
    """The client's side: a search per session, where our NAT and the peer's call for one.

    ``birthday`` is the bounds: (sockets, rate, give-up time), by default
    (SOCKETS, RATE, GIVE_UP); any of them 0 turns the search off.
    Each session gets ``birthday``: the Probes or Sockets under way, or
    the Sockets whose winner carries the path, or None.
    """

    def __init__(self, *args, birthday=(SOCKETS, RATE, GIVE_UP), **kwargs):
        super().__init__(*args, **kwargs)
        self.birthday_bounds = birthday
        self.won = {}               # peer endpoint -> the winning socket our path leaves from

    def make_session(self, link, message, targets, now, started):
        """Decide our part now, from the introduction; it starts with UDP punching."""
        session = super().make_session(link, message, targets, now, started)
        part = role(self.mapping, message) if all(self.birthday_bounds) else None
        session.birthday_plan = (part, message.public) if part else None
        session.birthday = None
        return session

    def searching(self, session):
        """True while the session's search is under way (not met, not given up)."""
        return session.birthday is not None and session.birthday.winner is None

    def busy(self):
        """A search paces its datagrams: the loop wakes as often as for punching."""
        return super().busy() or any(map(self.searching, self.sessions.values()))

    def check_session(self, session, now):
        """Start the search with UDP punching; end it at the path or at its time."""
        if session.birthday_plan and session.punching:
            self.start_birthday(session, now)
        if self.searching(session):
            search = session.birthday
            if session.direct:
                self.end_birthday(session, f'birthday search: {search.sent} datagrams toward '
                                           f'{session.name} before the path was found')
            elif search.expired(now):
                self.end_birthday(session, f'birthday search: {search.sent} datagrams toward '
                                           f'{session.name} and no path in '
                                           f'{search.deadline - search.started:g} s')
            else:
                search.tick(now)
        super().check_session(session, now)

    def start_birthday(self, session, now):
        """Open the sockets, or start the probes, as the plan says."""
        part, public = session.birthday_plan
        session.birthday_plan = None
        sockets, rate, give_up = self.birthday_bounds
        if part == OPEN and any(isinstance(other.birthday, Sockets) and self.searching(other)
                                for other in self.sessions.values()):
            # One search's sockets at a time: two would be 1,024 descriptors,
            # every one the process may have by default, and twice the
            # entries in our router's table.
            self.say(f'no birthday search toward {session.name}: another one holds our ports')
            return
        if part == OPEN:
            self.say(f"our NAT gives every destination a new port and {session.name}'s "
                     f'keeps one: opening up to {sockets} ports toward it (the birthday '
                     f'paradox)')
            read = functools.partial(self.read_birthday, session)
            session.birthday = Sockets(self.selector, read, session.key.seal, public, now,
                                       sockets, rate, give_up)
        else:
            session.birthday = Probes(self.send_udp, session.key.seal, public[0], now, rate,
                                      give_up)
            self.say(f"{session.name}'s NAT gives every destination a new port: probing up "
                     f'to {len(session.birthday.ports)} of them (the birthday paradox)')
        session.birthday.tick(now)

    def end_birthday(self, session, why):
        """The search is over without a winner of its own: everything of it closes now."""
        self.say(why)
        session.birthday.close()
        session.birthday = None

    def punch_failed(self, session, now):
        """Punching has not given up while the search may still find a direct path."""
        if not self.searching(session):
            super().punch_failed(session, now)

    def read_birthday(self, session, sock, mask):
        """Datagrams on one of the search's sockets: the first with the session's MAC wins.

        The winner stays open as the session's path, every other socket
        closes at once; the message then goes the way of any datagram.
        A message without the MAC (a stranger's, or garbage) is ignored.
        """
        while session.birthday is not None and sock in session.birthday.open:
            try:
                data, source = sock.recvfrom(wire.MAX_DATAGRAM + 1)
                message = wire.decode(data)
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, wire.ProtocolError):
                continue        # an ICMP error for an earlier datagram; not our protocol
            search = session.birthday
            if message.type not in wire.PEER_TYPES or not session.key.check(message):
                continue
            if search.winner is None:
                if session.endpoint is not None:    # found another way meanwhile
                    continue
                search.keep(sock, source)
                self.won[source] = sock
                self.say(f'birthday search: {search.sent} datagrams toward {session.name} '
                         f'before one of our ports met theirs')
            self.datagram(message, source)

    def send_udp(self, data, endpoint):
        """To a peer whose path a search won, from the winning socket; else as before.

        One lookup by endpoint: this is the path of every chat line and
        file chunk.  The peer's endpoint is where the winning message came
        from, the path the punch then locks onto.
        """
        sock = self.won.get(endpoint)
        if sock is None:
            super().send_udp(data, endpoint)
            return
        try:
            sock.sendto(data, endpoint)
        except OSError:
            pass            # a lost datagram, as on the client's own socket

    def end_session(self, session, why):
        """The session is over: so is its search, and the winning socket closes."""
        super().end_session(session, why)
        if session.birthday is not None:
            if session.birthday.winner is not None:
                self.won.pop(session.birthday.peer, None)
            session.birthday.close()
            session.birthday = None
