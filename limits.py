"""What a stranger may cost the rendezvous server (an addition to the article).

Why this exists: the open internet.  The article's server trusts its
peers.  A public one cannot: anyone can open connections, send requests
and datagrams as fast as the line allows, or never read its replies.  So
every resource has a ceiling, each a command-line option: the table in
``Limits.OPTIONS`` is the list in ``rendezvous.py --help``.  ``TokenBucket``
and ``RateLimit`` measure rates; ``address_key`` says which addresses count
as one source; ``LimitsMixIn`` holds the server to them, and counts what
it refused, for a summary once a minute.

Plugged into the server as a mix-in, composed in rendezvous.py:

    class Server(PktinfoMixIn, FastMappingMixIn, LimitsMixIn, ...,  Rendezvous): ...
"""

import argparse
import collections
import functools
import ipaddress
import logging
import math
import resource
import socket
import time
import weakref

import p2pcommon as wire

log = logging.getLogger('rendezvous')

MAX_SESSIONS = 64               # introductions one peer may hold open at once
MAPPING_SIZE = wire.HEADER_SIZE + wire.TOKEN_SIZE + wire.Endpoint.SIZE   # request and reply
TYPE_OFFSET = 3                 # the header's type byte: magic (2), version (1), type
SUMMARY_INTERVAL = 60.0         # seconds between reports of what was dropped and refused

# TCP keepalives on every control connection: a peer whose machine died or
# whose NAT forgot the mapping sends no FIN, and without probes its
# connection, and its name, would stay with us until our next write.
KEEPALIVE_OPTIONS = [(socket.SOL_SOCKET, 'SO_KEEPALIVE', 1),
                     (socket.IPPROTO_TCP, 'TCP_KEEPIDLE', 60),      # seconds of silence
                     (socket.IPPROTO_TCP, 'TCP_KEEPINTVL', 10),     # between probes
                     (socket.IPPROTO_TCP, 'TCP_KEEPCNT', 3),        # unanswered: closed
                     (socket.IPPROTO_TCP, 'TCP_USER_TIMEOUT', 60_000)]   # ms data waits


class Limits:
    """The server's ceilings, each one a command-line option (--max-per-address ...)."""

    OPTIONS = [
        # (attribute; its option is --attribute with dashes), default, help
        ('max_per_address', 64,
         'open connections from one source address (IPv6: one --ipv6-prefix network)'),
        ('accept_rate', 20.0,
         'new connections a second from one source address, bursts of twice that; '
         'more are closed at once (0: no limit)'),
        ('register_timeout', 30.0,
         'seconds a new connection has to register before it is closed'),
        ('idle_timeout', 90.0,
         'seconds a registered peer may stay silent (clients send ALIVE every 15 s) '
         'before its connection is closed'),
        ('max_output', 256 * 1024,
         'bytes of unread replies before a peer that does not read is dropped; relayed '
         'messages to it are dropped instead once half of that is queued'),
        ('request_rate', 20.0,
         'control requests a second per connection (relayed messages aside), bursts '
         'of twice that; more get an ERROR (0: no limit)'),
        ('list_rate', 1.0,
         'LIST requests a second per connection, bursts of twice that (0: no limit)'),
        ('connect_rate', 5.0,
         'CONNECT requests a second per peer, bursts of twice that (0: no limit)'),
        ('mapping_rate', 20.0,
         'MAPPING requests a second per source address, bursts of twice that; more are '
         'dropped (0: no limit)'),
        ('relay_rate', 262144.0,
         'bytes a second relayed for one session, bursts of twice that; more are '
         'dropped, as a full router queue drops (0: no limit)'),
        ('ask_timeout', 60.0,
         'seconds a peer has to answer a request to connect; then the asker hears '
         'that it did not answer'),
        ('max_asks', 16,
         'unanswered requests to connect waiting for one peer; more get an ERROR'),
        ('name_hold', 86400.0,
         'seconds a name stays reserved for its owner after its connection closes'),
        ('max_held_names', 100_000,
         'names reserved so, at most; past that the one released longest ago is '
         'freed first'),
        ('ipv6_prefix', 64,
         'IPv6 addresses count as one source per network of this prefix length: one '
         'host is usually given a whole /64'),
    ]
    # The few limits with a ceiling of their own; every one has 0 as its floor.
    MOST = {'ipv6_prefix': 128}     # bits in an IPv6 address

    def __init__(self, **values):
        for name, default, _ in self.OPTIONS:
            setattr(self, name, values.pop(name, default))
        if values:
            raise TypeError(f'unknown limits: {", ".join(values)}')

    @classmethod
    def add_options(cls, parser):
        """One option per limit, in a group of its own, each with its default."""
        group = parser.add_argument_group('limits')
        for name, default, help in cls.OPTIONS:
            group.add_argument('--' + name.replace('_', '-'),
                               type=non_negative(type(default), cls.MOST.get(name)),
                               default=default, metavar='N', help=help)

    @classmethod
    def from_args(cls, args):
        """The limits that parsed command-line options give."""
        return cls(**{name: getattr(args, name) for name, _, _ in cls.OPTIONS})


