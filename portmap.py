"""Ask the home router to forward a port to us: NAT-PMP and PCP.

Hole punching (punch.py) opens a NAT from the inside and hopes the peer's
packets fit the hole.  Many home routers can simply be asked instead:
Apple's NAT Port Mapping Protocol (NAT-PMP, RFC 6886) and its successor,
the Port Control Protocol (PCP, RFC 6887), both let a host on the LAN ask
its default gateway, on UDP port 5351, to forward an external port to one
of its own ports for a while.  A peer that gets such a mapping can be
reached at it by anyone, whatever kind of NAT the router is otherwise.

``PortMapper`` asks with PCP's MAP first and falls back to NAT-PMP when the
gateway answers that it speaks only version 0 (RFC 6887 section 9).  The
answer carries the external address the router was given, which behind a
carrier-grade NAT is not the one a rendezvous server sees: that is worth
knowing, since then the mapping only reaches the CGN's inside.

Start-up asks once, blocking, with a short timeout (``map``); after that
the client's event loop renews the mapping before it expires (``tick`` and
``receive``), and ``close`` deletes it.  The message layouts are tables of
(field, struct format), one per message, as in p2pcommon.py.
``PortMapMixIn``, at the bottom, is the client's part: it asks at
start-up and offers the mapped endpoint to peers.
"""

import ipaddress
import random
import secrets
import select
import selectors
import socket
import struct
import time
from dataclasses import dataclass, replace

import p2pcommon as wire

SERVER_PORT = 5351          # both protocols (RFC 6886 section 3.1, RFC 6887 section 19)
NATPMP_VERSION = 0
PCP_VERSION = 2
PCP = 'PCP'
NATPMP = 'NAT-PMP'

# RFC 6886 section 3.3 recommends asking for two hours; the router may
# grant less, and we renew halfway anyway.
DEFAULT_LIFETIME = 7200
# The RFCs retry for a minute (NAT-PMP) or forever (PCP) before deciding
# that no router answers.  Most routers answer nothing at all, and the
# client cannot register with its server until this is over, so start-up
# gives the router one second: an answer on a LAN takes milliseconds.
START_TIMEOUT = 1.0

# Retransmission.  NAT-PMP (RFC 6886 section 3.1): 250 ms, doubling.  It
# gives up after the ninth try (64 s); while renewing a mapping we keep
# trying every 64 s until the lease ends, since a late renewal still saves
# it.  PCP (RFC 6887 section 8.1.1): 3 s, doubling up to 1024 s, each time
# +-10% so that clients that rebooted together do not stay in step.
NATPMP_FIRST_RETRY = 0.25
NATPMP_MAX_RETRY = 64.0
PCP_FIRST_RETRY = 3.0
PCP_MAX_RETRY = 1024.0
PCP_RETRY_JITTER = 0.1
# RFC 6887 section 11.2.1: renewals MUST NOT be sent less than 4 s apart.
PCP_RENEWAL_GAP = 4.0

MAX_REPLY = 1100            # the largest PCP message (RFC 6887 section 7)
NONCE_SIZE = 12             # RFC 6887 section 11.1
PROTOCOLS = {'udp': 17, 'tcp': 6}           # IANA numbers, in PCP's MAP
NATPMP_OPCODES = {'udp': 1, 'tcp': 2}       # RFC 6886 section 3.3
NATPMP_ADDRESS = 0                          # opcode: "what is your external address"
PCP_MAP = 1
REPLY_BIT = 0x80            # set in the opcode of every answer (both RFCs)
IPV4_MAPPED = bytes(10) + b'\xff\xff'       # PCP carries IPv4 as ::ffff:a.b.c.d
NO_ADDRESS = IPV4_MAPPED + bytes(4)         # ::ffff:0.0.0.0, "no preference" (section 5)
RTF_GATEWAY = 0x2           # /proc/net/route flag: the route goes via a gateway

