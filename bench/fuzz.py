"""Fuzz the real rendezvous server while real peers chat through it; fuzz the client in-process.

    python bench/fuzz.py [--datagrams 100000] [--frames 10000] [--seed 1]
                         [--no-peers] [--client-units N]

Starts ``rendezvous.py`` on a free loopback port pair with its default
limits, and three real ``p2pclient.py`` peers: ``chat-a`` and ``chat-b``,
connected to each other, and ``witness``.  Then, at the same time:

* one thread sends fuzzed UDP datagrams to the server's two UDP ports:
  first the boundary sweep (every field of every message type at each edge
  of its format: integers at 0, 1, max-1, max and where the sign wraps;
  sizes and counts one off, at 0, at the limit and one over; header
  lengths one off), then random bytes and broken copies of a valid message
  of every type (bit flips, truncation, lengths that lie, wrong versions,
  huge names, invalid UTF-8, bad address families, ...);
* a few threads send fuzzed TCP frames over many control connections, from
  one frame to a few hundred per connection, the boundary sweep first; half
  of them register first, so that the handlers behind registration get
  garbage too, and some are pairs that the server introduced, whose RELAY
  frames carry broken peer messages that name the session;
* the main thread checks, every second, that a line typed by chat-a
  arrives at chat-b (or back), and every five seconds that a new client
  can register, connect to witness and talk to it.  ``--no-peers`` leaves
  the peers out: the server alone under fuzz.

All traffic is to and from 127.0.0.0/8.  The fuzz comes from addresses
127.0.1.x and 127.0.2.x, not from the peers' 127.0.0.1: the server's limits
are per source address, and what is measured here is whether garbage
breaks the server, not whether one address can use up its own allowance.

At the end the server gets SIGTERM, which makes it log its summary of
dropped datagrams, and a table of counts is printed.  Exit status 1 if the
server crashed (a Traceback in its log, or it exited), a chat line was
lost, or a new client could not register and connect; 0 otherwise.

``--client-units N`` first feeds N peer messages, sealed with the
session's MAC so that they reach the code behind the check, to the
client's chat channel and file transfers in-process (see ClientUnit), and
exits 1 if any of them raised.  ``--client-control N`` then feeds the
client, in-process, N messages from a hostile rendezvous server (into a
real Client's handle_control), N frames from strangers on a punched TCP
connection (into a real TcpPunch on loopback) and N hostile answers to
REGISTER (into ServerLink.wait_registered): see fuzz_client.py.  With
``--datagrams 0 --frames 0 --no-peers`` that is all it does: no server.
"""

import argparse
import collections
import functools
import os
import platform
import queue
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]
import identity  # noqa: E402
import p2pcommon as wire  # noqa: E402
import transfer  # noqa: E402
from common import encode, zero_value  # noqa: E402
from procs import command, start, start_server  # noqa: E402  (the tests' driver)
from reliable import WINDOW, ReliableChannel  # noqa: E402

HOST = '127.0.0.1'
# Fuzz sources: not the peers' address (see the module docstring).
UDP_SOURCES = [f'127.0.1.{i}' for i in range(1, 17)]
TCP_SOURCES = [f'127.0.2.{i}' for i in range(1, 65)]
CHAT_A, CHAT_B, WITNESS = 'chat-a', 'chat-b', 'witness'
# Names the fuzzer registers, connects to, or collides with: the real ones
# too, so that "name taken" and "unknown peer" paths see the live names.
NAMES = ['mallory', 'x', 'x' * 32, 'ñandú', '名前', CHAT_A, CHAT_B, WITNESS]
V4 = ('198.51.100.7', 4000)
V6 = ('2001:db8::7', 4001)
CONNECTED = r'^\* connected to {} (at |\()'
HARD_LIMIT = 1800.0     # seconds: the whole run stops by itself even if stuck


# ---------------------------------------------------------------------------
# Field formats by kind.  The codecs are found by the module's instances
# (wire.NAME, wire.ENDPOINTS, ...) that LAYOUTS uses, not by their classes,
# which the protocol's authors rename and merge as it grows.
CODECS = [('name', 'NAME'), ('text', 'TEXT'), ('blob', 'BLOB'), ('endpoint', 'ENDPOINT'),
          ('endpoints', 'ENDPOINTS'), ('names', 'NAMES')]


def kind_of(fmt):
    """'struct' for a struct code, 'name', 'text', 'endpoints', ... for a codec."""
    if isinstance(fmt, str):
        return 'struct'
    for kind, codec in CODECS:
        if fmt is getattr(wire, codec, None):
            return kind
    return 'other'


# Messages as lists of raw fields, so that one field at a time can be broken
# while the header still tells the truth about the payload's length.

class Raw:
    """One message under construction: header fields and raw payload fields."""

    def __init__(self, type, flags, fields):
        self.magic = wire.MAGIC
        self.version = wire.VERSION
        self.type = type
        self.flags = flags
        self.fields = fields            # [name, format, bytes]
        self.length = None              # None: the true payload length

    def payload(self):
        """The payload bytes, field after field."""
        return b''.join(raw for _, _, raw in self.fields)

    def pack(self):
        """Header and payload; the header's length lies if self.length is set."""
        payload = self.payload()
        length = len(payload) if self.length is None else self.length
        return struct.pack('!HBBBxH', self.magic, self.version, self.type, self.flags,
                           length & 0xFFFF) + payload

    def of_kind(self, kind):
        """The fields of one kind ('struct', 'name', 'text', ...: see kind_of)."""
        return [f for f in self.fields if kind_of(f[1]) == kind]


def pack_field(fmt, value):
    """Encode one field value with its wire format."""
    if isinstance(fmt, str):
        return struct.pack('!' + fmt, value)
    return fmt.pack(value)


def field_value(rng, type, name, fmt, session):
    """A valid value for one field, from its wire format.

    Generic over p2pcommon.LAYOUTS, so that message types and fields added
    to the protocol later are fuzzed too, without a change here.
    """
    if isinstance(fmt, str):
        if fmt.endswith('s'):
            size = struct.calcsize('!' + fmt)
            if session and name in ('session', 'token') and size == len(session):
                return session
            if session and name == 'session' and size == wire.SESSION_ID_SIZE:
                return identity.session_id(session)     # a peer message of this session
            if type == wire.BYE and rng.random() < 0.5:
                return bytes(size)              # BYE to the server carries zeros
            return rng.randbytes(size)
        bits = 8 * struct.calcsize('!' + fmt)
        if fmt.islower():                       # signed
            return rng.randrange(-2 ** (bits - 1), 2 ** (bits - 1))
        return rng.choice([0, 1, rng.randrange(2 ** bits), 2 ** bits - 1])
    kind = kind_of(fmt)
    if kind == 'name':
        return rng.choice(NAMES)
    if kind == 'text':
        return rng.choice(['hello', 'ünïcødé', '\x1b[2J', '', 'some error'])
    if kind == 'blob':
        if type == wire.RELAY:                  # a whole peer message
            return valid_raw(rng, rng.choice(sorted(wire.PEER_TYPES)), session).pack()
        return rng.randbytes(rng.randrange(64))
    if kind == 'endpoint':
        return rng.choice([('0.0.0.0', 0), V4, V6])
    if kind == 'endpoints':
        return [rng.choice([V4, V6]) for _ in range(rng.randint(0, 3))]
    if kind == 'names':
        return rng.sample(NAMES, rng.randint(0, 3))
    return zero_value(fmt)                      # a codec we do not know yet


def valid_raw(rng, type, session=None):
    """A valid message of the given type, as a Raw."""
    session = session or rng.randbytes(wire.TOKEN_SIZE)
    flags = wire.FLAG_PUNCHING if type in wire.PUNCHING_TYPES else 0
    fields = [[name, fmt, pack_field(fmt, field_value(rng, type, name, fmt, session))]
              for name, fmt in wire.LAYOUTS[type]]
    return Raw(type, flags, fields)