def non_negative(kind, most=None):
    """An argparse type: a number of kind (int, float), finite, from 0 to most (if given).

    Every limit is a count, a rate or a time: -5 bytes of output, or a
    timeout of -1 s that closes every connection at once, means nothing;
    nor does a /200 IPv6 network, which would fail at the first IPv6 peer.
    """
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
        if not math.isfinite(value) or value < 0 or (most is not None and value > most):
            allowed = '0 or more' if most is None else f'0 to {most}'
            raise argparse.ArgumentTypeError(f'{text} is not allowed: give {allowed}')
        return value
    return parse


class TokenBucket:
    """``rate`` units a second, bursts of ``burst``; a rate of 0 means no limit."""

    # Each peer has two, and every source address one: slots keep each
    # bucket at 72 bytes instead of about 200 with a __dict__.
    __slots__ = ('rate', 'burst', 'tokens', 'last')

    def __init__(self, rate, now, burst=None):
        self.rate = rate
        self.burst = 2 * rate if burst is None else burst
        self.tokens = self.burst
        self.last = now

    def allow(self, now, cost=1):
        """Take cost tokens; False (taking none) when there are not that many."""
        if not self.rate:
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True

    def full(self, now):
        """True when the bucket has refilled: it remembers nothing worth keeping."""
        return not self.rate or self.tokens + (now - self.last) * self.rate >= self.burst


class RateLimit:
    """A token bucket per key (a source address, a peer's name)."""

    def __init__(self, rate):
        self.rate = rate
        self.buckets = {}           # key -> TokenBucket

    def allow(self, key, now):
        """Take one token for key; False when its bucket is empty."""
        if not self.rate:
            return True
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = TokenBucket(self.rate, now)
        return bucket.allow(now)

    def forget_idle(self, now):
        """Drop the buckets that have filled up again: they hold nothing."""
        self.buckets = {k: b for k, b in self.buckets.items() if not b.full(now)}


@functools.lru_cache(maxsize=4096)
def address_key(host, ipv6_prefix):
    """Which source a (plain) address counts as: itself, or its IPv6 network.

    An IPv6 host is usually given a whole /64 and may send from any of its
    2**64 addresses: counted one by one, per-address limits would limit
    nothing.
    """
    ip = ipaddress.ip_address(host)
    if ip.version == 4:
        return host
    return str(ipaddress.ip_network((ip, ipv6_prefix), strict=False).network_address)


class Allowance:
    """What one control connection may still ask: its source, its two token buckets."""

    # One per connection, ten thousand of them: slots save about 150 bytes each.
    __slots__ = ('source', 'requests', 'lists')

    def __init__(self, source, limits, now):
        self.source = source            # what --max-per-address counts (address_key)
        self.requests = TokenBucket(limits.request_rate, now)
        self.lists = TokenBucket(limits.list_rate, now)