# Result codes, with what each means for the user.
NATPMP_RESULTS = {          # RFC 6886 section 3.5
    1: 'unsupported version',
    2: 'not authorized or refused (port mapping may be switched off on the router)',
    3: 'network failure (the router has no external address yet)',
    4: 'out of resources (the router has no ports left to give)',
    5: 'unsupported opcode',
}
PCP_RESULTS = {             # RFC 6887 section 7.4
    1: 'UNSUPP_VERSION: the router speaks another PCP version',
    2: 'NOT_AUTHORIZED: the router does not allow this mapping',
    3: 'MALFORMED_REQUEST: the router could not read our request',
    4: 'UNSUPP_OPCODE: the router does not do MAP',
    5: 'UNSUPP_OPTION: the router does not know an option we sent',
    6: 'MALFORMED_OPTION: the router could not read an option',
    7: 'NETWORK_FAILURE: the router has no external address yet',
    8: 'NO_RESOURCES: the router has no mappings left to give',
    9: 'UNSUPP_PROTOCOL: the router does not map this protocol',
    10: 'USER_EX_QUOTA: we hold all the mappings the router allows us',
    11: 'CANNOT_PROVIDE_EXTERNAL: the router cannot give the external port asked for',
    12: 'ADDRESS_MISMATCH: the router sees us at another address than we said',
    13: 'EXCESSIVE_REMOTE_PEERS: the router cannot filter that many peers',
}
UNSUPP_VERSION = 1          # the same code in both protocols


class PortMapError(Exception):
    """The router answered, and said no: the text says why."""


class Layout:
    """A fixed message layout: (field, struct format) pairs, network byte order."""

    def __init__(self, *fields):
        self.fields = fields
        self.struct = struct.Struct('!' + ''.join(fmt for _name, fmt in fields))
        self.size = self.struct.size

    def pack(self, **values):
        """The message's bytes; a field not given is zero (the reserved ones)."""
        return self.struct.pack(*(values.get(name, b'' if fmt.endswith('s') else 0)
                                  for name, fmt in self.fields))

    def unpack(self, data):
        """A dict of the fields at the start of ``data`` (None when it is too short)."""
        if len(data) < self.size:
            return None
        return dict(zip((name for name, _fmt in self.fields), self.struct.unpack_from(data)))


# NAT-PMP (RFC 6886).  Every answer starts with version, opcode + 128,
# result code and the seconds since the router's mapping table began.
NATPMP_ADDRESS_REQUEST = Layout(         # section 3.2
    ('version', 'B'), ('opcode', 'B'))
NATPMP_ADDRESS_RESPONSE = Layout(
    ('version', 'B'), ('opcode', 'B'), ('result', 'H'), ('epoch', 'I'),
    ('external_address', '4s'))
NATPMP_MAP_REQUEST = Layout(             # section 3.3; lifetime 0 deletes (3.4)
    ('version', 'B'), ('opcode', 'B'), ('reserved', 'H'),
    ('internal_port', 'H'), ('external_port', 'H'),     # external: a suggestion
    ('lifetime', 'I'))
NATPMP_MAP_RESPONSE = Layout(
    ('version', 'B'), ('opcode', 'B'), ('result', 'H'), ('epoch', 'I'),
    ('internal_port', 'H'), ('external_port', 'H'), ('lifetime', 'I'))
NATPMP_ERROR = Layout(                   # how an answer that says no may end
    ('version', 'B'), ('opcode', 'B'), ('result', 'H'), ('epoch', 'I'))

# PCP (RFC 6887): the common header (section 7.1 requests, 7.2 answers),
# then MAP's own fields (section 11.1).  Addresses are 16 bytes, IPv4 ones
# mapped into IPv6 (section 5).
PCP_MAP_REQUEST = Layout(
    ('version', 'B'), ('opcode', 'B'), ('reserved', 'H'),
    ('lifetime', 'I'),                   # seconds asked for; 0 deletes (section 15)
    ('client_address', '16s'),           # ours, as the router should see it
    ('nonce', '12s'),                    # random; proves later requests are ours
    ('protocol', 'B'), ('reserved2', '3s'),
    ('internal_port', 'H'),
    ('external_port', 'H'),              # a suggestion: 0 for "any"
    ('external_address', '16s'))         # a suggestion: ::ffff:0.0.0.0 for "any"