def types_with(kind):
    """Message types that have at least one field of this kind."""
    found = []
    for type, layout in wire.LAYOUTS.items():
        if any(kind_of(fmt) == kind for _, fmt in layout):
            found.append(type)
    return found


def bad_utf8(rng):
    """Bytes that are not UTF-8: stray continuation, overlong, surrogate, cut short."""
    return rng.choice([b'\xff\xfe', b'\x80', b'\xc0\xaf', b'\xed\xa0\x80', b'\xe2\x82',
                       b'\xf4\x90\x80\x80', b'ok\xc3']) + rng.randbytes(rng.randrange(3))


# Each mutator takes (rng, over_tcp) and returns (label, bytes).  The
# field-level ones keep the header's length honest, so that over TCP the
# stream stays in step and the next frame reaches the handlers too.

def m_valid(rng, tcp):
    """An unbroken message of a random type (the server must refuse most).

    Over TCP not BYE, which ends the connection: that is m_bye's job.
    """
    types = [t for t in wire.LAYOUTS if not (tcp and t == wire.BYE)]
    return 'valid', valid_raw(rng, rng.choice(types)).pack()


def m_bye(rng, tcp):
    """A valid BYE: over TCP the server closes the connection, as asked."""
    return 'bye', valid_raw(rng, wire.BYE).pack()


def m_bit_flips(rng, tcp):
    """A few flipped bits anywhere, header included."""
    data = bytearray(valid_raw(rng, rng.choice(list(wire.LAYOUTS))).pack())
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return 'bit flips', bytes(data)


def m_truncated(rng, tcp):
    """Cut short anywhere, inside the header too (the header still says the full length)."""
    data = valid_raw(rng, rng.choice(list(wire.LAYOUTS))).pack()
    return 'truncated', data[:rng.randrange(len(data))]


def m_trailing(rng, tcp):
    """Junk after the last field, counted in the header's length."""
    raw = valid_raw(rng, rng.choice(list(wire.LAYOUTS)))
    raw.fields.append(['junk', None, rng.randbytes(rng.randint(1, 40))])
    return 'trailing bytes', raw.pack()


def m_lying_length(rng, tcp):
    """The header's length is not the payload's: off by one, zero, or anything."""
    raw = valid_raw(rng, rng.choice(list(wire.LAYOUTS)))
    true = len(raw.payload())
    raw.length = rng.choice([true - 1, true + 1, 0, 65535, rng.randrange(65536),
                             rng.randrange(2048)])
    return 'lying length', raw.pack()


def m_version(rng, tcp):
    """Another protocol version."""
    raw = valid_raw(rng, rng.choice(list(wire.LAYOUTS)))
    raw.version = rng.choice([0, 1, wire.VERSION - 1, wire.VERSION + 1, 127, 255])
    return 'wrong version', raw.pack()


def m_magic(rng, tcp):
    """Not our protocol at all."""
    raw = valid_raw(rng, rng.choice(list(wire.LAYOUTS)))
    raw.magic = rng.choice([0, 0x3250, 0xFFFF, rng.randrange(65536)])
    return 'bad magic', raw.pack()


def m_type_flags(rng, tcp):
    """An unknown type, unknown flag bits, or the reply flag on a request."""
    raw = valid_raw(rng, rng.choice(list(wire.LAYOUTS)))
    how = rng.randrange(3)
    if how == 0:
        raw.type = rng.choice([0, 11, 15, 21, 127, 255])
    elif how == 1:
        raw.flags = rng.choice([0x04, 0x80, 0xFF])
    else:
        raw.flags |= wire.FLAG_REPLY
    return 'unknown type or flags', raw.pack()


def m_huge_name(rng, tcp):
    """A name of 0 or 33-255 bytes (the limit is 32)."""
    raw = valid_raw(rng, rng.choice(types_with('name') + types_with('names')))
    size = rng.choice([0, 33, 100, 255])
    name = (rng.choice(['x', 'é', '名']) * 255).encode()[:size]
    name = name.decode('utf-8', 'ignore').encode()
    encoded = bytes([len(name)]) + name
    names = raw.of_kind('names')
    if names and not raw.of_kind('name'):
        width = len(wire.NAMES.pack([]))             # the list's count field
        names[0][2] = (1).to_bytes(width, 'big') + encoded
    else:
        rng.choice(raw.of_kind('name'))[2] = encoded
    return 'huge name', raw.pack()


def m_bad_name(rng, tcp):
    """A name with spaces, control characters, or invalid UTF-8."""
    raw = valid_raw(rng, rng.choice(types_with('name')))
    bad = rng.choice([b'a b', b'a\x00b', b'\x1b[2J', b'\t', '\u200b'.encode(),
                      b'x\n', bad_utf8(rng)])
    rng.choice(raw.of_kind('name'))[2] = bytes([len(bad)]) + bad
    return 'bad name / invalid UTF-8', raw.pack()


def m_bad_text(rng, tcp):
    """Text that is not UTF-8, or over 1,000 bytes."""
    raw = valid_raw(rng, rng.choice(types_with('text')))
    if rng.random() < 0.5:
        text = bad_utf8(rng)
    else:
        text = rng.choice(['x', 'é']).encode() * rng.randint(501, 540)
        text = text[:rng.randint(1001, 1080)]
    raw.of_kind('text')[0][2] = struct.pack('!H', len(text)) + text
    return 'bad text / invalid UTF-8', raw.pack()


def m_counted_lies(rng, tcp):
    """A name, text, blob or list whose own count says more or less than follows."""
    raw = valid_raw(rng, rng.choice(types_with('name') + types_with('text')
                                    + types_with('blob') + types_with('names')))
    field = rng.choice([f for f in raw.fields
                        if kind_of(f[1]) in ('name', 'text', 'blob', 'endpoints', 'names')])
    data = bytearray(field[2])
    # The width of the count in front: what the codec writes for an empty value.
    width = 1 if kind_of(field[1]) == 'name' else len(field[1].pack(zero_value(field[1])))
    count = int.from_bytes(data[:width], 'big')
    count = rng.choice([count + 1, max(0, count - 1), 2 ** (8 * width) - 1])
    data[:width] = count.to_bytes(width, 'big')
    field[2] = bytes(data)
    return 'field count lies', raw.pack()


def m_address_family(rng, tcp):
    """An endpoint whose family is not 4 or 6, or an IPv4 one with junk after it."""
    raw = valid_raw(rng, rng.choice([wire.MAPPING, wire.INTRODUCE, wire.REGISTER]))
    family = rng.choice([0, 1, 5, 7, 46, 255, 4])
    tail = rng.randbytes(12) if family == 4 else bytes(12)
    endpoint = struct.pack('!BH', family, rng.randrange(65536)) + rng.randbytes(4) + tail
    if raw.type == wire.REGISTER:
        raw.of_kind('endpoints')[0][2] = bytes([1]) + endpoint
    else:
        raw.of_kind('endpoint')[0][2] = endpoint
    return 'bad address family', raw.pack()


def m_endpoint_count(rng, tcp):
    """More than 16 private endpoints, or a count with nothing behind it."""
    raw = valid_raw(rng, rng.choice([wire.REGISTER, wire.INTRODUCE]))
    count = rng.choice([17, 64, 255])
    filler = wire.ENDPOINT.pack(V4) * (count if rng.random() < 0.3 else 1)
    width = len(wire.ENDPOINTS.pack([]))            # the list's count field
    raw.of_kind('endpoints')[0][2] = count.to_bytes(width, 'big') + filler
    return 'too many endpoints', raw.pack()


def m_short_token(rng, tcp):
    """A token or integer field cut short, the header honest about it."""
    raw = valid_raw(rng, rng.choice(types_with('struct')))
    field = rng.choice(raw.of_kind('struct'))
    field[2] = field[2][:rng.randrange(len(field[2]))]
    return 'short token / integer', raw.pack()


