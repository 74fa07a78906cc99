"""The wire format shared by the rendezvous server and the peers.

The article's listings included a header, ``p2pcommon.h``, that readers
noticed was missing from the tarball.  This module is that header: the
constants and the packet layouts that ``rendezvous.py``, ``punch.py`` and
``p2pclient.py`` agree on.

Every message is a fixed 8-byte header followed by a payload::

     0       1       2       3       4       5       6       7
    +-------+-------+-------+-------+-------+-------+-------+-------+
    |     magic     |version| type  | flags |reserved|   length    |
    +-------+-------+-------+-------+-------+-------+-------+-------+
    |                payload (length bytes) ...                     |

All integers are in network byte order.  The flags say whether a message
is a reply from the server and whether it is hole punching traffic, which
the receiver bounces back, or regular traffic, which it processes (article
point 8).  Each message type's payload is a table of (field, format) pairs
in ``LAYOUTS`` below: that table *is* the wire diagram.  On the TCP control
connection the header's length field frames the messages; over UDP one
datagram carries one message.
"""

import functools
import ipaddress
import selectors
import socket
import struct

__version__ = '0.1.0'   # of p2pnat: setup.cfg and both programs' --version read it here

MAGIC = 0x5032          # "P2"
VERSION = 3             # 3: peer messages carry a MAC, not the session token
DEFAULT_PORT = 7777     # TCP and UDP; the server probes mappings on PORT + 1

HEADER = struct.Struct('!HBBBxH')
HEADER_SIZE = HEADER.size

# A datagram this small is never fragmented on any real path (IPv6's
# minimum MTU is 1280), and fragments are what NATs lose first.
MAX_DATAGRAM = 1200
MAX_PAYLOAD = 65535     # the largest length the header can say (TCP frames)
MAX_NAME = 32           # bytes of UTF-8
MAX_TEXT = 1000         # bytes of UTF-8 in one chat message or error text
MAX_ENDPOINTS = 16      # private endpoints one peer may report
MAX_PEERS_LISTED = 1000

TOKEN_SIZE = 16         # session and registration tokens, from secrets
NO_SESSION = bytes(TOKEN_SIZE)
PROOF_SIZE = 16         # proof of a name's secret, in REGISTER (identity.py)
SESSION_ID_SIZE = 8     # names a session on the peer path; derived from its token
MAC_SIZE = 8            # the last bytes of every peer message (identity.py)
NO_MAC = bytes(MAC_SIZE)
NONCE_SIZE = 16         # a TCP punch's challenge

# Flags (article point 8).
FLAG_REPLY = 0x01       # sent by the server in answer to a peer
FLAG_PUNCHING = 0x02    # hole punching traffic: bounce it back (PUNCH, KEEPALIVE)
KNOWN_FLAGS = FLAG_REPLY | FLAG_PUNCHING

# Message types.  1-15: control connection (TCP) and mapping (UDP) between
# a peer and the server; 16 and up: UDP between two peers.
REGISTER = 1
REGISTERED = 2
ERROR = 3
MAPPING = 4
LIST = 5
PEERS = 6
CONNECT = 7
INTRODUCE = 8
RELAY = 9
BYE = 10
ASK = 11
DECLINE = 12
ALIVE = 13
PUNCH = 16
PUNCH_ACK = 17
DATA = 18
ACK = 19
KEEPALIVE = 20
OFFER = 21
ANSWER = 22
CHUNK = 23
CHUNK_ACK = 24
END = 25
FINISH = 26
CANCEL = 27
CHALLENGE = 28
GOODBYE = 29

# ERROR codes.
E_BAD_MESSAGE = 1
E_NAME_TAKEN = 2
E_UNKNOWN_PEER = 3
E_NOT_REGISTERED = 4
E_ALREADY_REGISTERED = 5
E_NOT_INTRODUCED = 6
E_TOO_MANY = 7
E_RATE_LIMITED = 8

# DECLINE's why.
DECLINED = 0
NO_ANSWER = 1

# Addresses inside payloads are XORed with this key, as STUN's
# XOR-MAPPED-ADDRESS does: some NATs "helpfully" rewrite any four bytes
# that equal their private address, which would corrupt our payloads
# (Ford, Srisuresh and Kegel, section 3.6).
XOR_PORT = 0x2112
XOR_ADDRESS = bytes.fromhex('2112a442') * 4