PCP_MAP_RESPONSE = Layout(
    ('version', 'B'), ('opcode', 'B'), ('reserved', 'B'), ('result', 'B'),
    ('lifetime', 'I'),                   # seconds granted (on error: how long it holds)
    ('epoch', 'I'), ('reserved2', '12s'),
    ('nonce', '12s'), ('protocol', 'B'), ('reserved3', '3s'),
    ('internal_port', 'H'),
    ('external_port', 'H'), ('external_address', '16s'))  # what the router gave us


@dataclass(frozen=True)
class Mapping:
    """A port the router forwards to us, until ``expires`` (time.monotonic())."""

    protocol: str           # PCP or NATPMP: who gave it
    transport: str          # 'udp' or 'tcp'
    internal_port: int
    external: tuple         # (address, port): where the internet reaches us
    lifetime: int           # seconds, as granted
    expires: float


def default_gateway(route_table='/proc/net/route'):
    """The IPv4 default gateway from the kernel's routing table, or None.

    Each line of /proc/net/route is interface, destination, gateway, flags,
    ..., metric, in hex, addresses in host (little-endian) byte order; the
    default route has destination 0.  With several, the lowest metric wins.
    """
    best = None
    try:
        with open(route_table) as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 7 or fields[1] != '00000000':
            continue
        if not int(fields[3], 16) & RTF_GATEWAY:
            continue
        gateway = socket.inet_ntoa(struct.pack('<I', int(fields[2], 16)))
        metric = int(fields[6])
        if best is None or metric < best[0]:
            best = (metric, gateway)
    return best and best[1]


def pcp_address(ip):
    """An IPv4 address as PCP carries it: 16 bytes, ::ffff:a.b.c.d."""
    return IPV4_MAPPED + socket.inet_aton(ip)


def ipv4_of(pcp_bytes):
    """The IPv4 address inside PCP's 16 bytes, or None when it is not IPv4-mapped."""
    if pcp_bytes[:12] != IPV4_MAPPED:
        return None
    return str(ipaddress.IPv4Address(pcp_bytes[12:]))


class Retry:
    """When to send a request (again): the protocol's retransmission schedule."""

    def __init__(self, protocol, now, renewing=False):
        self.protocol = protocol
        self.renewing = renewing
        self.at = now           # the next send
        self.interval = None

    def due(self, now):
        """True when the request should go out now."""
        return now >= self.at

    def sent(self, now):
        """Schedule the next send after one went out at ``now``."""
        if self.protocol == NATPMP:
            self.interval = min(2 * (self.interval or NATPMP_FIRST_RETRY / 2), NATPMP_MAX_RETRY)
        else:
            jitter = random.uniform(-PCP_RETRY_JITTER, PCP_RETRY_JITTER)
            base = min(2 * self.interval, PCP_MAX_RETRY) if self.interval else PCP_FIRST_RETRY
            self.interval = base * (1 + jitter)
            if self.renewing:
                self.interval = max(self.interval, PCP_RENEWAL_GAP)
        self.at = now + self.interval


