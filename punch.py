"""Hole punching and keeping the hole open (the article's Listing 2).

Three pieces, each one article point:

* ``discover_mapping`` asks the rendezvous server, over UDP, which public
  address and port our NAT gave us (point 3), from two server ports, to
  see whether the NAT keeps one mapping for every destination (a "cone")
  or makes a new one per destination ("symmetric", point 6).
* ``Punch`` sends PUNCH datagrams to every address the peer might have and
  locks onto the first one that proves it is the peer (points 5 and 10).
* ``Keepalive`` keeps the punched mapping from timing out and notices
  when the path has died anyway (point 9).

Nothing here blocks except ``discover_mapping``, which runs once at start-up:
the client's single event loop drives ``Punch`` and ``Keepalive`` by
calling their methods when a datagram arrives or a timer is due.  Our own
addresses for the peer to try are gathered in interfaces.py, and TCP hole
punching, the article's future work, is tcppunch.py.
"""

import select
import time

import p2pcommon as wire
from interfaces import reachable

# A few datagrams a second are enough: the first punch on each side is
# usually dropped by the other NAT, and the next one, 100 ms later, finds
# the mapping that the peer's own punch has opened by then.
PUNCH_INTERVAL = 0.1
PUNCH_TIMEOUT = 5.0
# Every candidate of a full introduction (16), a round every PUNCH_INTERVAL
# for the whole timeout, and then no more: 800 PUNCHes of 48 bytes, about
# 38 KB per introduction at the most, wherever its addresses point.
PUNCH_BUDGET = 800
NO_NONCE = bytes(wire.NONCE_SIZE)   # a UDP punch answers no challenge

# Linux conntrack forgets an unanswered UDP mapping after 30 s, and Ford et
# al. saw NATs that forget after 20 s; the article says "around 60".  A
# keepalive every 15 s stays inside all of these.
KEEPALIVE_INTERVAL = 15.0
DEAD_AFTER = 3          # intervals of silence before a path counts as dead

# A symmetric NAT that allocates ports in sequence gives our next
# destination the port after the last one: try this many steps ahead.
PREDICTION_STEPS = 8

MAPPING_TRIES = 8       # at 20% loss each way, all 8 fail once in 3,000 starts
MAPPING_WAIT = 0.5


class Mapping:
    """What the server saw of us: public endpoints from its two UDP ports."""

    def __init__(self, public, probed):
        self.public = public
        self.probed = probed

    @property
    def symmetric(self):
        """True if the NAT gave the second server port another mapping."""
        return self.probed is not None and not wire.same_endpoint(self.public, self.probed)

    def describe(self):
        """A few words for the status line."""
        if self.probed is None:
            return 'NAT type unknown: the probe port did not answer'
        if self.symmetric:
            return f'symmetric NAT: the probe port saw {wire.format_endpoint(self.probed)}'
        return 'cone NAT or none: one mapping for every destination'


def discover_mapping(sock, server, probe, token):
    """Learn our public endpoint from the server's two UDP ports (points 3, 6).

    Sends a MAPPING request, carrying our registration token so that the
    server files the answer under our name, to ``server`` and ``probe`` and
    retries on loss.  Returns a Mapping; raises TimeoutError if the main
    port never answers.  Other datagrams that arrive meanwhile are dropped:
    nobody knows our address yet.
    """
    request = mapping_request(token)
    seen = {}
    for _ in range(MAPPING_TRIES):
        for target in (server, probe):
            if target not in seen:
                sock.sendto(request, target)
        deadline = time.monotonic() + MAPPING_WAIT
        while len(seen) < 2 and time.monotonic() < deadline:
            if select.select([sock], [], [], deadline - time.monotonic())[0]:
                _take_mapping_reply(sock, token, (server, probe), seen)
        if len(seen) == 2:
            break
    if server not in seen:
        raise TimeoutError(f'no UDP answer from {wire.format_endpoint(server)}')
    return Mapping(seen[server], seen.get(probe))


def _take_mapping_reply(sock, token, targets, seen):
    """Read one datagram; file it in seen if it is our MAPPING reply."""
    try:
        data, source = sock.recvfrom(wire.MAX_DATAGRAM)
        message = wire.decode(data)
    except (OSError, wire.ProtocolError):
        return
    for target in targets:
        if (message.type == wire.MAPPING and message.token == token
                and wire.same_endpoint(source, target)):
            seen[target] = message.public


def mapping_request(token):
    """A MAPPING request: our registration token, and room for the answer.

    The endpoint field is zeros: the server writes what it saw there, so
    its reply is exactly as large as the request (no amplification).
    """
    return wire.encode(wire.MAPPING, token=token, public=('0.0.0.0', 0))