class ProtocolError(ValueError):
    """A message that breaks the wire format; the text names the field."""


class FramingError(ProtocolError):
    """A TCP stream whose message boundaries are lost: close the connection."""


# ---------------------------------------------------------------------------
# Field formats.  A format is either a struct code ('H', '16s', ...) or one
# of the small codecs below for the variable-sized fields.


class Name:
    """A peer's name: length byte + 1-32 bytes of printable UTF-8, no spaces."""

    def pack(self, value):
        """Return the encoded name, after checking the name rules."""
        data = value.encode('utf-8')
        check_name(value, len(data))
        return bytes([len(data)]) + data

    def unpack(self, buf, offset, field):
        """Decode a name at offset; return (name, next offset)."""
        data, offset = _take_counted(buf, offset, 1, field)
        try:
            value = data.decode('utf-8')
        except UnicodeDecodeError:
            raise ProtocolError(f'{field}: not UTF-8: {data!r}') from None
        check_name(value, len(data), field)
        return value, offset


class Text:
    """Free text (chat, error messages): 2-byte length + UTF-8."""

    def pack(self, value):
        """Return the encoded text."""
        data = value.encode('utf-8')
        if len(data) > MAX_TEXT:
            raise ProtocolError(f'text: {len(data)} bytes, more than {MAX_TEXT}')
        return struct.pack('!H', len(data)) + data

    def unpack(self, buf, offset, field):
        """Decode text at offset; return (text, next offset)."""
        data, offset = _take_counted(buf, offset, 2, field)
        if len(data) > MAX_TEXT:
            raise ProtocolError(f'{field}: {len(data)} bytes, more than {MAX_TEXT}')
        try:
            return data.decode('utf-8'), offset
        except UnicodeDecodeError:
            raise ProtocolError(f'{field}: not UTF-8: {data[:40]!r}') from None


class Blob:
    """Opaque bytes, 2-byte length: a whole message carried inside RELAY."""

    def pack(self, value):
        """Return the length-prefixed bytes."""
        return struct.pack('!H', len(value)) + bytes(value)

    def unpack(self, buf, offset, field):
        """Return (bytes, next offset)."""
        return _take_counted(buf, offset, 2, field)


class Endpoint:
    """An (IP address, port) pair, IPv4 or IPv6, always 19 bytes on the wire.

    family (1 byte: 4 or 6), port XOR 0x2112 (2 bytes), address XOR key
    (16 bytes; an IPv4 address uses the first 4 and zeros after).  A fixed
    size keeps the MAPPING reply exactly as large as its request.
    """

    SIZE = 19
    layout = struct.Struct('!BH16s')

    def pack(self, value):
        """Encode an (address string, port) pair."""
        host, port = value[0], value[1]
        if not 0 <= port <= 65535:
            raise ProtocolError(f'endpoint: port {port} out of range')
        ip = ipaddress.ip_address(host)
        raw = ip.packed.ljust(16, b'\0')
        return self.layout.pack(ip.version, port ^ XOR_PORT, _xor(raw))

    def unpack(self, buf, offset, field):
        """Decode an endpoint at offset; return ((host, port), next offset)."""
        if len(buf) - offset < self.SIZE:
            raise ProtocolError(f'{field}: truncated endpoint')
        family, port, raw = self.layout.unpack_from(buf, offset)
        raw = _xor(raw)
        if family == 4 and raw[4:] == bytes(12):
            host = str(ipaddress.IPv4Address(raw[:4]))
        elif family == 6:
            host = str(ipaddress.IPv6Address(raw))
        else:
            raise ProtocolError(f'{field}: bad address family {family}')
        return (host, port ^ XOR_PORT), offset + self.SIZE


