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
calling their methods when a datagram arrives or a timer is due.
"""

import ipaddress
import os
import secrets
import select
import selectors
import socket
import struct
import time

try:
    import fcntl
except ImportError:         # not on Windows: interface_addresses falls back
    fcntl = None

import p2pcommon as wire

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

SIOCGIFADDR = 0x8915     # Linux: get an interface's IPv4 address
SIOCGIFNETMASK = 0x891b  # and its netmask

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


def private_addresses(route):
    """Our addresses for the peer to try (point 10, and "every interface").

    ``route`` is the local address our control connection uses: first,
    since it is the one the server's side of the network reaches.  Then
    the address of every other interface, IPv6 and IPv4, so that a peer on
    any network we share can find us.  A client that reaches its server
    over loopback is on the server's own host and offers loopback only.
    """
    if ipaddress.ip_address(route).is_loopback:
        return [route]
    found = [route]
    for address in interface_addresses():
        if address not in found and len(found) < wire.MAX_ENDPOINTS:
            found.append(address)
    return found


def interface_addresses():
    """Every global address of this host's interfaces, IPv6 first.

    Standard library only: Linux lists IPv6 addresses in /proc/net/if_inet6
    (link-local ones are left out: they need an interface index to use),
    and gives an interface's IPv4 address to the SIOCGIFADDR ioctl.
    Elsewhere, the addresses the host name resolves to.
    """
    if fcntl is not None and os.path.exists('/proc/net/if_inet6'):
        found = _ipv6_addresses() + _ipv4_addresses()
    else:
        found = [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
    return [a for a in dict.fromkeys(found) if not ipaddress.ip_address(a).is_loopback]


def _ipv6_addresses():
    """Global IPv6 addresses, from Linux's /proc/net/if_inet6."""
    found = []
    with open('/proc/net/if_inet6') as table:
        for line in table:
            hex_address, _, _, scope = line.split()[:4]
            if scope == '00':       # global scope
                found.append(str(ipaddress.IPv6Address(bytes.fromhex(hex_address))))
    return found


def _ipv4_addresses():
    """Each interface's IPv4 address, by the SIOCGIFADDR ioctl."""
    return [address for address, _ in _ipv4_interfaces()]


def _ipv4_interfaces():
    """(address, netmask) of each interface with IPv4, by SIOCGIFADDR and SIOCGIFNETMASK."""
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack('256s', name.encode()[:15])
            try:
                address = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)[20:24]
                mask = fcntl.ioctl(sock.fileno(), SIOCGIFNETMASK, request)[20:24]
            except OSError:
                continue            # no IPv4 address on this one
            found.append((socket.inet_ntoa(address), socket.inet_ntoa(mask)))
    return found


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
    question).  Never more than MAX_ENDPOINTS in all.
    """
    public = introduction.public
    found = [public]
    if introduction.port_delta:
        for step in range(1, PREDICTION_STEPS + 1):
            port = public[1] + step * introduction.port_delta
            if 0 < port < 65536:
                found.append((public[0], port))
    same_nat = our_public is not None and our_public[0] == public[0]
    found += [endpoint for endpoint in introduction.private
              if same_nat or reachable(endpoint[0], networks)]
    return list(dict.fromkeys(found))[:wire.MAX_ENDPOINTS]


def reachable(host, networks):
    """True when host is inside one of networks (ip_network objects), or routed IPv6 is ours."""
    address = ipaddress.ip_address(host)
    if address.version == 6 and not (address.is_link_local or address.is_loopback
                                     or address.is_multicast or address.is_unspecified):
        return any(network.version == 6 and not network.is_loopback for network in networks)
    return any(address in network for network in networks)


def our_networks():
    """The networks our interfaces are on, loopback included (point 10's "same LAN").

    Linux only, like interface_addresses: IPv6 prefixes from
    /proc/net/if_inet6, IPv4 netmasks from the SIOCGIFNETMASK ioctl.
    Elsewhere, loopback alone.
    """
    networks = [ipaddress.ip_network('127.0.0.0/8'), ipaddress.ip_network('::1/128')]
    if fcntl is None or not os.path.exists('/proc/net/if_inet6'):
        return networks
    with open('/proc/net/if_inet6') as table:
        for line in table:
            hex_address, _, prefix, scope = line.split()[:4]
            if scope == '00':
                address = ipaddress.IPv6Address(bytes.fromhex(hex_address))
                networks.append(ipaddress.ip_network(f'{address}/{int(prefix, 16)}',
                                                     strict=False))
    for address, mask in _ipv4_interfaces():
        networks.append(ipaddress.ip_network(f'{address}/{mask}', strict=False))
    return networks


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
        if message.flags & wire.FLAG_PUNCHING:
            self.send(self.seal(wire.PUNCH_ACK), source)
        if self.locked is None:
            self.locked = source
        return self.locked


class Keepalive:
    """Keeps a punched path open and notices when it dies (article point 9).

    NATs forget a UDP mapping that sees no traffic, and then the peer's
    datagrams are dropped.  Anything we send refreshes our side; a
    KEEPALIVE goes out when nothing else has for ``interval`` seconds.
    ``interval`` 0 turns keepalives off.
    """

    def __init__(self, interval, now):
        self.interval = interval
        self.last_sent = now
        self.last_heard = now

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


# ---------------------------------------------------------------------------
# TCP hole punching (the article's future work: "try that first").

TCP_PUNCH_TIMEOUT = 3.0     # seconds of trying before we fall back to UDP
TCP_RETRY = 0.2             # seconds between connect attempts to one target
TCP_DEAD_AFTER = 20         # seconds data may wait unacknowledged on a punched connection


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