def candidates(introduction, our_public=None, networks=()):
    """Every endpoint where the peer might be reached, best guess first.

    Its public endpoint as the server saw it (point 3); when its NAT gave
    the server's two ports two different mappings, the ports it will
    probably use next (point 6); and the private endpoints it reported,
    which work when we are behind the same NAT (point 10).

    A private endpoint is only what the peer *says*, and whoever we punch
    gets our datagrams: so we punch one only where it can be the peer's
    machine on a network of ours, inside one of our ``networks``, or
    behind the same NAT (its public address is ``our_public``'s).  An
    IPv6 address is not private: with no NAT in the way it is the peer's
    own, which we punch when we have IPv6 too (the article's reader's
    question).  One more kind is safe: an endpoint on the peer's own
    public address, a port its router forwards to it (portmap.py).
    Never more than MAX_ENDPOINTS in all.
    """
    public = introduction.public
    found = [public]
    if introduction.port_delta:
        for step in range(1, PREDICTION_STEPS + 1):
            # The server gives the step modulo 65536 (a step of -60000 is
            # +5536), so the prediction wraps as well.
            port = (public[1] + step * introduction.port_delta) % 65536
            if port:
                found.append((public[0], port))
    same_nat = our_public is not None and our_public[0] == public[0]
    # A port on the address the server saw the peer at is on the peer's own
    # NAT: aiming us there aims nowhere new, since the server names that
    # address in ``public`` anyway and prediction punches 8 of its ports.
    found += [endpoint for endpoint in introduction.private
              if same_nat or endpoint[0] == public[0] or reachable(endpoint[0], networks)]
    return list(dict.fromkeys(found))[:wire.MAX_ENDPOINTS]


class Punch:
    """One hole punching attempt toward one peer (article point 5).

    ``send(data, endpoint)`` puts a datagram on our UDP socket and
    ``seal(type, **fields)`` encodes a peer message with the session's MAC.
    The client calls ``tick`` from its loop and ``receive`` for every
    message that passed the session's MAC check.

    A punch sends at most PUNCH_BUDGET datagrams, whatever the number of
    candidates: an introduction must not become a way to make us send a
    flood to someone else's addresses.
    """

    def __init__(self, send, seal, targets, now, timeout=PUNCH_TIMEOUT):
        self.send = send
        self.seal = seal
        self.targets = list(targets)
        self.started = now
        self.deadline = now + timeout
        self.next_round = now
        self.rounds = 0
        self.budget = PUNCH_BUDGET
        self.locked = None

    def tick(self, now):
        """Send a round of PUNCH to every candidate when one is due.

        IPv6 candidates get a head start of one round, so that where both
        peers have IPv6 the first proof, and the lock, comes over IPv6: no
        NAT there, only stateful firewalls, which punching opens the same
        way (the reader's question in the article's comments).
        """
        if self.locked is None and now >= self.next_round:
            ipv6 = [target for target in self.targets if ':' in target[0]]
            for target in (ipv6 if self.rounds == 0 and ipv6 else self.targets):
                if self.budget <= 0:
                    break
                self.budget -= 1
                self.send(self.seal(wire.PUNCH, nonce=NO_NONCE), target)
            self.rounds += 1
            self.next_round = now + PUNCH_INTERVAL

    def expired(self, now):
        """True when the peer has not answered within the timeout."""
        return self.locked is None and now >= self.deadline

    def receive(self, message, source):
        """Take a proven message of this session from source; return the locked endpoint.

        Hole punching traffic (PUNCH, KEEPALIVE: the header's punching flag)
        is bounced back as PUNCH_ACK (point 8), always: the peer may still
        be punching after we have locked.  Any message with the session's
        MAC proves that the peer (only it and the server know the token:
        point 10) reaches us from ``source`` and that our NAT lets it in;
        its NAT lets our replies back to that same endpoint.  So the first
        proof locks in, even if it came from an address we never punched,
        as from a symmetric NAT.
        """
        if message.flags & wire.FLAG_PUNCHING and not message.flags & wire.FLAG_REPLY:
            # A request is bounced, a reply never: two peers bouncing each
            # other's bounces would never stop.
            self.send(self.seal(wire.PUNCH_ACK), source)
        if self.locked is None:
            self.locked = source
        return self.locked


class Keepalive:
    """Keeps a punched path open and notices when it dies (article point 9).

    NATs forget a UDP mapping that sees no traffic, and then the peer's
    datagrams are dropped.  Anything we send refreshes our side; ``tick``
    sends a KEEPALIVE, by calling ``send()``, when nothing else has gone
    out for ``interval`` seconds.  ``interval`` 0 turns keepalives off.
    """

    def __init__(self, interval, now, send):
        self.interval = interval
        self.send = send            # puts one KEEPALIVE on the path
        self.last_sent = now
        self.last_heard = now

    def tick(self, now):
        """Send a KEEPALIVE if the path has been quiet for an interval."""
        if self.due(now):
            self.send()
            self.sent(now)

    def sent(self, now):
        """Record that something went out on the path."""
        self.last_sent = now

    def heard(self, now):
        """Record that something came in on the path."""
        self.last_heard = now

    def due(self, now):
        """True when a KEEPALIVE should go out now."""
        return self.interval > 0 and now - self.last_sent >= self.interval

    def dead(self, now):
        """True after DEAD_AFTER intervals without a word from the peer."""
        return self.interval > 0 and now - self.last_heard > DEAD_AFTER * self.interval