class ListOf:
    """A count (struct format ``count``) and that many items of one codec."""

    def __init__(self, item, count, limit, what):
        self.item = item
        self.count = struct.Struct('!' + count)
        self.limit = limit
        self.what = what            # 'endpoints', 'names': for error messages

    def pack(self, value):
        """Encode a list of items."""
        if len(value) > self.limit:
            raise ProtocolError(f'{self.what}: {len(value)}, more than {self.limit}')
        return self.count.pack(len(value)) + b''.join(self.item.pack(v) for v in value)

    def unpack(self, buf, offset, field):
        """Decode the list; return (list, next offset)."""
        if len(buf) - offset < self.count.size:
            raise ProtocolError(f'{field}: missing count')
        (count,) = self.count.unpack_from(buf, offset)
        if count > self.limit:
            raise ProtocolError(f'{field}: {count} {self.what}, more than {self.limit}')
        offset += self.count.size
        items = []
        for i in range(count):
            item, offset = self.item.unpack(buf, offset, f'{field}[{i}]')
            items.append(item)
        return items, offset


NAME, TEXT, BLOB, ENDPOINT = Name(), Text(), Blob(), Endpoint()
ENDPOINTS = ListOf(ENDPOINT, 'B', MAX_ENDPOINTS, 'endpoints')
NAMES = ListOf(NAME, 'H', MAX_PEERS_LISTED, 'names')
TOKEN = f'{TOKEN_SIZE}s'
PROOF = f'{PROOF_SIZE}s'
SESSION_ID = f'{SESSION_ID_SIZE}s'
MAC = f'{MAC_SIZE}s'
NONCE = f'{NONCE_SIZE}s'
SACK_BYTES = 64         # bitmap of the 512 messages after the cumulative ACK
SACK = f'{SACK_BYTES}s'
SHA256 = '32s'


def peer_layout(*fields):
    """A peer message: which session, the sender's count, the fields, the MAC.

    The session token itself never travels between the peers: the session
    id is derived from it, and the MAC (keyed from it, identity.py) proves
    that the sender holds it.  The counter grows with every message a peer
    sends, so a copy replayed from elsewhere is never newer than the last
    one accepted.
    """
    return [('session', SESSION_ID), ('counter', 'Q'), *fields, ('mac', MAC)]


# ---------------------------------------------------------------------------
# The wire diagram: one table per message type, field name next to format.

LAYOUTS = {
    # Control connection, peer -> server (article points 2 and 4).
    REGISTER:   [('name', NAME), ('private', ENDPOINTS),
                 ('tcp_port', 'H'),              # our end of this connection: TCP punching
                 ('proof', PROOF)],              # that we hold the name's secret
    LIST:       [],
    CONNECT:    [('target', NAME)],              # "introduce us", or yes to an ASK
    # No to NAME's ASK; as a reply (FLAG_REPLY), the end of our own CONNECT
    # to NAME, which NAME declined or left unanswered ('why' says which).
    DECLINE:    [('name', NAME), ('why', 'B')],
    # Control connection, server -> peer.
    REGISTERED: [('token', TOKEN)],   # ties our UDP MAPPING to this registration
    ERROR:      [('code', 'H'), ('text', TEXT)],
    PEERS:      [('names', NAMES)],
    # NAME asks to connect to us: we answer CONNECT (yes) or DECLINE.  As a
    # reply (FLAG_REPLY), the answer to our own CONNECT: NAME was asked.
    ASK:        [('name', NAME)],
    INTRODUCE:  [('name', NAME),                 # who the other peer is
                 ('session', TOKEN),             # the pair's secret: keys the MACs
                 ('role', 'B'),                  # 0: we asked first, 1: we answered
                 ('public', ENDPOINT),           # as the server saw it (point 3)
                 ('port_delta', 'h'),            # mapping change, for prediction (point 6)
                 ('private', ENDPOINTS),         # as the peer reported them (point 10)
                 ('tcp_public', ENDPOINT),       # its control connection, as the server saw it
                 ('tcp_port', 'H')],             # and that connection's local port
    # Either way on the control connection: peer traffic the server relays
    # between the two peers of a session (point 11), goodbye, and a
    # keepalive that the server answers (FLAG_REPLY), which keeps the NAT's
    # TCP mapping alive and tells the client that the server still hears it.
    # A RELAY with an empty message, from the server, says that the other
    # peer's control connection closed: the relay of that session is gone
    # (a direct path is not: only the peer's own GOODBYE ends it).
    RELAY:      [('session', TOKEN), ('message', BLOB)],
    BYE:        [],                  # to the server: "I am leaving"
    ALIVE:      [],
    # UDP, peer -> server and back (point 3).  The request carries 19 zero
    # bytes so that the reply, which fills them with the peer's public
    # endpoint, is never larger than the request: no amplification.
    MAPPING:    [('token', TOKEN), ('public', ENDPOINT)],
    # Peer <-> peer, over UDP, a punched TCP connection or the relay
    # (points 5, 8, 9), each sealed with the session's MAC.  A PUNCH over
    # TCP answers the other side's CHALLENGE by echoing its nonce.
    CHALLENGE:  [('nonce', NONCE)],
    PUNCH:      peer_layout(('nonce', NONCE)),
    PUNCH_ACK:  peer_layout(),
    DATA:       peer_layout(('seq', 'I'), ('oldest', 'I'), ('text', TEXT)),
    ACK:        peer_layout(('seq', 'I'), ('sack', SACK)),
    KEEPALIVE:  peer_layout(),
    GOODBYE:    peer_layout(),              # the peer leaves the session
    # File transfer, peer <-> peer (the article's future work).  OFFER and
    # END are repeated until ANSWER and FINISH come back; chunks ride the
    # same reliable layer as chat, with a congestion window.
    OFFER:      peer_layout(('transfer', 'I'), ('size', 'Q'), ('sha256', SHA256),
                            ('name', TEXT)),
    ANSWER:     peer_layout(('transfer', 'I'), ('accept', 'B')),
    CHUNK:      peer_layout(('transfer', 'I'), ('seq', 'I'), ('oldest', 'I'), ('data', BLOB)),
    CHUNK_ACK:  peer_layout(('transfer', 'I'), ('seq', 'I'), ('sack', SACK)),
    END:        peer_layout(('transfer', 'I')),             # all chunks acknowledged
    FINISH:     peer_layout(('transfer', 'I'), ('ok', 'B'), ('text', TEXT)),
    CANCEL:     peer_layout(('transfer', 'I'), ('text', TEXT)),   # the sender stops
}