class Lease:
    """One port we ask the router for: the requests, and the mapping it gave.

    ``lifetime`` is what we ask for; 0 while deleting.  ``retry`` is set
    while a request waits for its answer, ``mapping`` while the router
    forwards the port, ``error`` once it said no.
    """

    def __init__(self, transport, internal_port, lifetime):
        self.transport = transport
        self.internal_port = internal_port
        self.lifetime = lifetime
        self.nonce = secrets.token_bytes(NONCE_SIZE)    # kept for renew and delete (11.2)
        self.mapping = None
        self.error = None
        self.retry = None
        self.renew_at = None

    def ask(self, protocol, now, lifetime=None):
        """Start asking (again): now, then on the protocol's schedule."""
        if lifetime is not None:
            self.lifetime = lifetime
        self.retry = Retry(protocol, now, renewing=self.mapping is not None)
        self.error = None

    def request(self, protocol, client_ip):
        """This lease's MAP request in ``protocol``, from ``client_ip``."""
        old = self.mapping
        if protocol == NATPMP:
            # Deleting, the suggested port must be 0 (RFC 6886 section 3.4);
            # renewing, it is the port we hold (section 3.3); else our own.
            suggested = 0
            if self.lifetime:
                suggested = old.external[1] if old else self.internal_port
            return NATPMP_MAP_REQUEST.pack(
                version=NATPMP_VERSION, opcode=NATPMP_OPCODES[self.transport],
                internal_port=self.internal_port, external_port=suggested,
                lifetime=self.lifetime)
        return PCP_MAP_REQUEST.pack(
            version=PCP_VERSION, opcode=PCP_MAP, lifetime=self.lifetime,
            client_address=pcp_address(client_ip), nonce=self.nonce,
            protocol=PROTOCOLS[self.transport], internal_port=self.internal_port,
            # Renewing, suggest what we hold (RFC 6887 section 11.2.1).
            external_port=old.external[1] if old else 0,
            external_address=pcp_address(old.external[0]) if old else NO_ADDRESS)

    def matches_pcp(self, fields):
        """True when a PCP answer is to this lease's request: its nonce, port, protocol."""
        return (fields['nonce'] == self.nonce
                and fields['internal_port'] == self.internal_port
                and fields['protocol'] == PROTOCOLS[self.transport])

    def matches_natpmp(self, opcode):
        """True when a NAT-PMP answer's opcode is that of this lease's request."""
        return opcode == REPLY_BIT | NATPMP_OPCODES[self.transport]

    def granted(self, protocol, external, lifetime, now):
        """The router said yes: keep the mapping, and plan its renewal."""
        self.retry = None
        if self.lifetime == 0:          # that was our delete
            self.mapping = None
            return None
        if lifetime == 0:               # a "yes" that forwards nothing
            self.refused('the router granted no time')
            return None
        self.mapping = Mapping(protocol, self.transport, self.internal_port, external,
                               lifetime, now + lifetime)
        # RFC 6886 section 3.3: renew halfway.  RFC 6887 section 11.2.1:
        # at a random point between 1/2 and 5/8 of the lifetime, so that
        # clients do not renew in step.
        share = 0.5 if protocol == NATPMP else random.uniform(0.5, 0.625)
        self.renew_at = now + lifetime * share
        return self.mapping

    def refused(self, text):
        """The router said no: nothing is forwarded, and ``error`` says why."""
        self.retry = None
        self.mapping = None
        self.renew_at = None
        self.error = text

    def expire(self, now):
        """Drop the mapping if its lifetime ran out without a renewal."""
        if self.mapping and now >= self.mapping.expires:
            self.refused('the router did not answer our renewals')