def m_random(rng, tcp):
    """Random bytes, sometimes behind a valid magic and version."""
    data = rng.randbytes(rng.choice([0, 1, 7, 8, 9, rng.randint(10, 300),
                                     rng.randint(300, 1300)]))
    if data and rng.random() < 0.5:
        data = struct.pack('!HB', wire.MAGIC, wire.VERSION) + data
    return 'random bytes', data


def m_oversize(rng, tcp):
    """Bigger than any message may be: a datagram over 1,200 bytes, a frame over 2,048."""
    if tcp:
        length = rng.randint(2049, 65535)
        header = struct.pack('!HBBBxH', wire.MAGIC, wire.VERSION,
                             rng.choice(list(wire.LAYOUTS)), 0, length)
        return 'oversize', header + rng.randbytes(rng.randrange(min(length, 4000)))
    raw = valid_raw(rng, wire.DATA)
    text = b'x' * rng.randint(1200, 8000)
    raw.of_kind('text')[0][2] = struct.pack('!H', len(text) & 0xFFFF) + text
    return 'oversize', raw.pack()


def m_spliced(rng, tcp):
    """Two whole messages in one datagram (over TCP: a header torn from its body)."""
    one = valid_raw(rng, rng.choice(list(wire.LAYOUTS))).pack()
    two = valid_raw(rng, rng.choice(list(wire.LAYOUTS))).pack()
    if tcp:
        return 'spliced', one[:wire.HEADER_SIZE] + two
    return 'spliced', one + two


# ---------------------------------------------------------------------------
# Boundary values: every field of every message at the edges of its format
# (0, 1, max-1, max, where a sign or a count wraps; lengths one off; counts
# of 0, the limit and the limit + 1), the rest of the message valid.  The
# sweep sends each once; m_boundary picks one at random among the mutators.


def int_edges(fmt):
    """A struct integer's edges: 0, 1, max-1, max and the two values where the sign wraps.

    For a signed code the same bit patterns: 0, 1, max, min, -2, -1.
    """
    bits = 8 * struct.calcsize('!' + fmt)
    edges = [0, 1, 2 ** (bits - 1) - 1, 2 ** (bits - 1), 2 ** bits - 2, 2 ** bits - 1]
    if fmt.islower():
        edges = [e - 2 ** bits if e >= 2 ** (bits - 1) else e for e in edges]
    return edges


def counted(width, data, count=None):
    """data behind a count of width bytes, which says count when given (a lie)."""
    return (len(data) if count is None else count).to_bytes(width, 'big') + data


def count_lies(width, data):
    """data behind counts that are one more, one less, and the largest the width holds."""
    return [('count one more', counted(width, data, len(data) + 1)),
            ('count one less', counted(width, data, max(0, len(data) - 1))),
            ('count max', counted(width, data, 2 ** (8 * width) - 1))]


def sized(unit, size):
    """size bytes of repeated unit (UTF-8), cut to exactly size."""
    return (unit.encode() * size)[:size]


def raw_endpoint(family, port, address):
    """An endpoint's 19 bytes, family and address as given (XORed as on the wire)."""
    return struct.pack('!BH', family, port ^ wire.XOR_PORT) + bytes(
        a ^ b for a, b in zip(address.ljust(16, b'\0'), wire.XOR_ADDRESS))


ENDPOINT_EDGES = [
    ('0.0.0.0:0', raw_endpoint(4, 0, bytes(4))),
    ('255.255.255.255:65535', raw_endpoint(4, 65535, b'\xff' * 4)),
    ('[::]:0', raw_endpoint(6, 0, bytes(16))),
    ('[ffff:...]:65535', raw_endpoint(6, 65535, b'\xff' * 16)),
    ('family 0', raw_endpoint(0, 1, bytes(4))),
    ('family 5', raw_endpoint(5, 1, bytes(4))),
    ('family 255', raw_endpoint(255, 1, bytes(4))),
    ('IPv4, junk after', raw_endpoint(4, 1, bytes(4) + b'\x01')),
    ('one short', raw_endpoint(4, 1, bytes(4))[:-1]),
]


def field_edges(fmt):
    """(label, raw bytes) for one field at the edges of its format."""
    kind = kind_of(fmt)
    if kind == 'struct' and fmt.endswith('s'):
        size = struct.calcsize('!' + fmt)
        return [('zeros', bytes(size)), ('ones', b'\xff' * size),
                ('one short', bytes(size - 1)), ('one long', bytes(size + 1))]
    if kind == 'struct':
        return [(str(v), struct.pack('!' + fmt, v)) for v in int_edges(fmt)]
    if kind == 'name':
        sizes = (0, 1, wire.MAX_NAME - 1, wire.MAX_NAME, wire.MAX_NAME + 1, 255)
        edges = [(f'{n} bytes', sized('x', n)) for n in sizes]
        edges += [('32 bytes of é', sized('é', 32)), ('33, é last', b'x' + sized('é', 32)),
                  ('é cut in half', sized('é', 31))]
        return [(label, counted(1, data)) for label, data in edges] + count_lies(1, b'xy')
    if kind == 'text':
        sizes = (0, 1, wire.MAX_TEXT - 1, wire.MAX_TEXT, wire.MAX_TEXT + 1)
        edges = [(f'{n} bytes', sized('x', n)) for n in sizes]
        edges += [('1000 bytes of é', sized('é', wire.MAX_TEXT)),
                  ('é cut in half', sized('é', wire.MAX_TEXT - 1))]
        return [(label, counted(2, data)) for label, data in edges] + count_lies(2, b'text')
    if kind == 'blob':
        edges = [(f'{n} bytes', bytes(n)) for n in (0, 1, wire.MAX_DATAGRAM - 1, wire.MAX_DATAGRAM,
                                                    wire.MAX_DATAGRAM + 1)]
        return [(label, counted(2, data)) for label, data in edges] + count_lies(2, b'blob')
    if kind == 'endpoint':
        return ENDPOINT_EDGES
    if kind == 'endpoints':
        one = wire.ENDPOINT.pack(V4)
        edges = [(f'{n} endpoints', counted(1, one * n, n))
                 for n in (0, 1, wire.MAX_ENDPOINTS, wire.MAX_ENDPOINTS + 1)]
        return edges + count_lies(1, one)
    if kind == 'names':
        one = wire.NAME.pack('x')
        edges = [(f'{n} names', counted(2, one * n, n))
                 for n in (0, 1, wire.MAX_PEERS_LISTED, wire.MAX_PEERS_LISTED + 1)]
        return edges + count_lies(2, one)
    return []


def boundary_raw(rng, type, field, raw_value):
    """A valid message of type with one field's bytes replaced, the header honest."""
    raw = valid_raw(rng, type)
    for entry in raw.fields:
        if entry[0] == field:
            entry[2] = raw_value
    return raw.pack()


@functools.lru_cache(maxsize=None)
def boundary_sweep(seed=0):
    """(label, bytes) for every field of every message type at each of its edges."""
    rng = random.Random(seed)
    sweep = []
    for type, layout in sorted(wire.LAYOUTS.items()):
        for field, fmt in layout:
            for label, raw_value in field_edges(fmt):
                sweep.append((f'{wire.TYPE_NAMES[type]} {field}: {label}',
                              boundary_raw(rng, type, field, raw_value)))
    return sweep


def header_sweep(seed=0):
    """(label, bytes): each message type with its header's length one off, 0 and 65535.

    These break a TCP stream's framing, so they go only in datagrams.
    """
    rng = random.Random(seed)
    sweep = []
    for type in sorted(wire.LAYOUTS):
        for lie in (-1, +1, None, 65535):
            raw = valid_raw(rng, type)
            true = len(raw.payload())
            raw.length = 0 if lie is None else lie if lie == 65535 else max(0, true + lie)
            sweep.append((f'{wire.TYPE_NAMES[type]} header length {raw.length} of {true}',
                          raw.pack()))
    return sweep