TYPE_NAMES = {
    REGISTER: 'REGISTER', REGISTERED: 'REGISTERED', ERROR: 'ERROR',
    MAPPING: 'MAPPING', LIST: 'LIST', PEERS: 'PEERS', CONNECT: 'CONNECT',
    INTRODUCE: 'INTRODUCE', RELAY: 'RELAY', BYE: 'BYE', ASK: 'ASK', DECLINE: 'DECLINE',
    ALIVE: 'ALIVE', PUNCH: 'PUNCH', PUNCH_ACK: 'PUNCH_ACK', DATA: 'DATA', ACK: 'ACK',
    KEEPALIVE: 'KEEPALIVE', OFFER: 'OFFER', ANSWER: 'ANSWER', CHUNK: 'CHUNK',
    CHUNK_ACK: 'CHUNK_ACK', END: 'END', FINISH: 'FINISH', CANCEL: 'CANCEL',
    CHALLENGE: 'CHALLENGE', GOODBYE: 'GOODBYE',
}

# Messages that travel between two peers, sealed with a session's MAC
# (every layout made by peer_layout).
PEER_TYPES = frozenset({PUNCH, PUNCH_ACK, DATA, ACK, KEEPALIVE, GOODBYE,
                        OFFER, ANSWER, CHUNK, CHUNK_ACK, END, FINISH, CANCEL})
# Hole punching traffic, which the receiver bounces back as PUNCH_ACK
# (point 8).  A KEEPALIVE is a punch too: its bounce refreshes the mapping
# on the sender's side as well, and tells the sender that the path lives.
PUNCHING_TYPES = frozenset({PUNCH, KEEPALIVE})
# The bounce is the reply to a punching request (point 8): its reply flag
# tells the punch's sender that the path works both ways, its punch out
# and the bounce back.
REPLY_TYPES = frozenset({PUNCH_ACK})


