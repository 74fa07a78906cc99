"""What a stranger may cost the rendezvous server (an addition to the article).

The article's server trusts its peers.  A public one cannot: anyone can
open connections, send requests and datagrams as fast as the line allows.
So every resource has a ceiling, each a command-line option: the table in
``Limits.OPTIONS`` is the list in ``rendezvous.py --help``.  ``TokenBucket``
and ``RateLimit`` measure rates; ``address_key`` says which addresses count
as one source.
"""

import argparse
import functools
import ipaddress
import math


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