def m_boundary(rng, tcp):
    """One field of one message at one of its edges (see boundary_sweep)."""
    type = rng.choice([t for t, layout in wire.LAYOUTS.items() if layout])
    field, fmt = rng.choice(wire.LAYOUTS[type])
    edges = field_edges(fmt)
    if not edges:
        return m_valid(rng, tcp)
    return 'boundary', boundary_raw(rng, type, field, rng.choice(edges)[1])


UDP_MUTATORS = [m_valid, m_bit_flips, m_truncated, m_trailing, m_lying_length, m_version,
                m_magic, m_type_flags, m_huge_name, m_bad_name, m_bad_text, m_counted_lies,
                m_address_family, m_endpoint_count, m_short_token, m_random, m_oversize,
                m_spliced, m_boundary]
# Over TCP, breakage inside one honest frame gets an ERROR and the stream
# stays in step; the rest loses the frame boundaries, and the server closes
# the connection.  A connection gets in-frame breakage only, then maybe one
# stream breaker at its end, so that connections with hundreds of frames
# really deliver hundreds of frames to the handlers.
TCP_IN_FRAME = [m_valid, m_huge_name, m_bad_name, m_bad_text, m_counted_lies,
                m_address_family, m_endpoint_count, m_short_token, m_trailing, m_type_flags,
                m_boundary]
TCP_BREAKING = [m_bit_flips, m_truncated, m_lying_length, m_version, m_magic, m_random,
                m_oversize, m_spliced, m_bye]


def fuzz_message(rng, mutators, tcp):
    """One broken message: (mutator label, bytes)."""
    return rng.choice(mutators)(rng, tcp)


# ---------------------------------------------------------------------------
# Counters shared by the fuzz threads.


class Stats:
    """Counts from every thread, behind one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.errors = collections.Counter()         # normalised ERROR texts
        self.mutators = collections.Counter()
        self.problems = []                          # unexpected things, in words

    def add(self, key, n=1):
        """Add n to a named count."""
        with self.lock:
            self.counts[key] += n

    def error_text(self, text):
        """Count one ERROR reply, by its text with the details taken out."""
        with self.lock:
            self.counts['error replies'] += 1
            self.errors[normalise(text)] += 1

    def problem(self, text):
        """Note something that should not happen (shown at the end)."""
        with self.lock:
            if len(self.problems) < 50:
                self.problems.append(text)


def normalise(text):
    """An ERROR text with quoted values and numbers replaced, to group alike ones."""
    text = re.sub(r"""b?'(?:[^'\\]|\\.)*'|b?"(?:[^"\\]|\\.)*\"""", '…', text)
    text = re.sub(r'0x[0-9a-fA-F]+', '0x…', text)
    text = re.sub(r'\d+', 'N', text)
    return text[:80]


# ---------------------------------------------------------------------------
# UDP: datagrams to the server's main and probe ports.


def udp_fuzz(port, count, rate, seed, stats, done):
    """Send count fuzzed datagrams at about rate a second; count MAPPING replies.

    The boundary sweeps go first, each datagram once; then the mutators.
    """
    rng = random.Random(f'udp{seed}')
    sweep = boundary_sweep(seed) + header_sweep(seed)
    socks = []
    for source in UDP_SOURCES:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.setblocking(False)
        socks.append(sock)
    started = time.monotonic()
    try:
        for i in range(count):
            try:
                if i < len(sweep):
                    label, data = 'boundary sweep', sweep[i][1]
                else:
                    label, data = fuzz_message(rng, UDP_MUTATORS, tcp=False)
            except Exception as error:  # a bug of ours: say so, and go on with the next
                stats.problem(f'udp fuzz: {type(error).__name__}: {error}')
                continue
            try:
                rng.choice(socks).sendto(data, (HOST, port + rng.randrange(2)))
            except BlockingIOError:
                stats.add('datagrams not sent (socket full)')
                continue
            except OSError as error:        # EMSGSIZE is impossible on loopback
                stats.problem(f'udp send: {error}')
                continue
            stats.add('datagrams sent')
            with stats.lock:
                stats.mutators[label] += 1
            if i % 50 == 49:
                drain_replies(socks, stats)
                if rate:
                    # Paced, so that the server's socket buffer never
                    # overflows and every datagram is in its count.
                    ahead = (i + 1) / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        deadline = time.monotonic() + 1.0      # replies to the last ones
        while time.monotonic() < deadline:
            select.select(socks, [], [], 0.1)
            drain_replies(socks, stats)
    finally:
        for sock in socks:
            sock.close()
        done.set()


def drain_replies(socks, stats):
    """Read every waiting reply; a reply larger than a MAPPING would amplify."""
    for sock in socks:
        while True:
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            stats.add('mapping replies')
            # Every valid MAPPING request has this size: a reply may not exceed it.
            if len(data) > len(encode(wire.MAPPING)):
                stats.problem(f'udp reply of {len(data)} bytes, larger than any request')


# ---------------------------------------------------------------------------
# TCP: control connections that send fuzzed frames.


SWEEP_PER_CONNECTION = 40


def plan_connections(rng, frames):
    """Split the frame budget into connections: (kind, frames, seed, number) each.

    First the boundary sweep, SWEEP_PER_CONNECTION frames a connection
    (kind 'sweep'; seed is where its frames start in the sweep).  Then
    most connections send a few frames, some tens, a few hundreds; one in
    ten is an introduced pair that fuzzes the relay.
    """
    jobs = []
    left = frames
    swept = len(boundary_sweep())
    for first in range(0, min(frames, swept), SWEEP_PER_CONNECTION):
        n = min(SWEEP_PER_CONNECTION, left, swept - first)
        jobs.append(('sweep', n, first, len(jobs)))
        left -= n
    while left > 0:
        roll = rng.random()
        n = (rng.randint(1, 5) if roll < 0.8 else rng.randint(6, 40) if roll < 0.95
             else rng.randint(100, 300))
        n = min(n, left)
        kind = 'relay' if rng.random() < 0.1 else 'plain'
        jobs.append((kind, n, rng.randrange(2 ** 32), len(jobs)))
        left -= n
    return jobs


def tcp_worker(port, jobs, stats):
    """Run connection jobs from the queue until it is empty."""
    while True:
        try:
            kind, n, seed, number = jobs.get_nowait()
        except queue.Empty:
            return
        rng = random.Random(seed)
        try:
            if kind == 'relay':
                relay_pair(port, rng, n, number, stats)
            elif kind == 'sweep':
                sweep = boundary_sweep()[seed:seed + n]
                plain_connection(port, rng, n, number, stats, [data for _, data in sweep])
            else:
                plain_connection(port, rng, n, number, stats)
        except OSError as error:
            stats.add(f'connections failed ({type(error).__name__})')
        except Exception as error:      # a bug of ours: say so, and go on with the next
            stats.problem(f'fuzz thread: {type(error).__name__}: {error}')