class Message:
    """One decoded message: its type, flags and payload fields as attributes."""

    def __init__(self, type, flags=0, **fields):
        self.type = type
        self.flags = flags
        self.fields = fields
        self.__dict__.update(fields)

    @property
    def name_of_type(self):
        """The type's name, for logs."""
        return TYPE_NAMES.get(self.type, str(self.type))

    def __repr__(self):
        fields = ', '.join(f'{k}={v!r}' for k, v in self.fields.items())
        return f'{self.name_of_type}({fields})'

    def __eq__(self, other):
        return (isinstance(other, Message) and
                (self.type, self.flags, self.fields) ==
                (other.type, other.flags, other.fields))


def encode(type, flags=0, **fields):
    """Pack one message: header plus the payload in its layout's order."""
    if type in PUNCHING_TYPES:
        flags |= FLAG_PUNCHING
    if type in REPLY_TYPES:
        flags |= FLAG_REPLY
    payload = b''.join(_pack_field(fmt, fields[name]) for name, fmt in LAYOUTS[type])
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f'payload: {len(payload)} bytes, more than {MAX_PAYLOAD}')
    return HEADER.pack(MAGIC, VERSION, type, flags, len(payload)) + payload


def reply(type, **fields):
    """Pack a message from the server to a peer (FLAG_REPLY set)."""
    return encode(type, FLAG_REPLY, **fields)


def decode(data):
    """Unpack one whole message (a datagram, or one TCP frame).

    Raises ProtocolError, naming the field, for anything malformed.
    """
    type, flags, length = parse_header(data)
    if len(data) != HEADER_SIZE + length:
        raise ProtocolError(
            f'length: header says {length} payload bytes, got {len(data) - HEADER_SIZE}')
    message = decode_payload(type, flags, memoryview(data)[HEADER_SIZE:])
    message.raw = bytes(data)       # what a peer message's MAC covers
    return message


def parse_header(data):
    """Check the fixed header; return (type, flags, payload length)."""
    if len(data) < HEADER_SIZE:
        raise FramingError(f'header: truncated, {len(data)} of {HEADER_SIZE} bytes')
    magic, version, type, flags, length = HEADER.unpack_from(data)
    _check_stream(magic, version)
    if type not in LAYOUTS:
        raise ProtocolError(f'type: unknown message type {type}')
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f'flags: unknown bits 0x{flags:02x}')
    return type, flags, length


def decode_payload(type, flags, payload):
    """Unpack the payload of a message whose header has been checked."""
    payload = bytes(payload)
    fields = {}
    offset = 0
    for name, fmt in LAYOUTS[type]:
        fields[name], offset = _unpack_field(fmt, payload, offset, name)
    if offset != len(payload):
        raise ProtocolError(
            f'length: {len(payload) - offset} bytes after the last field of '
            f'{TYPE_NAMES[type]}')
    return Message(type, flags, **fields)


class FrameReader:
    """Reassembles messages from a TCP byte stream.

    TCP delivers bytes, not messages: one recv() may hold half a message or
    several.  The fixed header's length field says where each one ends, so
    that field is the frame's length prefix.
    """

    def __init__(self, max_length=MAX_PAYLOAD):
        self.buffer = bytearray()
        self.max_length = max_length

    def feed(self, data):
        """Add received bytes to the buffer."""
        self.buffer += data

    def frames(self):
        """Yield each complete frame (header and payload) in the buffer.

        Raises FramingError when the stream cannot be resynchronised: bad
        magic, another version, or a length over max_length.  The caller
        then closes the connection.  Any other fault (an unknown type, a bad
        field) is inside one frame, which decode() reports, and the stream
        stays in step.
        """
        while len(self.buffer) >= HEADER_SIZE:
            magic, version, _, _, length = HEADER.unpack_from(self.buffer)
            _check_stream(magic, version)
            if length > self.max_length:
                raise FramingError(f'length: {length}, more than {self.max_length}')
            end = HEADER_SIZE + length
            if len(self.buffer) < end:
                return
            frame = bytes(self.buffer[:end])
            del self.buffer[:end]
            yield frame

    @property
    def pending(self):
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self.buffer)


def _check_stream(magic, version):
    """Raise FramingError unless this is our protocol, our version."""
    if magic != MAGIC:
        raise FramingError(f'magic: 0x{magic:04x}, expected 0x{MAGIC:04x}')
    if version != VERSION:
        raise FramingError(f'version: {version}, expected {VERSION}')