class PortMapper:
    """Ask the default gateway to forward our ports; renew; delete on close.

    ``udp_port`` is the local port to map (the client's hole punching
    socket); ``tcp_port`` optionally a TCP one too.  ``protocol`` forces
    PCP or NATPMP (default: PCP, then NAT-PMP if the router knows only
    that).  The mapper has a socket of its own, connected to the gateway:
    the kernel then passes us the gateway's answers only, and tells us
    which of our addresses faces it (PCP requests must carry it, RFC 6887
    section 8.1).  ``server_port`` is for tests, whose stand-in router on
    loopback cannot own port 5351 on a shared machine.
    """

    def __init__(self, udp_port, tcp_port=None, gateway=None, lifetime=DEFAULT_LIFETIME,
                 protocol=None, server_port=SERVER_PORT):
        self.gateway = gateway or default_gateway()
        self.protocol = protocol or PCP
        self.fixed = protocol is not None
        self.leases = [Lease('udp', udp_port, lifetime)]
        if tcp_port:
            self.leases.append(Lease('tcp', tcp_port, lifetime))
        self.address_retry = None       # NAT-PMP's "external address?" while it waits
        self.external_address = None
        self.refused_port = False       # ICMP port unreachable: nobody listens on 5351
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        if self.gateway:
            self.sock.connect((self.gateway, server_port))
        self.client_ip = self.sock.getsockname()[0]

    @property
    def mapping(self):
        """The UDP port's Mapping, or None while the router forwards nothing."""
        return self.leases[0].mapping

    @property
    def tcp_mapping(self):
        """The TCP port's Mapping (None if not asked for, or not granted)."""
        return self.leases[1].mapping if len(self.leases) > 1 else None

    def fileno(self):
        """The socket to watch for the router's answers (for selectors)."""
        return self.sock.fileno()

    def map(self, timeout=START_TIMEOUT):
        """Ask for every port, blocking at most ``timeout`` s; the UDP Mapping or None.

        None: no router answered (or there is no default gateway).  Raises
        PortMapError when the router answered no.
        """
        if not self.gateway:
            return None
        now = time.monotonic()
        self.ask(now)
        self._wait(now + timeout)
        self._give_up()
        errors = [lease.error for lease in self.leases if lease.error]
        if self.mapping is None and errors:
            raise PortMapError('%s: %s' % (self.protocol, errors[0]))
        return self.mapping

    def ask(self, now):
        """Start asking for every port, without blocking: tick() sends, receive() hears."""
        for lease in self.leases:
            lease.ask(self.protocol, now)
        if self.protocol == NATPMP:
            self.address_retry = Retry(NATPMP, now)

    def tick(self, now):
        """Send what is due (renewals, retransmissions); return when to call again."""
        for lease in self.leases:
            lease.expire(now)
            if lease.renew_at is not None and now >= lease.renew_at:
                lease.renew_at = None
                lease.ask(self.protocol, now)
            if lease.retry and lease.retry.due(now):
                self._send(lease.request(self.protocol, self.client_ip))
                lease.retry.sent(now)
        if self.address_retry and self.address_retry.due(now):
            self._send(NATPMP_ADDRESS_REQUEST.pack(version=NATPMP_VERSION, opcode=NATPMP_ADDRESS))
            self.address_retry.sent(now)
        return self._next_wakeup()

    def receive(self, now):
        """Read the router's answers; return the Mappings they granted or renewed."""
        granted = []
        while True:
            try:
                data = self.sock.recv(MAX_REPLY + 1)
            except (BlockingIOError, InterruptedError):
                return granted
            except ConnectionRefusedError:
                # ICMP port unreachable: the gateway runs neither protocol.
                self.refused_port = True
                continue
            except OSError:
                return granted
            mapping = self._handle(data, now)
            if mapping:
                granted.append(mapping)

    def close(self, timeout=START_TIMEOUT):
        """Delete our mappings (lifetime 0), waiting at most ``timeout`` s; close the socket."""
        now = time.monotonic()
        self.address_retry = None
        deleting = [lease for lease in self.leases if lease.mapping]
        for lease in deleting:
            lease.ask(self.protocol, now, lifetime=0)
            lease.renew_at = None
        if deleting:
            self._wait(now + timeout)
        self.sock.close()

    # -- the answers ---------------------------------------------------------

    def _handle(self, data, now):
        """One datagram from the gateway: act on it, or ignore it if it is not ours."""
        if not data:
            return None
        if data[0] == NATPMP_VERSION and self.protocol == PCP:
            return self._pcp_unsupported(data, now)
        if data[0] == NATPMP_VERSION:
            return self._natpmp_answer(data, now)
        if data[0] == PCP_VERSION and self.protocol == PCP:
            return self._pcp_answer(data, now)
        return None

    def _pcp_answer(self, data, now):
        """A PCP MAP answer: match it to its lease by nonce, then take it."""
        fields = PCP_MAP_RESPONSE.unpack(data)
        if (fields is None or len(data) > MAX_REPLY or len(data) % 4
                or fields['opcode'] != REPLY_BIT | PCP_MAP):
            return None
        lease = next((lease for lease in self.leases
                      if lease.retry and lease.matches_pcp(fields)), None)
        if lease is None:               # a stray, a duplicate, or not for us
            return None
        if fields['result'] == UNSUPP_VERSION and not self.fixed:
            return self._fall_back(now)
        if fields['result']:
            lease.refused(PCP_RESULTS.get(fields['result'],
                                          'result code %d' % fields['result']))
            return None
        address = ipv4_of(fields['external_address'])
        if address is None:
            return None
        self.external_address = address
        return lease.granted(PCP, (address, fields['external_port']), fields['lifetime'], now)

    def _pcp_unsupported(self, data, now):
        """A version-0 answer to our PCP request: the router speaks NAT-PMP only.

        RFC 6887 section 9: a NAT-PMP router answers a PCP request with
        result 1, "unsupported version", in NAT-PMP's format.
        """
        fields = NATPMP_ERROR.unpack(data)
        if fields and fields['result'] == UNSUPP_VERSION and not self.fixed:
            return self._fall_back(now)
        return None

    def _fall_back(self, now):
        """Ask again, everything, in NAT-PMP."""
        self.protocol = NATPMP
        for lease in self.leases:
            if lease.retry:
                lease.ask(NATPMP, now)
        self.address_retry = Retry(NATPMP, now)
        return None

    def _natpmp_answer(self, data, now):
        """A NAT-PMP answer: the external address, or one of our mappings."""
        header = NATPMP_ERROR.unpack(data)     # what every answer starts with
        if header is None:
            return None
        if header['opcode'] == REPLY_BIT | NATPMP_ADDRESS:
            return self._natpmp_address(data)
        lease = next((lease for lease in self.leases
                      if lease.retry and lease.matches_natpmp(header['opcode'])), None)
        if lease is None:               # a stray, a duplicate, or not an answer
            return None
        if header['result']:            # an answer that says no may end after its header
            lease.refused(NATPMP_RESULTS.get(header['result'],
                                             'result code %d' % header['result']))
            return None
        answer = NATPMP_MAP_RESPONSE.unpack(data)
        if answer is None or answer['internal_port'] != lease.internal_port:
            return None
        external = (self.external_address, answer['external_port'])
        return lease.granted(NATPMP, external, answer['lifetime'], now)

    def _natpmp_address(self, data):
        """The answer to "what is your external address" (RFC 6886 section 3.2).

        It may come after the mapping's answer: then the mapping learns it too.
        """
        answer = NATPMP_ADDRESS_RESPONSE.unpack(data)
        if self.address_retry is None or answer is None:
            return None
        self.address_retry = None
        if answer['result']:            # the mapping still works; we just cannot say where
            return None
        self.external_address = socket.inet_ntoa(answer['external_address'])
        for lease in self.leases:
            if lease.mapping and lease.mapping.protocol == NATPMP:
                port = lease.mapping.external[1]
                lease.mapping = replace(lease.mapping, external=(self.external_address, port))
        return None

    # -- sending and waiting -------------------------------------------------

    def _send(self, data):
        """Send one request; a lost one is what the retransmissions are for."""
        try:
            self.sock.send(data)
        except ConnectionRefusedError:
            self.refused_port = True
        except OSError:
            pass

    def _next_wakeup(self):
        """The earliest time tick() has something to do (None: nothing planned)."""
        times = [lease.retry.at for lease in self.leases if lease.retry]
        times += [lease.renew_at for lease in self.leases if lease.renew_at is not None]
        times += [lease.mapping.expires for lease in self.leases if lease.mapping]
        if self.address_retry:
            times.append(self.address_retry.at)
        return min(times) if times else None

    def _waiting(self):
        """True while a request still waits for its answer (the address: for a mapping)."""
        if any(lease.retry for lease in self.leases):
            return True
        return bool(self.address_retry) and any(lease.mapping for lease in self.leases)

    def _wait(self, deadline):
        """Drive tick() and receive() until every request is answered, or ``deadline``."""
        now = time.monotonic()
        while now < deadline:
            wakeup = min(self.tick(now) or deadline, deadline)
            if not self._waiting() or self.refused_port:
                return
            select.select([self.sock], [], [], max(0.0, wakeup - now))
            self.receive(time.monotonic())
            now = time.monotonic()

    def _give_up(self):
        """Stop asking for what start-up did not get: no router answers it."""
        for lease in self.leases:
            if lease.mapping is None:
                lease.retry = None
        self.address_retry = None