class LimitsMixIn:
    """The server held to its Limits: each hook of Rendezvous checks one before the core acts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mapping_limit = RateLimit(self.limits.mapping_rate)
        self.connect_limit = RateLimit(self.limits.connect_rate)
        self.accept_limit = RateLimit(self.limits.accept_rate)
        self.per_address = collections.Counter()    # open connections per source
        self.allowances = {}            # Peer -> Allowance
        # Oldest first (dicts keep insertion order): the timers look at
        # the expired head only, not at every connection.
        self.unregistered = {}          # Peer -> when it connected
        self.registered = {}            # Peer -> when we last heard from it
        self.relayed = weakref.WeakKeyDictionary()  # Session -> TokenBucket of bytes
        self.peers_reply = None         # the encoded PEERS, until the list changes
        # By a short fixed reason that our code gives, never by a text that
        # holds what a peer sent: a stranger could grow these without end.
        self.dropped = collections.Counter()    # datagrams
        self.unrelayed = collections.Counter()  # relayed messages dropped
        self.refused = collections.Counter()    # ERROR replies and refused connections
        self.next_summary = time.monotonic() + SUMMARY_INTERVAL
        raise_descriptor_limit()

    def serve_forever(self):
        """As the server's, with a last report of what was dropped when it stops."""
        try:
            super().serve_forever()
        finally:
            self.report_dropped()

    def check_timers(self, now):
        """Close connections that never registered or fell silent; summarise once a minute."""
        super().check_timers(now)
        self.close_stale(self.unregistered, self.limits.register_timeout,
                         'not registered after', now)
        self.close_stale(self.registered, self.limits.idle_timeout, 'silent for', now)
        if now >= self.next_summary:
            for limit in (self.mapping_limit, self.connect_limit, self.accept_limit):
                limit.forget_idle(now)
            self.report_dropped()
            self.next_summary = now + SUMMARY_INTERVAL

    def close_stale(self, peers, timeout, why, now):
        """Close the peers whose time in peers (oldest first) is more than timeout ago."""
        while peers:
            peer, since = next(iter(peers.items()))
            if now - since <= timeout:
                break           # the rest are younger
            del peers[peer]
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

    # -- control connections -------------------------------------------------

    def admit(self, peer):
        """A new connection, unless its source has too many open or opens them too fast."""
        source = address_key(peer.address[0], self.limits.ipv6_prefix)
        now = time.monotonic()
        if self.per_address[source] >= self.limits.max_per_address:
            log.debug('refusing %s: %d connections from that address already',
                      peer, self.limits.max_per_address)
            self.refused['connections per address'] += 1
            return False
        if not self.accept_limit.allow(source, now):
            self.refused['new connections too fast'] += 1
            return False
        if not super().admit(peer):
            return False
        for level, option, value in KEEPALIVE_OPTIONS:
            if hasattr(socket, option):         # Linux has them all; others fewer
                peer.sock.setsockopt(level, getattr(socket, option), value)
        self.per_address[source] += 1
        self.allowances[peer] = Allowance(source, self.limits, now)
        self.unregistered[peer] = now
        return True

    def handle(self, peer, message):
        """A request within the peer's budgets, from a peer whose idle timer starts again.

        Relayed messages are measured in bytes, per session (relay).
        """
        now = time.monotonic()
        if peer in self.registered:
            del self.registered[peer]
            self.registered[peer] = now         # to the end: heard last
        if message.type == wire.RELAY or self.within_budget(peer, message, now):
            super().handle(peer, message)
        if peer.name is not None and self.unregistered.pop(peer, None) is not None:
            self.registered[peer] = now         # it registered just now

    def within_budget(self, peer, message, now):
        """True if the peer may make this request now; else an ERROR says which rate."""
        allowance = self.allowances[peer]
        if not allowance.requests.allow(now):
            what, rate, why = 'requests', self.limits.request_rate, 'requests too fast'
        elif peer.name is None:
            return True         # the server says: register first
        elif message.type == wire.LIST and not allowance.lists.allow(now):
            what, rate, why = 'list requests', self.limits.list_rate, 'lists too fast'
        elif message.type == wire.CONNECT and not self.connect_limit.allow(peer.name, now):
            what, rate, why = 'connect requests', self.limits.connect_rate, 'connects too fast'
        else:
            return True
        self.send_error(peer, wire.E_RATE_LIMITED, f'too many {what}: at most {rate:g} a second',
                        why)
        return False

    def forget(self, peer):
        """A closed connection no longer counts against its source, nor waits on a timer."""
        allowance = self.allowances.pop(peer, None)
        if allowance is not None:
            self.per_address[allowance.source] -= 1
            if self.per_address[allowance.source] <= 0:
                del self.per_address[allowance.source]
        self.unregistered.pop(peer, None)
        self.registered.pop(peer, None)
        if peer.public and peer.key is not None and self.peers.get(peer.key) is peer:
            self.peers_reply = None         # a listed name goes
        super().forget(peer)

    def list_peers(self, peer):
        """As the server's, from the encoded reply kept until the list changes.

        Up to a thousand names, sorted and encoded again for every LIST,
        would let a few connections keep the server busy.
        """
        if self.peers_reply is None:
            listed = sorted(p.name for p in self.peers.values() if p.public)
            self.peers_reply = wire.reply(wire.PEERS, names=listed[:wire.MAX_PEERS_LISTED])
        log.debug('> PEERS to %s (tcp)', peer)
        self.send_encoded(peer, self.peers_reply)

    def set_public(self, peer, public):
        """A peer with its first mapping can be connected to now: the list changes."""
        if peer.public is None:
            self.peers_reply = None
        super().set_public(peer, public)

    def pair(self, peer, target):
        """As the server's; then each of the two holds at most MAX_SESSIONS, the oldest go.

        Or repeated CONNECTs would fill our memory.
        """
        super().pair(peer, target)
        for someone in (peer, target):
            while len(someone.sessions) > MAX_SESSIONS:
                self.forget_session(next(iter(someone.sessions)))

    def send_encoded(self, peer, data):
        """As the server's, but a peer that does not read its replies is dropped."""
        if peer.sock.fileno() >= 0 and len(peer.output) + len(data) > self.limits.max_output:
            log.warning('dropping %s: %d bytes queued and it does not read',
                        peer, len(peer.output))
            self.close(peer)
            return
        super().send_encoded(peer, data)

    def send_error(self, peer, code, text, why):
        """As the server's, and counted by why for the summary."""
        self.refused[why] += 1
        super().send_error(peer, code, text, why)

    # -- the relay and the mapping -------------------------------------------

    def relay(self, peer, message):
        """Relay within the session's byte rate, and only to a peer that reads.

        What we relay is datagrams to the peers (their reliable layer
        resends what is lost, and slows down), so it is dropped here, as a
        router drops from a full queue: past the session's rate, or once
        the receiver has half of --max-output unread; the receiver keeps
        its connection.  A relay outside any session costs a request.
        """
        now = time.monotonic()
        session = self.sessions.get(message.session)
        if session is None or peer not in session.peers:
            if self.allowances[peer].requests.allow(now):
                super().relay(peer, message)        # which says: not a session of yours
            else:
                self.unrelayed['relay outside a session'] += 1
            return
        budget = self.relayed.get(session)
        if budget is None:
            budget = self.relayed[session] = TokenBucket(self.limits.relay_rate, now)
        if not budget.allow(now, len(message.message)):
            self.unrelayed['over the session rate'] += 1
        elif len(session.other(peer).output) > self.limits.max_output // 2:
            self.unrelayed['to a peer that reads too slowly'] += 1
        else:
            super().relay(peer, message)

    def answer_mapping(self, sock, data, source, now, arrival=None):
        """As the server's, but what is not a MAPPING by its size or type byte goes at once.

        Decoding it first would make a flood of garbage dearer.
        """
        if len(data) != MAPPING_SIZE or data[TYPE_OFFSET] != wire.MAPPING:
            self.dropped['not a mapping request'] += 1
            return
        super().answer_mapping(sock, data, source, now, arrival)

    def allow_mapping(self, host, now):
        """MAPPING requests from one source, at most --mapping-rate a second."""
        limit = self.mapping_limit
        if not limit.rate or limit.allow(address_key(host, self.limits.ipv6_prefix), now):
            return True         # (no limit: the hot path skips working out the source)
        self.dropped['mappings too fast'] += 1
        return False

    def drop(self, source, why, error=None):
        """As the server's, and counted by why for the summary."""
        self.dropped[why] += 1
        super().drop(source, why, error)


def raise_descriptor_limit():
    """Allow as many open connections as the system lets this process have.

    The soft limit is often 1,024 descriptors, one per peer; the hard limit
    is usually far higher, and a server may raise its own soft limit to it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