class FramedStream:
    """A non-blocking TCP connection of framed messages, served by a selector loop.

    ``on_message(message)`` is called for each message that arrives and
    ``on_closed(why)`` once, when the connection fails or the other side
    closes it (not when we close it ourselves).
    """

    def __init__(self, sock, selector, on_message, on_closed, reader=None):
        sock.setblocking(False)
        # Each message is written whole, and a chat line should go at once:
        # Nagle's algorithm would hold it back until the previous segment
        # is acknowledged, a whole round trip after a punch was proven.
        if sock.family != socket.AF_UNIX:      # a local socket pair has no Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.selector = selector
        self.on_message = on_message
        self.on_closed = on_closed
        self.reader = reader or FrameReader()
        self.output = bytearray()
        selector.register(sock, selectors.EVENT_READ, self.ready)

    @property
    def open(self):
        """True until the connection is closed."""
        return self.sock is not None

    def send(self, data):
        """Queue encoded messages; they go out as the socket takes them."""
        if self.sock is not None:
            self.output += data
            self.flush()

    def flush(self):
        """Write what the socket takes now; the loop writes the rest later."""
        if self.sock is None:
            return      # closed by an earlier event of the same select()
        try:
            del self.output[:self.sock.send(self.output)]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as error:
            self.close(error.strerror)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.output else 0)
        self.selector.modify(self.sock, events, self.ready)

    def ready(self, sock, mask):
        """Called by the loop: write what is queued, read what came."""
        if mask & selectors.EVENT_WRITE:
            self.flush()
        if self.sock is None or not mask & selectors.EVENT_READ:
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self.close(error.strerror)
            return
        if not data:
            self.close('it closed the connection')
            return
        self.reader.feed(data)
        try:
            for frame in self.reader.frames():
                self.on_message(decode(frame))
                if self.sock is None:
                    return
        except ProtocolError as error:
            self.close(f'it sent a bad message ({error})')

    def close(self, why=None):
        """Close the connection; with a reason, tell on_closed."""
        if self.sock is None:
            return
        self.selector.unregister(self.sock)
        self.sock.close()
        self.sock = None
        if why:
            self.on_closed(why)


# ---------------------------------------------------------------------------
# Names and addresses.


def check_name(name, size=None, field='name'):
    """Raise ProtocolError unless name is 1-32 bytes, printable, no whitespace."""
    size = len(name.encode('utf-8')) if size is None else size
    if not 1 <= size <= MAX_NAME:
        raise ProtocolError(f'{field}: {size} bytes, must be 1 to {MAX_NAME}: {name!r}')
    if not name.isprintable() or any(c.isspace() for c in name):
        raise ProtocolError(f'{field}: must be printable with no spaces: {name!r}')


def safe(text):
    """Text from the network, with control characters shown as escapes.

    Nothing a peer (or a server) sends may move our cursor, clear our
    screen or start a line that looks like one of our own status lines.
    """
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_endpoint(endpoint):
    """'203.0.113.2:40000' or '[2001:db8::2]:40000', for people."""
    host, port = endpoint[0], endpoint[1]
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def parse_endpoint(text, default_port=DEFAULT_PORT):
    """Parse 'HOST', 'HOST:PORT' or '[V6]:PORT' into (host, port)."""
    host, port = text, default_port
    if text.startswith('['):
        host, bracket, rest = text[1:].partition(']')
        if not bracket or (rest and not rest.startswith(':')):
            raise ValueError(f'bad endpoint {text!r}: expected [IPV6]:PORT')
        port = rest[1:] if rest else default_port
    elif text.count(':') == 1:
        host, port = text.split(':')
    try:
        port = int(port)
    except ValueError:
        raise ValueError(f'bad port in {text!r}') from None
    if not host or not 0 < port < 65536:
        raise ValueError(f'bad endpoint {text!r}: expected HOST[:PORT]')
    return host, port


def same_endpoint(a, b):
    """Compare two socket addresses by host and port only.

    IPv6 socket addresses are 4-tuples (flowinfo, scope id); we compare the
    parts that the wire carries.
    """
    return (ipaddress.ip_address(a[0]), a[1]) == (ipaddress.ip_address(b[0]), b[1])