def plain_connection(port, rng, n, number, stats, frames=None):
    """One connection: maybe REGISTER first, then n fuzzed frames (or these), then listen."""
    sock = socket.create_connection((HOST, port), timeout=5,
                                    source_address=(rng.choice(TCP_SOURCES), 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stats.add('tcp connections')
    try:
        stream = bytearray()
        if rng.random() < 0.5:
            stream += encode(wire.REGISTER, name=f'fz{number}', private=[V4])
            stats.add('setup frames (valid REGISTER, CONNECT)')
        for i in range(n):
            last = i == n - 1 and rng.random() < 0.5
            if frames:
                label, data = 'boundary sweep', frames[i]
            else:
                label, data = fuzz_message(rng, TCP_BREAKING if last else TCP_IN_FRAME, tcp=True)
            stream += data
            with stats.lock:
                stats.mutators[f'tcp {label}'] += 1
        stats.add('tcp frames sent', n)
        closed = send_in_pieces(sock, rng, bytes(stream))
        if not closed:
            closed = read_replies(sock, stats, wire.FrameReader())
        if closed:
            stats.add('connections closed by the server')
    finally:
        sock.close()


def send_in_pieces(sock, rng, data):
    """Send data in a few random pieces; True if the server closed meanwhile."""
    cuts = sorted(rng.sample(range(1, len(data)), max(0, min(len(data) - 1, rng.randint(0, 4)))))
    try:
        for begin, end in zip([0] + cuts, cuts + [len(data)]):
            sock.sendall(data[begin:end])
    except (BrokenPipeError, ConnectionResetError):
        return True
    return False


def read_replies(sock, stats, reader, idle=0.15, limit=3.0):
    """Read replies until the server closes or is quiet; True if it closed."""
    deadline = time.monotonic() + limit
    sock.settimeout(idle)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        if not data:
            return True
        reader.feed(data)
        try:
            for frame in reader.frames():
                take_reply(frame, stats)
        except wire.ProtocolError as error:
            stats.problem(f'the server sent a frame we cannot read: {error}')
            return False
    return False


def take_reply(frame, stats):
    """Count one frame from the server; check that it is a valid reply."""
    try:
        message = wire.decode(frame)
    except wire.ProtocolError as error:
        stats.problem(f'the server sent a bad message: {error}')
        return None
    if not message.flags & wire.FLAG_REPLY:
        stats.problem(f'a server message without the reply flag: {message!r}')
    if message.type == wire.ERROR:
        stats.error_text(message.text)
    else:
        stats.add(f'{message.name_of_type} replies')
    return message


class RawPeer:
    """A hand-driven peer for the relay fuzz: control connection plus UDP socket."""

    def __init__(self, port, name, source):
        self.tcp = socket.create_connection((HOST, port), timeout=5,
                                            source_address=(source, 0))
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((source, 0))
        self.udp.settimeout(2)
        self.reader = wire.FrameReader()
        self.tcp.sendall(encode(wire.REGISTER, name=name, private=[self.udp.getsockname()]))
        token = self.receive(wire.REGISTERED).token
        request = encode(wire.MAPPING, token=token, public=('0.0.0.0', 0))
        for _ in range(5):                  # the server's mapping rate limit may drop one
            self.udp.sendto(request, (HOST, port))
            try:
                self.udp.recv(100)
                break
            except TimeoutError:
                continue

    def receive(self, *types):
        """The next message from the server, which must be of one of these types."""
        while True:
            for frame in self.reader.frames():
                message = wire.decode(frame)
                if message.type not in types:
                    raise OSError(f'expected {wire.TYPE_NAMES[types[0]]}, got {message!r}')
                return message
            data = self.tcp.recv(65536)
            if not data:
                raise ConnectionResetError('closed by the server')
            self.reader.feed(data)

    def close(self):
        """Close both sockets."""
        self.tcp.close()
        self.udp.close()


def relay_pair(port, rng, n, number, stats):
    """Two introduced peers; one sends n RELAY frames carrying broken peer messages.

    The outer frame is always honest, so every frame reaches the relay
    code.  The server must forward exactly the ones whose inner message is
    valid peer traffic of this session, and answer the rest with ERROR.
    Whether it also checks the inner MAC (it holds the token) is its
    choice: either count is right, and the valid ones carry a good MAC.
    """
    source = rng.choice(TCP_SOURCES)
    a = RawPeer(port, f'fz{number}a', source)
    b = None
    try:
        b = RawPeer(port, f'fz{number}b', source)
        stats.add('tcp connections', 2)
        stats.add('setup frames (valid REGISTER, CONNECT)', 3)
        a.tcp.sendall(encode(wire.CONNECT, target=f'fz{number}b'))
        a.receive(wire.ASK)                     # the server's answer: b was asked
        if b.receive(wire.ASK, wire.INTRODUCE).type == wire.ASK:    # the server asks b first
            b.tcp.sendall(encode(wire.CONNECT, target=f'fz{number}a'))
            stats.add('setup frames (valid REGISTER, CONNECT)')
            b.receive(wire.INTRODUCE)
        introduce = a.receive(wire.INTRODUCE)
        session = introduce.session
        key = identity.SessionKey(session, introduce.role)
        stream = bytearray()
        by_id = by_mac = 0
        for _ in range(n):
            if rng.random() < 0.2:
                raw = valid_raw(rng, rng.choice(sorted(wire.PEER_TYPES)), session)
                label, inner = 'valid', sealed_raw(raw.pack(), key)
            else:
                label, inner = fuzz_message(rng, TCP_IN_FRAME + TCP_BREAKING, tcp=True)
                if rng.random() < 0.5:          # our session's id, for a real check
                    inner = (inner[:wire.HEADER_SIZE] + key.id
                             + inner[wire.HEADER_SIZE + wire.SESSION_ID_SIZE:])
            inner = inner[:1800]
            with stats.lock:
                stats.mutators[f'relay {label}'] += 1
            stream += encode(wire.RELAY, session=session, message=inner)
            id_ok, mac_ok = relayable(inner, key)
            by_id += id_ok
            by_mac += mac_ok
        stats.add('tcp frames sent', n)
        stats.add('relay frames sent', n)
        stats.add('relay frames that should be forwarded (by session id)', by_id)
        stats.add('relay frames that should be forwarded (by MAC)', by_mac)
        a.tcp.sendall(stream)
        read_replies(a.tcp, stats, a.reader)
        got = count_relayed(b, stats)
        stats.add('relay frames forwarded', got)
        if got not in (by_id, by_mac):
            stats.problem(f'relay pair fz{number}: {by_id} frames of the session sent, '
                          f'{by_mac} with a good MAC; {got} forwarded')
    finally:
        a.close()
        if b:
            b.close()


def sealed_raw(data, key):
    """A peer message's bytes with its MAC made good, as the key's owner sends it."""
    body = data[:-wire.MAC_SIZE]
    return body + key.mac(key.role, body)


def relayable(inner, key):
    """(by session id, by MAC): whether a server should forward this inner message.

    By the README's rules it forwards peer traffic of the session: the
    first says whether the message names the session, the second whether
    its MAC is good as well (for a server that checks it).
    """
    try:
        message = wire.decode(inner)
    except wire.ProtocolError:
        return 0, 0
    named = message.type in wire.PEER_TYPES and message.session == key.id
    body, tag = message.raw[:-wire.MAC_SIZE], message.raw[-wire.MAC_SIZE:]
    return int(named), int(named and tag == key.mac(key.role, body))


def count_relayed(peer, stats, idle=0.3):
    """How many RELAY frames reach the partner before the line goes quiet."""
    peer.tcp.settimeout(idle)
    got = 0
    while True:
        try:
            for frame in peer.reader.frames():
                message = take_reply(frame, stats)
                got += bool(message and message.type == wire.RELAY)
            data = peer.tcp.recv(65536)
        except (TimeoutError, ConnectionResetError):
            return got
        if not data:
            return got
        peer.reader.feed(data)


# ---------------------------------------------------------------------------
# The real peers: chat, and new clients that register and connect.


class Peers:
    """chat-a and chat-b, connected; witness, whom new clients connect to."""

    def __init__(self, port):
        self.port = port
        self.procs = {}
        self.sent = []              # (sender, receiver, text)
        self.late = 0               # lines not seen within the check's timeout
        self.checks = 0
        self.failed_checks = []
        # chat-b says yes to chat-a; witness, a public service, to anyone.
        allow = {CHAT_A: (), CHAT_B: ('--allow', CHAT_A), WITNESS: ('--allow', '*')}
        for name in (CHAT_A, CHAT_B, WITNESS):
            self.procs[name] = self.client(name, *allow[name])
        for proc in self.procs.values():
            proc.expect(r'^\* registered as ', timeout=15)
        self.procs[CHAT_A].send(f'/connect {CHAT_B}')
        self.procs[CHAT_A].expect(CONNECTED.format(CHAT_B), timeout=15)
        self.procs[CHAT_B].expect(CONNECTED.format(CHAT_A), timeout=15)

    def client(self, name, *options):
        """Start one p2pclient.py against our server."""
        return start(command('p2pclient.py', name, '--server', f'{HOST}:{self.port}',
                             *options), name)

    def chat(self, number):
        """Type a line at one chat peer; wait for it at the other."""
        sender, receiver = (CHAT_A, CHAT_B) if number % 2 == 0 else (CHAT_B, CHAT_A)
        text = f'line {number} from {sender} during the fuzz'
        self.sent.append((sender, receiver, text))
        self.procs[sender].send(text)
        try:
            self.procs[receiver].expect(rf'^<{sender}> {re.escape(text)}$', timeout=10)
        except AssertionError:
            self.late += 1          # counted as lost only if it never arrives

    def new_client(self, number, rng):
        """A new client registers, connects to witness, says hello and quits."""
        self.checks += 1
        name = f'probe{number}-{rng.randrange(10 ** 6)}'
        proc = self.client(name)
        try:
            proc.expect(r'^\* registered as ', timeout=15)
            proc.send(f'/connect {WITNESS}')
            proc.expect(CONNECTED.format(WITNESS), timeout=15)
            self.procs[WITNESS].expect(CONNECTED.format(name), timeout=15)
            proc.send(f'hello from {name}')
            self.procs[WITNESS].expect(rf'^<{name}> hello from {name}$', timeout=10)
            proc.send('/quit')
            code = proc.wait(10)
            if code != 0:
                raise AssertionError(f'{name} exited with {code}\n{proc.transcript()}')
        except (AssertionError, OSError) as error:
            self.failed_checks.append(str(error).splitlines()[0])
            print(f'new client check failed: {error}', file=sys.stderr)
        finally:
            proc.stop()

    def delivered(self):
        """How many of the chat lines sent are on the receivers' screens."""
        seen = {name: set(proc.lines) for name, proc in self.procs.items()}
        return sum(f'<{s}> {t}' in seen[r] for s, r, t in self.sent)

    def quit(self):
        """/quit every peer; return the names that did not exit 0 or wrote to stderr."""
        bad = []
        for name, proc in self.procs.items():
            try:
                proc.send('/quit')
                code = proc.wait(10)
            except (OSError, ValueError, subprocess.TimeoutExpired) as error:
                code = f'{type(error).__name__}'
            finally:
                proc.stop()
            if code != 0 or any('Traceback' in line for line in proc.err.lines):
                bad.append(f'{name} (exit {code})')
        return bad


# ---------------------------------------------------------------------------
# In-process (--client-units): peer messages into the client's own code.
#
# What p2pclient.py does with a peer message once its MAC checks out is
# done here by ClientUnit, on a real ReliableChannel (chat) and a real
# Transfers (files), with no sockets and no clock: every message is sealed
# with the session's key (identity.SessionKey), so that it passes the check
# and reaches the code behind it.  Its fields sit at the edges of their
# formats, or next to the numbers the receiver holds right now (the seq it
# expects, the transfer ids it knows), where off-by-one bugs live.

UNIT_TOKEN = bytes(range(16))   # the session's token, as INTRODUCE would give it
UNIT_RESET = 300                # inputs before a fresh session, so early states get fuzz too
UNIT_TYPES = sorted({wire.DATA, wire.ACK} | transfer.Transfers.MESSAGES)
UNIT_TEXTS = ['', 'x', '\x1b[2J\r\n', '../x', '/etc/passwd', '.', 'a/b', 'x' * 201,
              'é' * (wire.MAX_TEXT // 2), 'x' * wire.MAX_TEXT]
UNIT_BLOBS = [b'', b'x', bytes(transfer.CHUNK_SIZE), bytes(transfer.CHUNK_SIZE + 1)]
UNIT_SOURCE_SIZE = 20_000       # bytes of the file we offer the fuzzer at each fresh session


class ClientUnit:
    """One session's worth of the client, in-process: chat channel and file transfers."""

    def __init__(self, folder, source):
        self.now = 1000.0
        self.ours = identity.SessionKey(UNIT_TOKEN, role=1)
        self.peer = identity.SessionKey(UNIT_TOKEN, role=0)    # seals what the fuzzer sends
        self.chat = ReliableChannel(self.transmit_data)
        self.downloads = os.path.join(folder, 'downloads')
        shutil.rmtree(self.downloads, ignore_errors=True)
        self.transfers = transfer.Transfers('peer', self.send, self.say, self.downloads)
        self.sent = collections.Counter()       # our replies, by type
        self.lines = []                          # status lines that are not printable
        self.said = 0
        for i in range(3):
            self.chat.send(f'line {i}', self.now)
        self.transfers.offer(source, self.now)  # our transfer 1, for ANSWER, CHUNK_ACK, FINISH

    def send(self, type, **fields):
        """The session's send: every reply is sealed, so each field must fit the wire."""
        self.ours.seal(type, **fields)
        self.sent[type] += 1

    def transmit_data(self, seq, text):
        """The chat channel's way out: one DATA."""
        self.send(wire.DATA, seq=seq, oldest=self.chat.oldest, text=text)

    def say(self, text):
        """A status line; one that could move the cursor is noted."""
        self.said += 1
        if not text.isprintable():
            self.lines.append(text)

    def deliver(self, data):
        """One datagram from the peer, as the client takes it: decode, check, act."""
        message = wire.decode(data)
        if not self.ours.check(message):
            raise AssertionError('the MAC did not check out')
        if message.type == wire.DATA:
            ready, ack = self.chat.receive(message.seq, message.text, message.oldest)
            self.send(wire.ACK, seq=ack, sack=self.chat.selective())
        elif message.type == wire.ACK:
            self.chat.acknowledge(message.seq, self.now, message.sack)
        else:
            self.transfers.handle(message, self.now)

    def tick(self, rng):
        """Time passes (a little, or past every timeout); the user answers; we send more."""
        self.now += rng.choice([0.001, 0.05, 0.5, 5.0, transfer.OFFER_TIMEOUT])
        asked = self.transfers.waiting_for_answer()
        if asked and rng.random() < 0.5:
            self.transfers.answer(asked, rng.random() < 0.7, self.now)
        if rng.random() < 0.3:
            self.chat.send('more', self.now)
        self.chat.retransmit(self.now)
        self.transfers.tick(self.now)

    def near(self, rng, type, field):
        """A number next to what this side holds now, for seq, oldest and transfer fields."""
        if field == 'transfer':
            known = [1, *self.transfers.incoming, *self.transfers.outgoing]
            return clamp(rng.choice(known) + rng.choice([-1, 0, 0, 0, 1]))
        if type == wire.DATA:
            base = self.chat.expected + rng.choice([-1, 0, 1, 4 * WINDOW - 1, 4 * WINDOW])
        elif type == wire.ACK:
            base = self.chat.next_seq + rng.choice([-1, 0, 1, -len(self.chat.in_flight)])
        elif type == wire.CHUNK:
            channels = [r.channel for r in self.transfers.incoming.values()] or [self.chat]
            base = rng.choice(channels).expected + rng.choice([-1, 0, 1, 2])
        else:
            channels = [s.channel for s in self.transfers.outgoing.values()] or [self.chat]
            base = rng.choice(channels).next_seq + rng.choice([-1, 0, 1])
        return clamp(base)


def clamp(number):
    """number inside a 32-bit field."""
    return min(max(number, 0), 0xFFFFFFFF)


def unit_value(rng, unit, type, field, fmt):
    """One field of a peer message: at an edge of its format, near the state, or random."""
    kind = kind_of(fmt)
    if field in ('seq', 'oldest', 'transfer') and rng.random() < 0.5:
        return unit.near(rng, type, field)
    if kind == 'text':
        return rng.choice(UNIT_TEXTS)
    if kind == 'blob':
        return rng.choice(UNIT_BLOBS + [rng.randbytes(rng.randrange(100))])
    size = struct.calcsize('!' + fmt)
    if fmt.endswith('s'):
        return rng.choice([bytes(size), b'\xff' * size, rng.randbytes(size),
                           b'\x80' + bytes(size - 1), bytes(size - 1) + b'\x01'])
    if rng.random() < 0.8:
        return rng.choice(int_edges(fmt))
    return rng.randrange(2 ** (8 * size))


def unit_fields(rng, unit, type):
    """The payload fields of one peer message (the session, counter and MAC come from seal)."""
    return {field: unit_value(rng, unit, type, field, fmt) for field, fmt in wire.LAYOUTS[type]
            if field not in ('session', 'counter', 'mac')}


def replay(unit, step):
    """One step of a session's history: a peer message (type, fields), or (None, seed) a tick."""
    type, fields = step
    if type is None:
        unit.tick(random.Random(fields))
    else:
        unit.deliver(unit.peer.seal(type, **fields))


def crash_key(where, error):
    """What tells one crash from another: where, the exception's class, its text."""
    return where, error.__class__.__name__, str(error)[:100]


def raises(steps, key, folder, source):
    """True if these steps, replayed on a fresh session, end in the same crash."""
    unit = ClientUnit(folder, source)
    for step in steps:
        try:
            replay(unit, step)
        except Exception as error:  # noqa: BLE001  (compared below)
            return crash_key('deliver' if step[0] else 'tick', error) == key
    return False


def shrink(history, key, folder, source):
    """The fewest of a session's steps that still end in this crash on a fresh one; or None.

    A crash often needs the state that earlier steps made: the last step
    alone, then the last 2, 3, 5 ... are tried, and then steps are dropped
    one by one while the same crash still comes.
    """
    for n in (1, 2, 3, 5, 10, 20, 50, 200, len(history)):
        tail = history[-n:]
        if raises(tail, key, folder, source):
            i = 0
            while i < len(tail) - 1:                # the last one, which raised, stays
                shorter = tail[:i] + tail[i + 1:]
                if raises(shorter, key, folder, source):
                    tail = shorter
                else:
                    i += 1
            return tail
    return None


class UnitStats:
    """What the in-process fuzz counts: inputs by type, replies, crashes with an example."""

    def __init__(self):
        self.inputs = collections.Counter()
        self.replies = collections.Counter()
        self.crashes = collections.Counter()    # (where, exception, text) -> count
        self.examples = {}                      # the same key -> the shortest inputs that raise
        self.unsafe = []                        # status lines that were not printable
        self.said = 0

    def crash(self, where, error, history, folder, source):
        """Count one exception; for the first of its kind, keep the steps that make it."""
        key = crash_key(where, error)
        self.crashes[key] += 1
        if key not in self.examples:
            self.examples[key] = shrink(history, key, folder, source) or history[-1:]

    def finish(self, unit):
        """Add up a session's replies and lines before it is replaced."""
        self.replies.update(unit.sent)
        self.unsafe += unit.lines[:10]
        self.said += unit.said


def client_units(count, seed):
    """Feed count peer messages to the client's code in-process; print the table.

    Returns 1 if anything raised or a status line was not printable, else 0.
    """
    rng = random.Random(f'client{seed}')
    stats = UnitStats()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix='p2pnat-fuzz-') as folder:
        source = os.path.join(folder, 'offered.bin')
        with open(source, 'wb') as stream:
            stream.write(rng.randbytes(UNIT_SOURCE_SIZE))
        unit, history = ClientUnit(folder, source), []
        for i in range(count):
            if i and i % UNIT_RESET == 0:
                stats.finish(unit)
                unit, history = ClientUnit(folder, source), []
            type = rng.choice(UNIT_TYPES)
            fields = unit_fields(rng, unit, type)
            stats.inputs[type] += 1
            steps = [(type, fields)] + ([(None, rng.randrange(2 ** 32))] if rng.random() < 0.2
                                        else [])
            try:
                for step in steps:
                    history.append(step)
                    replay(unit, step)
            except Exception as error:  # noqa: BLE001  (what we count: anything at all)
                where = 'deliver' if history[-1][0] else 'tick'
                stats.crash(where, error, history, folder, source)
                stats.finish(unit)
                unit, history = ClientUnit(folder, source), []  # a crash ends a client
        stats.finish(unit)
    unit_report(count, seed, stats, time.monotonic() - started)
    return 1 if stats.crashes or stats.unsafe else 0


def unit_report(count, seed, stats, elapsed):
    """Print what the in-process fuzz did and found."""
    print(f'\nin-process client fuzz: python bench/fuzz.py --client-units {count} --seed {seed}')
    print(f'  peer messages delivered (sealed)  {sum(stats.inputs.values())}')
    print('    by type                         ' + ', '.join(
        f'{n} {wire.TYPE_NAMES[t]}' for t, n in sorted(stats.inputs.items())))
    print('  our replies (sealed)              ' + ', '.join(
        f'{n} {wire.TYPE_NAMES[t]}' for t, n in sorted(stats.replies.items())))
    print(f'  status lines                      {stats.said}, '
          f'{len(stats.unsafe)} not printable')
    print(f'  exceptions                        {sum(stats.crashes.values())}')
    print(f'  elapsed                           {elapsed:.1f} s')
    for key, n in stats.crashes.most_common(20):
        where, name, text = key
        print(f'  {n:7d}  in {where}: {name}: {text}; the shortest inputs that raise:')
        for type, fields in stats.examples[key]:
            what = f'tick, seed {fields}' if type is None else f'{wire.TYPE_NAMES[type]} {fields!r}'
            print(f'             {what:.300}')
    for line in stats.unsafe[:5]:
        print(f'  not printable: {line!r:.200}')


# ---------------------------------------------------------------------------


def parse_args(argv):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--datagrams', type=int, default=100_000,
                        help='fuzzed UDP datagrams to send (default 100000)')
    parser.add_argument('--frames', type=int, default=10_000,
                        help='fuzzed TCP frames to send (default 10000)')
    parser.add_argument('--seed', type=int, default=1, help='random seed (default 1)')
    parser.add_argument('--rate', type=float, default=5000,
                        help='datagrams a second, 0 for as fast as possible (default 5000)')
    parser.add_argument('--tcp-threads', type=int, default=8,
                        help='control connections open at once (default 8)')
    parser.add_argument('--no-peers', action='store_true',
                        help='fuzz the server alone, without real p2pclient.py peers chatting')
    parser.add_argument('--client-units', type=int, default=0, metavar='N',
                        help='also feed N sealed peer messages to the client\'s chat channel '
                             'and file transfers, in-process (default 0)')
    parser.add_argument('--client-control', type=int, default=0, metavar='N',
                        help='also feed the client, in-process, N messages from a hostile '
                             'server, N frames from strangers on a punched TCP connection '
                             'and N hostile answers to REGISTER (default 0)')
    return parser.parse_args(argv)


def main(argv=None):
    """Run the fuzz; print the tables; exit 1 on a crash, a loss or a failed check.

    The in-process client fuzzes run first, if asked for; the server's then
    runs unless there is nothing for it to do (no datagrams, no frames, no
    peers).
    """
    args = parse_args(argv)
    # The peers keep their name keys in a folder of this run, not the user's.
    config = tempfile.TemporaryDirectory(prefix='p2pnat-fuzz-config-')
    os.environ['XDG_CONFIG_HOME'] = config.name
    status = client_units(args.client_units, args.seed) if args.client_units else 0
    if args.client_control:
        import fuzz_client     # here, not above: it takes the mutators from this module
        status |= fuzz_client.control_sides(args.client_control, args.seed)
    if args.datagrams or args.frames or not args.no_peers:
        status |= server_fuzz(args)
    return status


def server_fuzz(args):
    """The real server under fuzz (and real peers chatting, unless --no-peers)."""
    started = time.monotonic()
    server, port = start_server()
    print(f'rendezvous.py pid {server.popen.pid} on {HOST}:{port} (udp {port}, {port + 1})',
          flush=True)
    stats = Stats()
    peers = None
    try:
        peers = None if args.no_peers else Peers(port)
        run(args, port, stats, peers, started)
    finally:
        alive = server.popen.poll() is None
        if args.no_peers:
            quit_problems = []
        else:
            quit_problems = peers.quit() if peers else ['the peers never started']
        if alive:
            server.popen.send_signal(signal.SIGTERM)
        try:
            code = server.wait(15)
        except subprocess.TimeoutExpired:
            code = 'killed: no exit 15 s after SIGTERM'
        server.stop()
    return report(args, stats, peers, server, alive, code, quit_problems,
                  time.monotonic() - started)


def run(args, port, stats, peers, started):
    """The fuzz threads, and the checks in this thread until they are done.

    Without peers (--no-peers) only the fuzz runs: the server must survive
    it, and its replies must be valid.
    """
    rng = random.Random(args.seed)
    udp_done = threading.Event()
    udp = threading.Thread(target=udp_fuzz, daemon=True,
                           args=(port, args.datagrams, args.rate, args.seed, stats, udp_done))
    jobs = queue.Queue()
    for job in plan_connections(rng, args.frames):
        jobs.put(job)
    workers = [threading.Thread(target=tcp_worker, args=(port, jobs, stats), daemon=True)
               for _ in range(max(1, args.tcp_threads))]
    udp.start()
    for worker in workers:
        worker.start()
    chats = probes = 0
    next_chat = next_probe = time.monotonic()
    last_report = time.monotonic()
    while udp.is_alive() or any(w.is_alive() for w in workers):
        now = time.monotonic()
        if now - started > HARD_LIMIT:
            stats.problem(f'stopped after {HARD_LIMIT:.0f} s with the fuzz unfinished')
            break
        if peers and now >= next_chat:
            peers.chat(chats)
            chats += 1
            next_chat = now + 1.0
        if peers and now >= next_probe:
            peers.new_client(probes, rng)
            probes += 1
            next_probe = now + 5.0
        if now - last_report >= 10:
            last_report = now
            with stats.lock:
                print(f'{now - started:6.0f} s: {stats.counts["datagrams sent"]} datagrams, '
                      f'{stats.counts["tcp frames sent"]} frames, {chats} chat lines, '
                      f'{probes} new clients', flush=True)
        time.sleep(0.1)
    if peers is None:
        return
    # One more of each after the fuzz, then time for late lines to arrive:
    # the reliable layer retries for about 30 s.
    peers.chat(chats)
    peers.chat(chats + 1)
    peers.new_client(probes, rng)
    deadline = time.monotonic() + 35
    while peers.delivered() < len(peers.sent) and time.monotonic() < deadline:
        time.sleep(0.5)


def command_line(args):
    """The command that repeats this run, every option spelled out."""
    options = []
    for key, value in vars(args).items():
        flag = '--' + key.replace('_', '-')
        if value is True:
            options.append(flag)
        elif value is not False:
            options.append(f'{flag} {value}')
    return 'python bench/fuzz.py ' + ' '.join(options)


def report(args, stats, peers, server, alive, code, quit_problems, elapsed):
    """Print the table; return the exit status."""
    log = server.err.lines
    tracebacks = sum('Traceback' in line for line in log)
    dropped = collections.Counter()
    total_dropped = 0
    for line in log:
        match = re.search(r'dropped (\d+) datagrams: (.*)$', line)
        if match:
            for part in match.group(2).split(', '):
                n, _, why = part.partition(' ')
                dropped[why] += int(n)
                # The server counts relayed messages it drops there too: not our datagrams.
                total_dropped += 0 if 'relay' in why else int(n)
    counts = stats.counts
    sent = len(peers.sent) if peers else 0
    delivered = peers.delivered() if peers else 0
    unaccounted = counts['datagrams sent'] - total_dropped - counts['mapping replies']
    rows = [
        ('machine', f'{os.cpu_count()} cpus, Python {platform.python_version()}, '
                    f'{platform.system()} {platform.release()}'),
        ('command', command_line(args)),
        ('datagrams sent', counts['datagrams sent']),
        ('  answered (valid MAPPING)', counts['mapping replies']),
        ('  dropped, in the server\'s summary', total_dropped),
        ('  neither (lost in a socket buffer)', unaccounted),
        ('TCP frames sent', counts['tcp frames sent']),
        ('  plus valid setup frames', counts['setup frames (valid REGISTER, CONNECT)']),
        ('  of which RELAY through a pair', counts['relay frames sent']),
        ('TCP connections', counts['tcp connections']),
        ('  closed by the server', counts['connections closed by the server']),
        ('ERROR replies received', counts['error replies']),
        ('other replies', ', '.join(f'{n} {k.split()[0]}' for k, n in sorted(counts.items())
                                    if k.endswith(' replies') and k.split()[0].isupper())
         or 'none'),
        ('relay frames forwarded / should be',
         f'{counts["relay frames forwarded"]} / '
         f'{counts["relay frames that should be forwarded (by session id)"]} by session id, '
         f'{counts["relay frames that should be forwarded (by MAC)"]} by MAC'),
        ('chat lines delivered / sent',
         f'{delivered} / {sent}' + (f' ({peers.late} late)' if peers and peers.late else '')),
        ('new clients registered and connected',
         f'{peers.checks - len(peers.failed_checks)} / {peers.checks}' if peers else '0 / 0'),
        ('server alive at the end', 'yes' if alive else 'no'),
        ('server exit status after SIGTERM', code),
        ('tracebacks in the server log', tracebacks),
        ('server log lines', len(log)),
        ('elapsed', f'{elapsed:.1f} s'),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f'{key:<{width}}  {value}')
    print('\nERROR texts (top 8 of %d kinds):' % len(stats.errors))
    for text, n in stats.errors.most_common(8):
        print(f'  {n:7d}  {text}')
    print(f'\nthe server\'s dropped-datagram summary: {total_dropped} datagrams, '
          f'by the field it named (top 12 of {len(dropped)}):')
    for why, n in dropped.most_common(12):
        print(f'  {n:7d}  {why}')
    rest = dropped.most_common()[12:]
    if rest:
        print(f'  {sum(n for _, n in rest):7d}  the other {len(rest)}: '
              + ', '.join(why for why, _ in rest))
    print('\ndatagrams by mutation:')
    for label, n in sorted((k, v) for k, v in stats.mutators.items()
                           if not k.startswith(('tcp ', 'relay '))):
        print(f'  {n:7d}  {label}')
    problems = list(stats.problems)
    if tracebacks or not alive or code != 0:
        problems.append('the server crashed:\n' + '\n'.join(
            line for line in log if not re.search(r'(error to|bad message from|dropped) ', line)
        )[-3000:])
    if delivered < sent:
        problems.append(f'{sent - delivered} chat lines lost')
    if peers and peers.failed_checks:
        problems += [f'new client check: {f}' for f in peers.failed_checks]
    problems += [f'peer did not quit cleanly: {p}' for p in quit_problems]
    if problems:
        print('\nPROBLEMS:')
        for problem in problems:
            print(f'  - {problem}')
    failed = (tracebacks or not alive or code != 0 or delivered < sent
              or (peers and peers.failed_checks) or quit_problems or stats.problems)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