class PortMapMixIn:
    """The client asks its router to forward its UDP port, and offers peers that port.

    Hole punching needs each NAT to take the other's packets for replies;
    a port the router forwards takes anyone's, whatever kind of NAT it is
    otherwise (a symmetric one too).  So at start-up, before REGISTER, the
    client asks the default gateway for its UDP port and for the TCP port
    of its first control connection, START_TIMEOUT at most; REGISTER then
    reports the mapped endpoint first among our private ones, and a peer
    punches it beside our public endpoint (punch.candidates: a port on our
    public address is our own NAT's).  The loop renews the mapping; when
    the loop ends (/quit, end of input, Ctrl-C) the mapping is deleted.

    TCP punching (tcppunch.py) pairs each of our private addresses that the
    peer punches with the one TCP port that INTRODUCE carries, our control
    connection's local port: so the router's TCP mapping is found where
    the router kept that port number, as miniupnpd does when it is free.

    Behind a carrier-grade NAT the router's external address is the CGN's
    inside, not the public address the server sees; offered all the same,
    it is punched by peers behind the same CGN (the same public address as
    ours: punch.candidates trusts them with our private endpoints), which
    reach it across the CGN's inside network, without a hairpin.
    """

    def __init__(self, *args, portmap=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.ask_at_register = portmap  # until the first REGISTER; False with --no-portmap
        self.mapper = None              # a PortMapper holding a mapping, else None

    def private_endpoints(self, link, route):
        """Ask the router at the first REGISTER; the mapped endpoint goes first.

        Once only: a reconnect, or a second server, does not wait again.
        A server on loopback is on this host, and so are its peers: no
        router is between us, and nobody is asked.
        """
        found = super().private_endpoints(link, route)
        if self.ask_at_register and not ipaddress.ip_address(route).is_loopback:
            self.ask_at_register = False
            self.ask_router(link)
        return list(dict.fromkeys(self.mapped_endpoints() + found))[:wire.MAX_ENDPOINTS]

    def ask_router(self, link):
        """Map our UDP port and link's TCP port; keep the mapper only if it got the UDP one."""
        mapper = PortMapper(self.udp.port, tcp_port=link.local[1])
        try:
            mapper.map(START_TIMEOUT)
        except PortMapError as error:
            self.say(f'the router would not forward a port to us: {error}')
        if mapper.mapping is None or mapper.mapping.external[0] is None:
            mapper.close()              # deletes a TCP mapping, if that alone was given
        else:
            self.mapper = mapper

    def mapped_endpoints(self):
        """The endpoint the router forwards to our UDP port, in a list; [] without one."""
        return [self.mapper.mapping.external] if self.mapper else []

    def our_public(self):
        """The mapped endpoint, and which protocol gave it, when the router forwards one."""
        if self.mapper is None:
            return super().our_public()
        mapped = self.mapper.mapping
        via = f'mapped by the router via {mapped.protocol}'
        if mapped.external[0] == self.mapping.public[0]:
            return f'{wire.format_endpoint(mapped.external)} ({via})'
        # The router is behind another NAT (a CGN), which the server sees:
        # the mapping reaches us from that NAT's inside only.
        return (f'{wire.format_endpoint(self.mapping.public)} ({self.mapping.describe()}; '
                f'{via} at {wire.format_endpoint(mapped.external)}, inside another NAT)')

    def start(self):
        """Watch the router's answers from the loop; a start that fails deletes the mapping."""
        try:
            super().start()
        except BaseException:           # Fatal, or Ctrl-C: the mapping must not outlive us
            self.close_portmap()
            raise
        if self.mapper is not None:
            self.selector.register(self.mapper, selectors.EVENT_READ, self.router_answered)

    def run(self, stdin_fd=0):
        """However the loop ends (/quit, end of input, Ctrl-C), delete the mapping."""
        try:
            super().run(stdin_fd)
        finally:
            self.close_portmap()

    def check_timers(self, now):
        """Renew the mapping when due (halfway through its lifetime)."""
        super().check_timers(now)
        if self.mapper is not None:
            self.mapper.tick(now)
            self.router_checked()

    def router_answered(self, sock, mask):
        """The router's answers to our renewals: say so if our endpoint moved."""
        before = self.mapper.mapping.external
        for mapping in self.mapper.receive(time.monotonic()):
            if mapping.transport == 'udp' and mapping.external != before:
                self.say(f'the router now forwards {wire.format_endpoint(mapping.external)} '
                         f'to us (peers introduced from now on may still try the old one)')
        self.router_checked()

    def router_checked(self):
        """Say so once when the router stops forwarding our port, and stop asking."""
        if self.mapper.mapping is None:
            self.say(f'the router no longer forwards a port to us: {self.mapper.leases[0].error}')
            self.close_portmap()

    def close_portmap(self):
        """Delete our mappings (the router answers within START_TIMEOUT, or we go anyway)."""
        if self.mapper is None:
            return
        try:
            self.selector.unregister(self.mapper)
        except KeyError:
            pass                        # start() failed before it was registered
        self.mapper.close()
        self.mapper = None