def family_of(host):
    """socket.AF_INET or AF_INET6 for an address string."""
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def plain(address):
    """(host, port) of a socket address, an IPv4-mapped IPv6 one as IPv4.

    A dual-stack IPv6 socket reports an IPv4 peer as '::ffff:203.0.113.5';
    on the wire and on screen it is 203.0.113.5.
    """
    return plain_host(address[0]), address[1]


@functools.lru_cache(maxsize=1024)
def plain_host(host):
    """The host part of plain(): parsed once per peer, not once per datagram."""
    ip = ipaddress.ip_address(host)
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


RECEIVE_BUFFER = 1 << 21     # bytes asked for a UDP socket's receive buffer


class UDPSocket:
    """One UDP socket for IPv6 and IPv4 alike, speaking in plain endpoints.

    An IPv6 socket with IPV6_V6ONLY off also sends and receives IPv4, as
    '::ffff:a.b.c.d'; this wrapper hides that spelling.  Where the system
    has no IPv6, it is a plain IPv4 socket.
    """

    def __init__(self, port=0, bind=None):
        try:
            self.sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except OSError:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        # A file arrives at up to ~10,000 datagrams a second: the default
        # buffer (about 90 of them) overflows whenever the scheduler looks
        # away for 10 ms.  The kernel caps this at net.core.rmem_max.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        if bind and self.dual and ':' not in bind:
            bind = '::ffff:' + bind
        try:
            self.sock.bind((bind or ('::' if self.dual else '0.0.0.0'), port))
        except OSError:
            self.sock.close()
            raise

    @property
    def dual(self):
        """True when this socket speaks IPv6 as well as IPv4."""
        return self.sock.family == socket.AF_INET6

    def sendto(self, data, endpoint):
        """Send one datagram to (host, port), IPv4 or IPv6."""
        host, port = endpoint[0], endpoint[1]
        if self.dual and ':' not in host:
            host = '::ffff:' + host
        return self.sock.sendto(data, (host, port))

    def recvfrom(self, size):
        """Receive one datagram; return (data, (host, port))."""
        data, source = self.sock.recvfrom(size)
        return data, plain(source)

    @property
    def port(self):
        """Our local UDP port."""
        return self.sock.getsockname()[1]

    def fileno(self):
        """For select() and selectors."""
        return self.sock.fileno()

    def setblocking(self, flag):
        """As socket.setblocking."""
        self.sock.setblocking(flag)

    def close(self):
        """Close the socket."""
        self.sock.close()


# ---------------------------------------------------------------------------


def _pack_field(fmt, value):
    if isinstance(fmt, str) and fmt.endswith('s') and not (
            isinstance(value, (bytes, bytearray)) and len(value) == struct.calcsize(fmt)):
        # struct would pad or cut it without a word: a token where a
        # session id belongs would go out half, and silently.
        raise ProtocolError(f'{fmt}: needs {struct.calcsize(fmt)} bytes, got {value!r:.40}')
    if isinstance(fmt, str):
        try:
            return struct.pack('!' + fmt, value)
        except struct.error as error:
            raise ProtocolError(f'{fmt}: {error}') from None
    return fmt.pack(value)


def _unpack_field(fmt, buf, offset, field):
    if isinstance(fmt, str):
        size = struct.calcsize('!' + fmt)
        if len(buf) - offset < size:
            raise ProtocolError(f'{field}: truncated, needs {size} bytes')
        (value,) = struct.unpack_from('!' + fmt, buf, offset)
        return value, offset + size
    return fmt.unpack(buf, offset, field)


def _take_counted(buf, offset, count_size, field):
    """Read a count of count_size bytes, then that many bytes."""
    if len(buf) - offset < count_size:
        raise ProtocolError(f'{field}: truncated length')
    count = int.from_bytes(buf[offset:offset + count_size], 'big')
    start = offset + count_size
    if len(buf) - start < count:
        raise ProtocolError(f'{field}: says {count} bytes, only {len(buf) - start} left')
    return bytes(buf[start:start + count]), start + count


def _xor(raw):
    return bytes(a ^ b for a, b in zip(raw, XOR_ADDRESS))
