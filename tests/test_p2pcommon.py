"""Tests for the wire format in p2pcommon.py.

Addresses come only from the documentation ranges 203.0.113.0/24,
198.51.100.0/24, 198.18.0.0/15 and 2001:db8::/32.
"""

import contextlib
import ipaddress
import random
import select
import selectors
import socket
import struct

import pytest

import p2pcommon as wire
from p2pcommon import FramingError, ProtocolError

TOKEN_A = bytes(range(0xa0, 0xb0))
TOKEN_B = b'\x5a' * wire.TOKEN_SIZE
SID_A = bytes(range(0xc0, 0xc8))            # session ids: 8 bytes, derived from a token
SID_B = b'\x3c' * wire.SESSION_ID_SIZE
MAC_A = bytes(range(0xe0, 0xe8))
MAC_B = b'\xff' * wire.MAC_SIZE
PROOF_A = bytes(range(0x10, 0x20))
NONCE_A = bytes(range(0x30, 0x40))
COUNTERS = [0, 1, 2**64 - 1]

V4 = [('203.0.113.7', 40000), ('198.51.100.23', 1), ('198.18.0.1', 65535),
      ('198.19.255.254', 7777)]
V6 = [('2001:db8::1', 40001), ('2001:db8:85a3::8a2e:370:7334', 65535),
      ('2001:db8:ffff:ffff:ffff:ffff:ffff:fffe', 1)]
MAX_LIST = [(f'198.51.100.{i + 1}', 20000 + i) if i % 2 else (f'2001:db8::{i + 1:x}', 30000 + i)
            for i in range(wire.MAX_ENDPOINTS)]

NAME_32 = '日' * 10 + 'ab'          # exactly 32 bytes of UTF-8
NAMES = ['alice', 'zoë', '日本', 'a' * wire.MAX_NAME, NAME_32, 'Ωμέγα-1']


def peer(session=SID_A, counter=1, mac=MAC_A, **fields):
    """The fields of a peer message: session id, counter, the type's own fields, MAC."""
    return dict(session=session, counter=counter, **fields, mac=mac)


def peers(*field_sets):
    """Peer samples that go through every counter, session id and MAC of the table."""
    macs = [MAC_A, MAC_B, wire.NO_MAC]
    return [peer(SID_A if i % 2 == 0 else SID_B, COUNTERS[i % 3], macs[i % 3], **fields)
            for i, fields in enumerate(field_sets)]


def _samples():
    """Field sets for every message type: the round trip table."""
    inner = wire.encode(wire.DATA, **peer(seq=3, oldest=0, text='hi'))
    return {
        wire.REGISTER: [dict(name=n, private=p, tcp_port=t, proof=r) for n, p, t, r in [
            ('alice', [], 0, PROOF_A), ('zoë', V4[:1], 1, bytes(wire.PROOF_SIZE)),
            ('日本', V6[:1], 40000, b'\xff' * wire.PROOF_SIZE),
            (NAME_32, V4 + V6, 65535, PROOF_A), ('bob', MAX_LIST, 7777, PROOF_A)]],
        wire.LIST: [{}],
        wire.CONNECT: [dict(target=n) for n in NAMES],
        wire.DECLINE: [dict(name='zoë', why=wire.DECLINED),
                       dict(name=NAME_32, why=wire.NO_ANSWER),
                       dict(name='bob', why=255)],
        wire.REGISTERED: [dict(token=TOKEN_A), dict(token=wire.NO_SESSION)],
        wire.ERROR: [dict(code=wire.E_NAME_TAKEN, text='name taken: zoë'),
                     dict(code=0, text=''),
                     dict(code=65535, text='é' * (wire.MAX_TEXT // 2)),
                     dict(code=wire.E_BAD_MESSAGE, text='line one\nline two\t日本')],
        wire.PEERS: [dict(names=[]), dict(names=NAMES),
                     dict(names=[f'p{i}' for i in range(wire.MAX_PEERS_LISTED)])],
        wire.ASK: [dict(name=n) for n in NAMES],
        wire.INTRODUCE: [
            dict(name='zoë', session=TOKEN_A, role=0, public=V4[0], port_delta=0, private=[],
                 tcp_public=V4[1], tcp_port=50000),
            dict(name='日本', session=TOKEN_B, role=1, public=V6[0], port_delta=-32768,
                 private=V4[1:2] + V6[1:2], tcp_public=V6[1], tcp_port=65535),
            dict(name='a' * 32, session=TOKEN_A, role=0, public=V4[2], port_delta=32767,
                 private=MAX_LIST, tcp_public=V4[3], tcp_port=1),
            dict(name='bob', session=TOKEN_B, role=1, public=V6[2], port_delta=2, private=V6,
                 tcp_public=('0.0.0.0', 0), tcp_port=0),   # no TCP endpoint known
            dict(name='eve', session=TOKEN_A, role=255, public=V4[0], port_delta=-1,
                 private=V4, tcp_public=('::', 0), tcp_port=0),
        ],
        wire.RELAY: [dict(session=TOKEN_A, message=inner), dict(session=TOKEN_B, message=b'')],
        wire.BYE: [{}],
        wire.ALIVE: [{}],
        wire.MAPPING: [dict(token=TOKEN_A, public=('0.0.0.0', 0)),
                       dict(token=TOKEN_A, public=('::', 0)),
                       *[dict(token=TOKEN_B, public=e) for e in V4 + V6]],
        wire.CHALLENGE: [dict(nonce=NONCE_A), dict(nonce=bytes(wire.NONCE_SIZE)),
                         dict(nonce=b'\xff' * wire.NONCE_SIZE)],
        wire.PUNCH: peers(dict(nonce=bytes(wire.NONCE_SIZE)), dict(nonce=NONCE_A),
                          dict(nonce=b'\xff' * wire.NONCE_SIZE)),
        wire.PUNCH_ACK: peers({}, {}, {}),
        wire.DATA: peers(dict(seq=0, oldest=0, text=''),
                         dict(seq=2**32 - 1, oldest=2**32 - 1, text='zoë 日本 ' * 10),
                         dict(seq=7, oldest=5, text='x' * wire.MAX_TEXT)),
        wire.ACK: peers(dict(seq=0, sack=bytes(wire.SACK_BYTES)),
                        dict(seq=2**32 - 1, sack=b'\xff' * wire.SACK_BYTES)),
        wire.OFFER: peers(dict(transfer=1, size=0, sha256=bytes(32), name='a'),
                          dict(transfer=2**32 - 1, size=2**64 - 1, sha256=b'\x5a' * 32,
                               name='report 日本.pdf')),
        wire.ANSWER: peers(dict(transfer=1, accept=1), dict(transfer=7, accept=0)),
        wire.CHUNK: peers(dict(transfer=1, seq=0, oldest=0, data=b''),
                          dict(transfer=3, seq=9, oldest=4, data=b'\0' * 1024)),
        wire.CHUNK_ACK: peers(dict(transfer=1, seq=5, sack=b'\x80' + bytes(wire.SACK_BYTES - 1))),
        wire.END: peers(dict(transfer=1), dict(transfer=2**32 - 1), dict(transfer=0)),
        wire.FINISH: peers(dict(transfer=1, ok=1, text='saved'),
                           dict(transfer=2, ok=0, text='SHA-256 mismatch')),
        wire.CANCEL: peers(dict(transfer=3, text='the file shrank')),
        wire.KEEPALIVE: peers({}, {}, {}),
        wire.GOODBYE: peers({}, {}, {}),
    }


SAMPLES = _samples()
CASES = [(t, f) for t, fields in SAMPLES.items() for f in fields]
CASE_IDS = [f'{wire.TYPE_NAMES[t]}-{i}' for t, fields in SAMPLES.items()
            for i in range(len(fields))]


def expected_flags(type, flags=0):
    """The flags encode() is expected to put on the wire."""
    return (flags | (wire.FLAG_PUNCHING if type in wire.PUNCHING_TYPES else 0)
            | (wire.FLAG_REPLY if type in wire.REPLY_TYPES else 0))


def frame(type, payload, flags=0, magic=wire.MAGIC, version=wire.VERSION, length=None):
    """A hand-built message: header (with any field overridden) + payload."""
    length = len(payload) if length is None else length
    return wire.HEADER.pack(magic, version, type, flags, length) + payload


def pack_name(data):
    """A raw Name field: count byte + bytes."""
    return bytes([len(data)]) + data


def prefix(session=SID_A, counter=1):
    """The raw start of every peer payload: session id, then the 8-byte counter."""
    return session + struct.pack('!Q', counter)


def field_spans(type, fields):
    """Map each field name to its (start, end) offsets inside the payload."""
    spans, offset = {}, 0
    for name, fmt in wire.LAYOUTS[type]:
        if isinstance(fmt, str):
            size = len(struct.pack('!' + fmt, fields[name]))
        else:
            size = len(fmt.pack(fields[name]))
        spans[name] = (offset, offset + size)
        offset += size
    return spans


def raises_naming(field, data):
    """Decode data, expecting a ProtocolError whose text starts with field."""
    with pytest.raises(ProtocolError) as info:
        wire.decode(data)
    assert str(info.value).startswith(field), str(info.value)
    return info.value


# ---------------------------------------------------------------------------
# Round trips.


def test_samples_cover_every_layout():
    """The round trip table has at least one case for every message type."""
    assert set(SAMPLES) == set(wire.LAYOUTS)


@pytest.mark.parametrize('type,fields', CASES, ids=CASE_IDS)
def test_round_trip(type, fields):
    """encode() then decode() gives back the type, the flags and every field."""
    data = wire.encode(type, **fields)
    message = wire.decode(data)
    assert message == wire.Message(type, expected_flags(type), **fields)
    assert message.type == type
    for name, value in fields.items():
        assert getattr(message, name) == value
    assert len(data) == wire.HEADER_SIZE + struct.unpack_from('!H', data, 6)[0]


@pytest.mark.parametrize('type,fields', CASES, ids=CASE_IDS)
def test_round_trip_reply(type, fields):
    """reply() round trips too and sets FLAG_REPLY."""
    message = wire.decode(wire.reply(type, **fields))
    assert message.flags & wire.FLAG_REPLY
    assert message == wire.Message(type, expected_flags(type, wire.FLAG_REPLY), **fields)


def test_round_trip_relay_carries_inner_message():
    """A message inside RELAY decodes to the original message, MAC and all."""
    fields = peer(SID_B, 2**64 - 1, MAC_B, nonce=NONCE_A)
    inner = wire.encode(wire.PUNCH, **fields)
    outer = wire.decode(wire.encode(wire.RELAY, session=TOKEN_A, message=inner))
    assert outer.message == inner
    decoded = wire.decode(outer.message)
    assert decoded == wire.Message(wire.PUNCH, wire.FLAG_PUNCHING, **fields)
    assert decoded.raw == inner


@pytest.mark.parametrize('type,fields', CASES, ids=CASE_IDS)
def test_raw_is_the_decoded_bytes(type, fields):
    """message.raw holds exactly the bytes decode() was given: what a MAC covers."""
    data = wire.reply(type, **fields)
    message = wire.decode(data)
    assert message.raw == data
    assert isinstance(message.raw, bytes)
    assert wire.decode(bytearray(data)).raw == data
    assert wire.decode(memoryview(data)).raw == data


def test_raw_is_not_a_field():
    """raw is kept beside the fields: it does not make two equal messages differ."""
    data = wire.encode(wire.KEEPALIVE, **peer())
    message = wire.decode(data)
    assert 'raw' not in message.fields
    assert message == wire.Message(wire.KEEPALIVE, wire.FLAG_PUNCHING, **peer())
    assert wire.encode(message.type, message.flags, **message.fields) == message.raw


def test_endpoints_decode_as_tuples_of_canonical_strings():
    """Endpoints come back as (str, int) tuples, IPv6 in canonical form."""
    message = wire.decode(wire.encode(wire.REGISTER, name='zoë',
                                      private=[('2001:DB8:0:0::5', 9), ('198.51.100.5', 10)],
                                      tcp_port=11, proof=PROOF_A))
    assert message.private == [('2001:db8::5', 9), ('198.51.100.5', 10)]
    assert all(isinstance(e, tuple) for e in message.private)
    message = wire.decode(wire.encode(wire.INTRODUCE, name='zoë', session=TOKEN_A, role=0,
                                      public=('2001:DB8::1', 5), port_delta=0, private=[],
                                      tcp_public=('2001:0db8:0000::0007', 6), tcp_port=7))
    assert message.public == ('2001:db8::1', 5)
    assert message.tcp_public == ('2001:db8::7', 6)
    assert isinstance(message.tcp_public, tuple)
    assert message.tcp_port == 7


# ---------------------------------------------------------------------------
# Flags.


# Which peer messages besides PUNCH count as hole punching traffic is being
# changed in the tree (PUNCH_ACK at first, KEEPALIVE now); these tests hold
# for either choice and pin the rest.
NEVER_PUNCHING = set(wire.LAYOUTS) - {wire.PUNCH, wire.PUNCH_ACK, wire.KEEPALIVE}


def test_punching_types():
    """PUNCH is punching traffic; the other punching type is PUNCH_ACK or KEEPALIVE."""
    assert wire.PUNCH in wire.PUNCHING_TYPES
    assert len(wire.PUNCHING_TYPES) == 2
    assert not wire.PUNCHING_TYPES & NEVER_PUNCHING


@pytest.mark.parametrize('type', sorted(wire.LAYOUTS), ids=lambda t: wire.TYPE_NAMES[t])
def test_punching_flag_only_on_punch_types(type):
    """encode() sets FLAG_PUNCHING on the punching types only; FLAG_REPLY on the bounce only."""
    fields = SAMPLES[type][0]
    flags = wire.decode(wire.encode(type, **fields)).flags
    assert bool(flags & wire.FLAG_PUNCHING) == (type in wire.PUNCHING_TYPES)
    if type == wire.PUNCH:
        assert flags & wire.FLAG_PUNCHING
    if type in NEVER_PUNCHING:
        assert not flags & wire.FLAG_PUNCHING
    assert bool(flags & wire.FLAG_REPLY) == (type == wire.PUNCH_ACK)


@pytest.mark.parametrize('type', sorted(wire.LAYOUTS), ids=lambda t: wire.TYPE_NAMES[t])
def test_reply_sets_reply_flag(type):
    """reply() sets FLAG_REPLY in the header byte, for every type."""
    data = wire.reply(type, **SAMPLES[type][0])
    assert data[4] & wire.FLAG_REPLY
    assert data[4] == expected_flags(type, wire.FLAG_REPLY)


def test_header_layout():
    """The header is magic, version, type, flags, a zero byte, length, big endian."""
    data = wire.encode(wire.ACK, **peer(SID_A, 0x0102030405060708, MAC_A, seq=0x01020304,
                                        sack=b'\xaa' * 64))
    assert wire.HEADER_SIZE == 8
    assert data[:8] == b'\x50\x32\x03\x13\x00\x00\x00\x5c'
    assert data[8:16] == SID_A
    assert data[16:24] == bytes(range(1, 9))
    assert data[24:28] == b'\x01\x02\x03\x04'
    assert data[28:92] == b'\xaa' * 64
    assert data[92:] == MAC_A


def test_register_layout():
    """REGISTER is name, private endpoints, our TCP port (2 bytes), then the 16-byte proof."""
    names = [n for n, _ in wire.LAYOUTS[wire.REGISTER]]
    assert names == ['name', 'private', 'tcp_port', 'proof']
    data = wire.encode(wire.REGISTER, name='alice', private=[V4[0]], tcp_port=0x1234,
                       proof=PROOF_A)
    assert data[wire.HEADER_SIZE:] == (pack_name(b'alice') + b'\x01' + wire.ENDPOINT.pack(V4[0])
                                       + b'\x12\x34' + PROOF_A)
    assert wire.PROOF_SIZE == 16


def test_introduce_layout():
    """INTRODUCE: the token, then our role (1 byte), and the peer's endpoints and TCP port."""
    assert [n for n, _ in wire.LAYOUTS[wire.INTRODUCE]] == [
        'name', 'session', 'role', 'public', 'port_delta', 'private', 'tcp_public', 'tcp_port']
    data = wire.encode(wire.INTRODUCE, name='bob', session=TOKEN_A, role=1, public=V4[0],
                       port_delta=-2, private=[], tcp_public=V6[0], tcp_port=50000)
    assert data[wire.HEADER_SIZE:] == (pack_name(b'bob') + TOKEN_A + b'\x01'
                                       + wire.ENDPOINT.pack(V4[0])
                                       + struct.pack('!h', -2) + b'\x00'
                                       + wire.ENDPOINT.pack(V6[0]) + struct.pack('!H', 50000))


def test_consent_and_liveness_layouts():
    """ASK is a name; DECLINE a name and one 'why' byte; BYE and ALIVE are a bare header."""
    assert wire.encode(wire.ASK, name='zoë')[wire.HEADER_SIZE:] == pack_name('zoë'.encode())
    data = wire.encode(wire.DECLINE, name='bob', why=wire.NO_ANSWER)
    assert data[wire.HEADER_SIZE:] == pack_name(b'bob') + bytes([wire.NO_ANSWER])
    assert (wire.DECLINED, wire.NO_ANSWER) == (0, 1)
    for type in (wire.BYE, wire.ALIVE, wire.LIST):
        assert wire.LAYOUTS[type] == []
        assert len(wire.encode(type)) == wire.HEADER_SIZE


def test_challenge_layout():
    """CHALLENGE is 16 bytes of nonce and nothing else: no session id, no MAC."""
    data = wire.encode(wire.CHALLENGE, nonce=NONCE_A)
    assert data == frame(wire.CHALLENGE, NONCE_A)
    assert wire.CHALLENGE not in wire.PEER_TYPES


@pytest.mark.parametrize('type,names', [
    (wire.PUNCH, ['nonce']),
    (wire.PUNCH_ACK, []),
    (wire.KEEPALIVE, []),
    (wire.GOODBYE, []),
    (wire.DATA, ['seq', 'oldest', 'text']),
    (wire.ACK, ['seq', 'sack']),
    (wire.OFFER, ['transfer', 'size', 'sha256', 'name']),
    (wire.ANSWER, ['transfer', 'accept']),
    (wire.CHUNK, ['transfer', 'seq', 'oldest', 'data']),
    (wire.CHUNK_ACK, ['transfer', 'seq', 'sack']),
    (wire.END, ['transfer']),
    (wire.FINISH, ['transfer', 'ok', 'text']),
    (wire.CANCEL, ['transfer', 'text']),
], ids=lambda v: wire.TYPE_NAMES[v] if isinstance(v, int) else '')
def test_peer_layouts(type, names):
    """Peer messages: session id, counter, their own fields in a pinned order, MAC."""
    assert [n for n, _ in wire.LAYOUTS[type]] == ['session', 'counter', *names, 'mac']
    assert type in wire.PEER_TYPES


def test_every_peer_layout_starts_with_session_and_counter_and_ends_with_mac():
    """Exactly the peer types are sealed: 8-byte session id, 8-byte counter, ..., 8-byte MAC."""
    sealed = {t for t, layout in wire.LAYOUTS.items()
              if layout[:2] == [('session', wire.SESSION_ID), ('counter', 'Q')]
              and layout[-1] == ('mac', wire.MAC)}
    assert sealed == wire.PEER_TYPES
    assert struct.calcsize('!' + wire.SESSION_ID) == wire.SESSION_ID_SIZE == 8
    assert struct.calcsize('!Q') == 8
    assert struct.calcsize('!' + wire.MAC) == wire.MAC_SIZE == 8
    for type, fields in CASES:
        if type in wire.PEER_TYPES:
            payload = wire.encode(type, **fields)[wire.HEADER_SIZE:]
            assert payload[:16] == prefix(fields['session'], fields['counter'])
            assert payload[-8:] == fields['mac']


def test_no_token_field_on_the_peer_path():
    """Peer messages name their session by its 8-byte id; only the server's carry the token."""
    for type in wire.PEER_TYPES:
        layout = dict(wire.LAYOUTS[type])
        assert layout['session'] == wire.SESSION_ID != wire.TOKEN
        assert 'token' not in layout
    assert dict(wire.LAYOUTS[wire.INTRODUCE])['session'] == wire.TOKEN
    assert dict(wire.LAYOUTS[wire.RELAY])['session'] == wire.TOKEN
    assert wire.PUNCHING_TYPES <= wire.PEER_TYPES


def test_data_and_chunk_layout():
    """DATA: session id, counter, seq, oldest, counted text, MAC; CHUNK and OFFER alike."""
    data = wire.encode(wire.DATA, **peer(SID_A, 2, MAC_A, seq=7, oldest=5, text='hé'))
    assert data[wire.HEADER_SIZE:] == (SID_A + struct.pack('!QIIH', 2, 7, 5, 3) + 'hé'.encode()
                                       + MAC_A)
    data = wire.encode(wire.CHUNK, **peer(SID_B, 2**64 - 1, MAC_B, transfer=9, seq=7, oldest=5,
                                          data=b'xyz'))
    assert data[wire.HEADER_SIZE:] == (SID_B + struct.pack('!QIIIH', 2**64 - 1, 9, 7, 5, 3)
                                       + b'xyz' + MAC_B)
    data = wire.encode(wire.OFFER, **peer(SID_A, 0, wire.NO_MAC, transfer=1, size=2**40,
                                          sha256=b'\x11' * 32, name='a.txt'))
    assert data[wire.HEADER_SIZE:] == (SID_A + struct.pack('!QIQ', 0, 1, 2**40) + b'\x11' * 32
                                       + struct.pack('!H', 5) + b'a.txt' + wire.NO_MAC)


def test_punch_layout():
    """PUNCH: session id, counter, the 16-byte nonce it echoes (zeros over UDP), MAC."""
    data = wire.encode(wire.PUNCH, **peer(SID_B, 1, MAC_B, nonce=NONCE_A))
    assert data == frame(wire.PUNCH, prefix(SID_B, 1) + NONCE_A + MAC_B,
                         flags=wire.FLAG_PUNCHING)
    data = wire.encode(wire.GOODBYE, **peer(SID_A, 5, MAC_A))
    assert data == frame(wire.GOODBYE, prefix(SID_A, 5) + MAC_A)


def test_file_transfer_types_are_peer_types():
    """The new types are numbered 21-27, named, and travel between peers."""
    new = [wire.OFFER, wire.ANSWER, wire.CHUNK, wire.CHUNK_ACK, wire.END, wire.FINISH,
           wire.CANCEL]
    assert new == list(range(21, 28))
    assert [wire.TYPE_NAMES[t] for t in new] == [
        'OFFER', 'ANSWER', 'CHUNK', 'CHUNK_ACK', 'END', 'FINISH', 'CANCEL']
    assert set(new) <= wire.PEER_TYPES
    assert set(wire.TYPE_NAMES) == set(wire.LAYOUTS)


def test_version_3_types_are_numbered_and_placed():
    """ASK, DECLINE and ALIVE are control types (under 16); CHALLENGE and GOODBYE are not."""
    control = [wire.ASK, wire.DECLINE, wire.ALIVE]
    assert control == [11, 12, 13]
    assert [wire.CHALLENGE, wire.GOODBYE] == [28, 29]
    assert [wire.TYPE_NAMES[t] for t in control + [wire.CHALLENGE, wire.GOODBYE]] == [
        'ASK', 'DECLINE', 'ALIVE', 'CHALLENGE', 'GOODBYE']
    assert not set(control) & wire.PEER_TYPES
    assert wire.GOODBYE in wire.PEER_TYPES and wire.BYE not in wire.PEER_TYPES
    assert wire.VERSION == 3


def test_previous_register_format_refused():
    """A REGISTER without tcp_port names 'tcp_port'; one without its proof names 'proof'."""
    old = pack_name(b'alice') + b'\x01' + wire.ENDPOINT.pack(V4[0])
    raises_naming('tcp_port', frame(wire.REGISTER, old))
    raises_naming('tcp_port', frame(wire.REGISTER, old + b'\x1e'))
    raises_naming('proof', frame(wire.REGISTER, old + b'\x1e\x61'))          # version 2
    raises_naming('proof', frame(wire.REGISTER, old + b'\x1e\x61' + PROOF_A[:15]))
    message = wire.decode(frame(wire.REGISTER, old + b'\x1e\x61' + PROOF_A))
    assert (message.tcp_port, message.proof) == (7777, PROOF_A)


def test_previous_introduce_format_refused():
    """An INTRODUCE without the TCP fields names 'tcp_public'; without the port, 'tcp_port'."""
    fields = SAMPLES[wire.INTRODUCE][1]
    data = wire.encode(wire.INTRODUCE, **fields)
    spans = field_spans(wire.INTRODUCE, fields)
    payload = data[wire.HEADER_SIZE:]
    raises_naming('tcp_public', frame(wire.INTRODUCE, payload[:spans['private'][1]]))
    raises_naming('tcp_port', frame(wire.INTRODUCE, payload[:spans['tcp_public'][1]]))
    assert spans['tcp_port'][1] == len(payload)


def test_previous_ack_and_data_formats_refused():
    """An ACK without its SACK bitmap, or a short bitmap, names 'sack'; an old DATA is refused."""
    raises_naming('sack', frame(wire.ACK, prefix() + struct.pack('!I', 3)))
    raises_naming('sack', frame(wire.ACK, prefix() + struct.pack('!I', 3) + bytes(31)))
    with pytest.raises(ProtocolError):
        wire.decode(frame(wire.DATA, prefix() + struct.pack('!IH', 3, 2) + b'hi' + MAC_A))


@pytest.mark.parametrize('type,v2_fields', [
    (wire.PUNCH, b''), (wire.PUNCH_ACK, b''), (wire.KEEPALIVE, b''),
    (wire.DATA, struct.pack('!IIH', 1, 0, 2) + b'hi'),
    (wire.ACK, struct.pack('!I', 3) + bytes(wire.SACK_BYTES)),
    (wire.END, struct.pack('!I', 1)),
], ids=lambda v: wire.TYPE_NAMES[v] if isinstance(v, int) else '')
def test_version_2_peer_payloads_refused(type, v2_fields):
    """A peer payload of version 2 (the token, the fields, no counter, no MAC) is refused."""
    flags = wire.FLAG_PUNCHING if type in wire.PUNCHING_TYPES else 0
    with pytest.raises(ProtocolError):
        wire.decode(frame(type, TOKEN_A + v2_fields, flags=flags))


@pytest.mark.parametrize('type,fields', [c for c in CASES if c[0] in wire.PEER_TYPES],
                         ids=[i for i, c in zip(CASE_IDS, CASES) if c[0] in wire.PEER_TYPES])
def test_peer_message_without_its_mac_names_mac(type, fields):
    """A peer message cut anywhere in its last 8 bytes names 'mac'."""
    data = wire.encode(type, **fields)
    for missing in range(1, wire.MAC_SIZE + 1):
        raises_naming('mac', frame(type, data[wire.HEADER_SIZE:-missing], flags=data[4]))


# ---------------------------------------------------------------------------
# Address obfuscation and amplification.


@pytest.mark.parametrize('host', [h for h, _ in V4 + V6])
def test_addresses_obfuscated_in_introduce(host):
    """The raw address bytes appear nowhere in an encoded INTRODUCE."""
    packed = ipaddress.ip_address(host).packed
    data = wire.encode(wire.INTRODUCE, name='zoë', session=TOKEN_B, role=0, public=(host, 5000),
                       port_delta=1, private=[(host, 5001)], tcp_public=(host, 5002),
                       tcp_port=5003)
    assert packed not in data
    message = wire.decode(data)
    assert message.public == (host, 5000)
    assert message.tcp_public == (host, 5002)


@pytest.mark.parametrize('host', [h for h, _ in V4 + V6])
def test_tcp_public_alone_obfuscated_in_introduce(host):
    """tcp_public is obfuscated too, when it is the only place the address appears."""
    packed = ipaddress.ip_address(host).packed
    data = wire.encode(wire.INTRODUCE, name='zoë', session=TOKEN_B, role=1, public=('::', 0),
                       port_delta=0, private=[], tcp_public=(host, 5002), tcp_port=5003)
    assert packed not in data
    assert wire.decode(data).tcp_public == (host, 5002)


@pytest.mark.parametrize('host', [h for h, _ in V4 + V6])
def test_addresses_obfuscated_in_mapping(host):
    """The raw address bytes appear nowhere in an encoded MAPPING reply."""
    packed = ipaddress.ip_address(host).packed
    data = wire.reply(wire.MAPPING, token=TOKEN_B, public=(host, 40000))
    assert packed not in data


def test_addresses_obfuscated_in_register():
    """Private endpoints in REGISTER are obfuscated too."""
    data = wire.encode(wire.REGISTER, name='alice', private=V4 + V6, tcp_port=7777,
                       proof=PROOF_A)
    for host, _ in V4 + V6:
        assert ipaddress.ip_address(host).packed not in data


@pytest.mark.parametrize('request_host,reply_host', [
    ('0.0.0.0', '203.0.113.99'),
    ('::', '2001:db8::99'),
    ('0.0.0.0', '2001:db8:ffff:ffff:ffff:ffff:ffff:ffff'),
    ('::', '198.18.0.1'),
])
def test_mapping_reply_not_larger_than_request(request_host, reply_host):
    """The MAPPING reply is exactly as long as the request: no amplification."""
    request = wire.encode(wire.MAPPING, token=TOKEN_A, public=(request_host, 0))
    answer = wire.reply(wire.MAPPING, token=TOKEN_A, public=(reply_host, 65535))
    assert len(answer) == len(request)
    assert len(request) == wire.HEADER_SIZE + wire.TOKEN_SIZE + wire.Endpoint.SIZE


# ---------------------------------------------------------------------------
# Malformed messages: the header.


def test_truncated_header():
    """Fewer than 8 bytes is a FramingError naming the header."""
    good = wire.encode(wire.LIST)
    for size in range(wire.HEADER_SIZE):
        error = raises_naming('header', good[:size])
        assert isinstance(error, FramingError)


@pytest.mark.parametrize('magic', [0, 0x3250, 0x5033, 0xffff])
def test_wrong_magic(magic):
    """Another magic number is a FramingError naming 'magic'."""
    assert isinstance(raises_naming('magic', frame(wire.LIST, b'', magic=magic)), FramingError)


@pytest.mark.parametrize('version', [0, 1, 2, 4, 255])
def test_wrong_version(version):
    """Another version (2 too: its peers sent the token) is a FramingError naming 'version'."""
    error = raises_naming('version', frame(wire.LIST, b'', version=version))
    assert isinstance(error, FramingError)


@pytest.mark.parametrize('type', [0, 14, 15, 30, 99, 255])
def test_unknown_type(type):
    """A type not in LAYOUTS names 'type'."""
    raises_naming('type', frame(type, b''))


@pytest.mark.parametrize('flags', [0x04, 0x08, 0x80, 0xff, 0x05])
def test_unknown_flags(flags):
    """Flag bits other than REPLY and PUNCHING name 'flags'."""
    raises_naming('flags', frame(wire.LIST, b'', flags=flags))


def test_known_flags_accepted():
    """Both known flags together are accepted (decode does not police them)."""
    message = wire.decode(frame(wire.LIST, b'', flags=wire.KNOWN_FLAGS))
    assert message.flags == wire.KNOWN_FLAGS


@pytest.mark.parametrize('delta', [-3, -1, 1, 100])
def test_header_length_does_not_match_datagram(delta):
    """A header length that is not the datagram's payload size names 'length'."""
    good = wire.encode(wire.ACK, **peer(seq=1, sack=bytes(wire.SACK_BYTES)))
    length = len(good) - wire.HEADER_SIZE + delta
    raises_naming('length', frame(wire.ACK, good[wire.HEADER_SIZE:], length=length))


def test_datagram_longer_than_header_says():
    """Extra bytes after a complete message (header not updated) name 'length'."""
    raises_naming('length', wire.encode(wire.PUNCH, **peer(nonce=NONCE_A)) + b'\0')


@pytest.mark.parametrize('type,fields', CASES, ids=CASE_IDS)
def test_trailing_bytes(type, fields):
    """Bytes after the last field, with a consistent header, name 'length'."""
    data = wire.encode(type, **fields)
    payload = data[wire.HEADER_SIZE:] + b'\0'
    raises_naming('length', frame(type, payload, flags=data[4]))


# ---------------------------------------------------------------------------
# Malformed messages: the fields.


@pytest.mark.parametrize('type,fields', [c for c in CASES if c[1]],
                         ids=[i for i, c in zip(CASE_IDS, CASES) if c[1]])
def test_truncated_fields(type, fields):
    """A payload cut anywhere names the field it was cut in."""
    data = wire.encode(type, **fields)
    payload = data[wire.HEADER_SIZE:]
    spans = field_spans(type, fields)
    step = 1 if len(payload) < 2000 else 97
    for cut in list(range(0, len(payload), step)) + [len(payload) - 1]:
        field = next(n for n, (start, end) in spans.items() if start <= cut < end)
        raises_naming(field, frame(type, payload[:cut], flags=data[4]))


@pytest.mark.parametrize('raw', [
    b'',                        # empty
    b'a' * 33,                  # one byte too long
    '日' * 11,                   # 33 bytes of multibyte UTF-8
    b'a b',                     # space
    b'a\tb',                    # tab
    b'\x1b[31m',                # escape: a control character
    b'a\nb',                    # newline
    b'\x7f',                    # DEL
    '\u200bx',                  # zero width space (format character)
    '\xa0',                     # no-break space
    b'\xff\xfe',                # not UTF-8
    b'\xc3',                    # truncated UTF-8 sequence
    b'\xed\xa0\x80',            # encoded surrogate
    b'\xc0\xaf',                # overlong encoding
], ids=repr)
def test_bad_name_rejected_on_decode(raw):
    """REGISTER, CONNECT, ASK, DECLINE, INTRODUCE and PEERS reject a bad name, naming the field."""
    raw = raw.encode('utf-8') if isinstance(raw, str) else raw
    name = pack_name(raw)
    raises_naming('name', frame(wire.REGISTER, name + b'\0' + struct.pack('!H', 7777) + PROOF_A))
    raises_naming('target', frame(wire.CONNECT, name))
    raises_naming('name', frame(wire.ASK, name))
    raises_naming('name', frame(wire.DECLINE, name + bytes([wire.DECLINED])))
    introduce = wire.encode(wire.INTRODUCE, **SAMPLES[wire.INTRODUCE][0])
    name_end = field_spans(wire.INTRODUCE, SAMPLES[wire.INTRODUCE][0])['name'][1]
    raises_naming('name', frame(wire.INTRODUCE, name + introduce[wire.HEADER_SIZE + name_end:]))
    peers = struct.pack('!H', 2) + pack_name(b'alice') + name
    raises_naming('names[1]', frame(wire.PEERS, peers))


@pytest.mark.parametrize('name', ['', 'a' * 33, '日' * 11, 'a b', 'a\tb', 'a\x1b', 'a\n',
                                  '\u200b'])
def test_bad_name_rejected_on_encode(name):
    """encode() refuses a name that decode() would refuse."""
    with pytest.raises(ProtocolError, match='^name'):
        wire.encode(wire.REGISTER, name=name, private=[], tcp_port=1, proof=PROOF_A)
    with pytest.raises(ProtocolError, match='^name'):
        wire.encode(wire.PEERS, names=['alice', name])
    with pytest.raises(ProtocolError, match='^name'):
        wire.encode(wire.DECLINE, name=name, why=wire.DECLINED)


def _with_family(type, fields, field, family, index=None):
    """Encode, then overwrite the family byte of one endpoint."""
    data = bytearray(wire.encode(type, **fields))
    start = wire.HEADER_SIZE + field_spans(type, fields)[field][0]
    if index is not None:
        start += 1 + index * wire.Endpoint.SIZE
    assert data[start] in (4, 6)
    data[start] = family
    return bytes(data)


@pytest.mark.parametrize('family', [0, 5, 7, 255])
def test_bad_address_family(family):
    """An unknown address family names the endpoint field."""
    introduce = SAMPLES[wire.INTRODUCE][2]
    raises_naming('public', _with_family(wire.INTRODUCE, introduce, 'public', family))
    raises_naming('private[0]', _with_family(wire.INTRODUCE, introduce, 'private', family, 0))
    raises_naming('private[15]', _with_family(wire.INTRODUCE, introduce, 'private', family, 15))
    for fields in SAMPLES[wire.INTRODUCE]:
        raises_naming('tcp_public', _with_family(wire.INTRODUCE, fields, 'tcp_public', family))
    register = SAMPLES[wire.REGISTER][3]
    raises_naming('private[2]', _with_family(wire.REGISTER, register, 'private', family, 2))
    mapping = SAMPLES[wire.MAPPING][2]
    raises_naming('public', _with_family(wire.MAPPING, mapping, 'public', family))


def test_ipv6_address_with_ipv4_family():
    """An IPv6 address labelled family 4 (non-zero padding) is refused, naming the field."""
    fields = dict(token=TOKEN_A, public=V6[0])
    raises_naming('public', _with_family(wire.MAPPING, fields, 'public', 4))
    introduce = SAMPLES[wire.INTRODUCE][1]      # tcp_public is IPv6
    raises_naming('tcp_public', _with_family(wire.INTRODUCE, introduce, 'tcp_public', 4))


def test_too_many_endpoints_on_decode():
    """A count over MAX_ENDPOINTS names the endpoint list."""
    endpoint = wire.ENDPOINT.pack(V4[0])
    count = wire.MAX_ENDPOINTS + 1
    payload = (pack_name(b'alice') + bytes([count]) + endpoint * count + struct.pack('!H', 1)
               + PROOF_A)
    raises_naming('private', frame(wire.REGISTER, payload))
    raises_naming('private', frame(wire.REGISTER, pack_name(b'alice') + b'\xff'))


def test_too_many_endpoints_on_encode():
    """encode() refuses more than MAX_ENDPOINTS endpoints."""
    with pytest.raises(ProtocolError, match='endpoints'):
        wire.encode(wire.REGISTER, name='alice', private=MAX_LIST + [V4[0]], tcp_port=1,
                    proof=PROOF_A)


def test_endpoint_count_lying():
    """A count larger than the endpoints present names the missing one."""
    port = struct.pack('!H', 7777) + PROOF_A
    payload = pack_name(b'alice') + bytes([3]) + wire.ENDPOINT.pack(V4[0]) * 2 + port
    raises_naming('private[2]', frame(wire.REGISTER, payload))
    payload = pack_name(b'alice') + bytes([1]) + wire.ENDPOINT.pack(V4[0]) * 2 + port
    raises_naming('length', frame(wire.REGISTER, payload))


def test_oversize_text_on_decode():
    """Text over MAX_TEXT bytes names the text field, in ERROR and DATA."""
    text = b'x' * (wire.MAX_TEXT + 1)
    counted = struct.pack('!H', len(text)) + text
    raises_naming('text', frame(wire.ERROR, struct.pack('!H', 1) + counted))
    raises_naming('text', frame(wire.DATA, prefix() + struct.pack('!II', 1, 0) + counted + MAC_A))


def test_oversize_text_on_encode():
    """encode() refuses text over MAX_TEXT bytes of UTF-8 (counting bytes, not chars)."""
    with pytest.raises(ProtocolError, match='text'):
        wire.encode(wire.ERROR, code=1, text='x' * (wire.MAX_TEXT + 1))
    with pytest.raises(ProtocolError, match='text'):
        wire.encode(wire.DATA, **peer(seq=1, oldest=0, text='é' * (wire.MAX_TEXT // 2 + 1)))


def test_text_not_utf8():
    """Text that is not UTF-8 names the text field."""
    bad = b'\xff\xfe'
    raises_naming('text', frame(wire.DATA, prefix() + struct.pack('!IIH', 1, 0, 2) + bad + MAC_A))


def test_names_count_lying():
    """A NAMES count larger than the names names the missing one; smaller leaves trailing
    bytes; over MAX_PEERS_LISTED names the list."""
    two = pack_name(b'alice') + pack_name('zoë'.encode())
    raises_naming('names[2]', frame(wire.PEERS, struct.pack('!H', 3) + two))
    raises_naming('length', frame(wire.PEERS, struct.pack('!H', 1) + two))
    raises_naming('names', frame(wire.PEERS, struct.pack('!H', wire.MAX_PEERS_LISTED + 1)))
    raises_naming('names', frame(wire.PEERS, struct.pack('!H', 0xffff) + two))
    raises_naming('names', frame(wire.PEERS, b'\x00'))


def test_blob_length_lying():
    """A RELAY blob longer than the payload names 'message'."""
    raises_naming('message', frame(wire.RELAY, TOKEN_A + struct.pack('!H', 10) + b'abc'))


def test_oversize_payload_on_encode():
    """A payload over the 16-bit length refuses to encode."""
    with pytest.raises(ProtocolError, match='payload'):
        wire.encode(wire.RELAY, session=TOKEN_A, message=bytes(wire.MAX_PAYLOAD))


def test_struct_field_out_of_range_on_encode():
    """An integer field out of range is a ProtocolError, not struct.error."""
    with pytest.raises(ProtocolError):
        wire.encode(wire.ACK, **peer(seq=2**32, sack=bytes(wire.SACK_BYTES)))
    with pytest.raises(ProtocolError):
        wire.encode(wire.ACK, **peer(counter=2**64, seq=1, sack=bytes(wire.SACK_BYTES)))
    with pytest.raises(ProtocolError):
        wire.encode(wire.KEEPALIVE, **peer(counter=-1))
    with pytest.raises(ProtocolError):
        wire.encode(wire.INTRODUCE, name='a', session=TOKEN_A, role=0, public=V4[0],
                    port_delta=40000, private=[], tcp_public=V4[1], tcp_port=1)
    with pytest.raises(ProtocolError):
        wire.encode(wire.INTRODUCE, name='a', session=TOKEN_A, role=0, public=V4[0],
                    port_delta=0, private=[], tcp_public=V4[1], tcp_port=65536)
    with pytest.raises(ProtocolError):
        wire.encode(wire.INTRODUCE, name='a', session=TOKEN_A, role=256, public=V4[0],
                    port_delta=0, private=[], tcp_public=V4[1], tcp_port=1)
    with pytest.raises(ProtocolError):
        wire.encode(wire.REGISTER, name='a', private=[], tcp_port=-1, proof=PROOF_A)
    with pytest.raises(ProtocolError):
        wire.encode(wire.DECLINE, name='a', why=256)
    with pytest.raises(ProtocolError):
        wire.encode(wire.INTRODUCE, name='a', session=TOKEN_A, role=0, public=V4[0],
                    port_delta=0, private=[], tcp_public=('203.0.113.1', 65536), tcp_port=1)


@pytest.mark.parametrize('port', [65536, -1])
def test_endpoint_port_out_of_range_on_encode(port):
    """An endpoint port out of range is a ProtocolError like any other bad field."""
    with pytest.raises(ProtocolError):
        wire.encode(wire.MAPPING, token=TOKEN_A, public=('203.0.113.1', port))


def test_too_many_names_on_encode():
    """encode() refuses a PEERS list that decode() would refuse."""
    names = [f'p{i}' for i in range(wire.MAX_PEERS_LISTED + 1)]
    with pytest.raises(ProtocolError):
        wire.encode(wire.PEERS, names=names)


# ---------------------------------------------------------------------------
# Fuzzing: decode() raises ProtocolError and nothing else.


def _decode_or_protocol_error(data):
    """Decode data; return the Message or None on ProtocolError (anything else fails)."""
    try:
        return wire.decode(data)
    except ProtocolError:
        return None


def _check_canonical(data, message):
    """A decoded message re-encodes to the same bytes.

    Except the flags (encode adds PUNCHING) and the reserved byte, which decode
    ignores, as reserved bits usually are.
    """
    if message is None:
        return
    again = wire.encode(message.type, message.flags, **message.fields)
    assert again[:4] + again[6:] == data[:4] + data[6:]
    assert again[4] == expected_flags(message.type, message.flags)


def test_random_bytes_only_raise_protocol_error():
    """Thousands of random inputs (some with a valid header) only raise ProtocolError."""
    rng = random.Random(20240601)
    types = sorted(wire.LAYOUTS)
    decoded = 0
    for i in range(6000):
        size = rng.randrange(0, 80)
        body = bytes(rng.getrandbits(8) for _ in range(size))
        if i % 3 == 0:
            data = body
        else:
            # A good header, so that the payload decoders see the random bytes.
            type = rng.choice(types) if i % 3 == 1 else rng.randrange(256)
            flags = rng.choice([0, 1, 2, 3, rng.randrange(256)])
            length = size if rng.random() < 0.9 else rng.randrange(65536)
            data = frame(type, body, flags=flags, length=length)
        message = _decode_or_protocol_error(data)
        _check_canonical(data, message)
        decoded += message is not None
    assert decoded > 0          # some random payloads are valid (LIST, short PUNCHes...)


def test_mutations_only_raise_protocol_error():
    """Bit flips and truncations of valid messages of every type only raise ProtocolError."""
    rng = random.Random(7)
    decoded_types = set()
    for type, fields in CASES:
        data = wire.encode(type, **fields)
        bits = range(len(data) * 8)
        if len(data) > 300:
            # Long messages (1000-byte texts, 1000 names): a sample of the flips.
            bits = rng.sample(bits, 1000 if len(data) < 2000 else 100)
        for bit in bits:
            mutated = bytearray(data)
            mutated[bit // 8] ^= 1 << (bit % 8)
            message = _decode_or_protocol_error(bytes(mutated))
            _check_canonical(bytes(mutated), message)
            if message is not None:
                decoded_types.add(message.type)
        cuts = range(len(data)) if len(data) <= 300 else rng.sample(range(len(data)), 100)
        for cut in cuts:
            assert _decode_or_protocol_error(data[:cut]) is None
        for _ in range(20):
            # Several random flips at once, and random garbage appended.
            mutated = bytearray(data)
            for _ in range(rng.randrange(2, 6)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            _check_canonical(bytes(mutated), _decode_or_protocol_error(bytes(mutated)))
            _decode_or_protocol_error(data + bytes(rng.randrange(1, 5)))
    # Flips inside payloads often still decode: the fuzzing reached every decoder.
    assert decoded_types == set(wire.LAYOUTS)


# ---------------------------------------------------------------------------
# FrameReader: TCP framing.


STREAM = [wire.encode(t, **f) for t, f in CASES if t != wire.PEERS] + [
    wire.encode(wire.PEERS, names=NAMES)]


def test_frame_reader_one_byte_at_a_time():
    """Frames fed one byte at a time are reassembled whole and in order."""
    reader = wire.FrameReader()
    got = []
    stream = b''.join(STREAM[:12])
    for i in range(len(stream)):
        reader.feed(stream[i:i + 1])
        got.extend(reader.frames())
        assert reader.pending == len(stream[:i + 1]) - sum(map(len, got))
    assert got == STREAM[:12]
    assert reader.pending == 0


def test_frame_reader_many_in_one_feed():
    """Several messages in one feed come out as separate frames."""
    reader = wire.FrameReader()
    reader.feed(b''.join(STREAM))
    frames = list(reader.frames())
    assert frames == STREAM
    assert [wire.decode(f) for f in frames] == [wire.decode(m) for m in STREAM]
    assert reader.pending == 0


def test_frame_reader_keeps_partial_tail():
    """A complete frame is yielded while a partial one waits for the rest."""
    reader = wire.FrameReader()
    first, second = STREAM[0], STREAM[1]
    reader.feed(first + second[:5])
    assert list(reader.frames()) == [first]
    assert reader.pending == 5
    reader.feed(second[5:-1])
    assert list(reader.frames()) == []
    reader.feed(second[-1:])
    assert list(reader.frames()) == [second]


def test_frame_reader_bad_magic():
    """A bad magic is a FramingError: the stream cannot be resynchronised."""
    reader = wire.FrameReader()
    reader.feed(STREAM[0] + frame(wire.LIST, b'', magic=0x4854))   # 'HT'TP...
    frames = reader.frames()
    assert next(frames) == STREAM[0]
    with pytest.raises(FramingError, match='magic'):
        next(frames)


def test_frame_reader_bad_version():
    """Another version is a FramingError."""
    reader = wire.FrameReader()
    reader.feed(frame(wire.LIST, b'', version=1))
    with pytest.raises(FramingError, match='version'):
        list(reader.frames())


def test_frame_reader_length_over_max():
    """A length over max_length is a FramingError, before the payload arrives."""
    reader = wire.FrameReader(max_length=100)
    reader.feed(frame(wire.RELAY, b'', length=101))
    with pytest.raises(FramingError, match='length'):
        list(reader.frames())
    reader = wire.FrameReader(max_length=100)
    reader.feed(frame(wire.RELAY, b'x' * 100))
    assert len(list(reader.frames())) == 1


def test_frame_reader_delimits_unknown_type():
    """A frame of unknown type is delimited, and only decode() complains about it."""
    bad = frame(99, b'whatever')
    bad_flags = frame(wire.LIST, b'', flags=0x40)
    good = wire.encode(wire.CONNECT, target='zoë')
    reader = wire.FrameReader()
    reader.feed(bad + bad_flags + good)
    frames = list(reader.frames())
    assert frames == [bad, bad_flags, good]
    for broken, field in [(frames[0], 'type'), (frames[1], 'flags')]:
        with pytest.raises(ProtocolError, match=f'^{field}') as info:
            wire.decode(broken)
        assert not isinstance(info.value, FramingError)
    assert wire.decode(frames[2]).target == 'zoë'


def test_frame_reader_delimits_bad_field():
    """A frame with a bad field is delimited; the next frame decodes."""
    bad = frame(wire.CONNECT, pack_name(b'a b'))
    good = wire.encode(wire.LIST)
    reader = wire.FrameReader()
    reader.feed(bad + good)
    frames = list(reader.frames())
    assert frames == [bad, good]
    with pytest.raises(ProtocolError, match='^target'):
        wire.decode(frames[0])
    assert wire.decode(frames[1]).type == wire.LIST


# ---------------------------------------------------------------------------
# Endpoints and names.


@pytest.mark.parametrize('text,expected', [
    ('203.0.113.5', ('203.0.113.5', wire.DEFAULT_PORT)),
    ('203.0.113.5:7000', ('203.0.113.5', 7000)),
    ('rendezvous.example', ('rendezvous.example', wire.DEFAULT_PORT)),
    ('rendezvous.example:1', ('rendezvous.example', 1)),
    ('[2001:db8::1]:7000', ('2001:db8::1', 7000)),
    ('[2001:db8::1]', ('2001:db8::1', wire.DEFAULT_PORT)),
    ('2001:db8::1', ('2001:db8::1', wire.DEFAULT_PORT)),
    ('198.18.0.1:65535', ('198.18.0.1', 65535)),
])
def test_parse_endpoint(text, expected):
    """HOST, HOST:PORT and [V6]:PORT parse; a bare IPv6 address takes the default port."""
    assert wire.parse_endpoint(text) == expected


def test_parse_endpoint_default_port():
    """The default port is used when none is given."""
    assert wire.parse_endpoint('203.0.113.5', 9) == ('203.0.113.5', 9)
    assert wire.parse_endpoint('[2001:db8::1]', 9) == ('2001:db8::1', 9)


@pytest.mark.parametrize('text', [
    '203.0.113.5:', '203.0.113.5:abc', '203.0.113.5:0', '203.0.113.5:65536',
    '203.0.113.5:-1', '[2001:db8::1]:', '[2001:db8::1]:x', '[2001:db8::1]:70000',
    ':7000', '[]:7000', '',
])
def test_parse_endpoint_errors(text):
    """A bad or missing port, or an empty host, is a ValueError."""
    with pytest.raises(ValueError):
        wire.parse_endpoint(text)


@pytest.mark.parametrize('text', ['[2001:db8::1]7000', '[2001:db8::1]x:7000', '[2001:db8::1'])
def test_parse_endpoint_rejects_junk_after_bracket(text):
    """'[V6]' must be followed by ':PORT' or nothing; a typo is not silently ignored."""
    with pytest.raises(ValueError):
        wire.parse_endpoint(text)


@pytest.mark.parametrize('endpoint,text', [
    (('203.0.113.2', 40000), '203.0.113.2:40000'),
    (('2001:db8::2', 40000), '[2001:db8::2]:40000'),
    (('2001:db8::2', 40000, 0, 0), '[2001:db8::2]:40000'),
])
def test_format_endpoint(endpoint, text):
    """IPv6 hosts are bracketed, IPv4 hosts are not; 4-tuples are accepted."""
    assert wire.format_endpoint(endpoint) == text


@pytest.mark.parametrize('endpoint', V4 + V6)
def test_format_then_parse(endpoint):
    """parse_endpoint(format_endpoint(e)) == e."""
    assert wire.parse_endpoint(wire.format_endpoint(endpoint)) == endpoint


def test_same_endpoint():
    """Host and port are compared as addresses; IPv6 flowinfo and scope id are ignored."""
    assert wire.same_endpoint(('2001:db8::1', 7000, 0, 0), ('2001:db8::1', 7000))
    assert wire.same_endpoint(('2001:db8::1', 7000, 5, 3), ('2001:db8:0::1', 7000, 0, 0))
    assert wire.same_endpoint(('2001:DB8::1', 7000), ('2001:db8:0:0:0:0:0:1', 7000))
    assert wire.same_endpoint(('203.0.113.1', 7000), ('203.0.113.1', 7000))
    assert not wire.same_endpoint(('2001:db8::1', 7000, 0, 0), ('2001:db8::1', 7001, 0, 0))
    assert not wire.same_endpoint(('2001:db8::1', 7000), ('2001:db8::2', 7000))
    assert not wire.same_endpoint(('203.0.113.1', 7000), ('203.0.113.2', 7000))


def test_family_of():
    """family_of picks AF_INET or AF_INET6 from the address."""
    import socket
    assert wire.family_of('198.51.100.1') == socket.AF_INET
    assert wire.family_of('2001:db8::1') == socket.AF_INET6


@pytest.mark.parametrize('text,shown', [
    ('hello, zoë 日本 🙂', 'hello, zoë 日本 🙂'),
    ('\x1b[2Jcleared', '\\x1b[2Jcleared'),
    ('line\nfake status', 'line\\nfake status'),
    ('cr\roverwrite', 'cr\\roverwrite'),
    ('tab\t', 'tab\\t'),
    ('nul\0', 'nul\\x00'),
    ('rtl\u202egpj.exe', 'rtl\\u202egpj.exe'),
    ('del\x7f', 'del\\x7f'),
    ('', ''),
])
def test_safe(text, shown):
    """safe() shows control and format characters as escapes and keeps the rest."""
    assert wire.safe(text) == shown
    assert wire.safe(text).isprintable()


@pytest.mark.parametrize('name', NAMES + ['a', 'x-y_z.1', '🙂', 'ñ' * 16])
def test_check_name_accepts(name):
    """1 to 32 bytes of printable UTF-8 with no whitespace is a good name."""
    wire.check_name(name)


@pytest.mark.parametrize('name', ['', 'a' * 33, '日' * 11, 'ñ' * 16 + 'x', 'a b', ' a', 'a ',
                                  'a\tb', 'a\nb', 'a\rb', '\x1b', '\x00', '\x7f', '\u200b',
                                  '\xa0', '\u2028', '\u3000', 'a\u202eb'])
def test_check_name_rejects(name):
    """Empty, over 32 bytes, whitespace, control or format characters are refused."""
    with pytest.raises(ProtocolError, match='^name'):
        wire.check_name(name)


def test_check_name_counts_bytes_not_characters():
    """The 32 limit is on UTF-8 bytes: 11 three-byte characters are too many."""
    wire.check_name('日' * 10)
    with pytest.raises(ProtocolError, match='33 bytes'):
        wire.check_name('日' * 11)


def test_check_name_field_and_size():
    """The error names the given field; an explicit size overrides the computed one."""
    with pytest.raises(ProtocolError, match='^target'):
        wire.check_name('', field='target')
    with pytest.raises(ProtocolError, match='^name'):
        wire.check_name('abc', size=33)
    wire.check_name('abc', size=32)


# ---------------------------------------------------------------------------
# plain(): socket addresses as the wire and the user see them.


@pytest.mark.parametrize('address,expected', [
    (('::ffff:203.0.113.5', 4000), ('203.0.113.5', 4000)),
    (('::ffff:203.0.113.5', 4000, 0, 0), ('203.0.113.5', 4000)),
    (('::FFFF:cb00:7105', 1, 0, 0), ('203.0.113.5', 1)),
    (('::ffff:0.0.0.0', 0), ('0.0.0.0', 0)),
    (('::ffff:198.19.255.255', 65535, 5, 2), ('198.19.255.255', 65535)),
    (('203.0.113.5', 4000), ('203.0.113.5', 4000)),
    (('2001:db8::1', 40001, 0, 0), ('2001:db8::1', 40001)),
    (('2001:DB8:0:0::1', 40001), ('2001:db8::1', 40001)),
    (('::1', 7, 0, 0), ('::1', 7)),
    (('::', 0, 0, 0), ('::', 0)),
])
def test_plain(address, expected):
    """IPv4-mapped IPv6 becomes IPv4; other addresses are canonical; 4-tuples lose the tail."""
    assert wire.plain(address) == expected
    assert type(wire.plain(address)) is tuple


@pytest.mark.parametrize('host', ['::cb00:7105', '64:ff9b::cb00:7105', '2002:cb00:7105::1'])
def test_plain_leaves_other_embeddings_alone(host):
    """Only ::ffff:a.b.c.d is IPv4: IPv4-compatible, NAT64 and 6to4 stay IPv6."""
    result = wire.plain((host, 9, 0, 0))
    assert ipaddress.ip_address(result[0]).version == 6
    assert result == (str(ipaddress.ip_address(host)), 9)


def test_plain_rejects_names():
    """plain() takes addresses, not host names."""
    with pytest.raises(ValueError):
        wire.plain(('localhost', 1))


# ---------------------------------------------------------------------------
# UDPSocket: one socket for IPv4 and IPv6, speaking plain endpoints.


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(('::1', 0))
        return True
    except OSError:
        return False


HAS_IPV6_LOOPBACK = _has_ipv6_loopback()


def _receive(udp, timeout=2.0):
    """One datagram from a UDPSocket, or fail after timeout seconds."""
    ready = select.select([udp], [], [], timeout)[0]
    assert ready, 'no datagram arrived'
    return udp.recvfrom(65535)


@pytest.fixture
def udp_pair():
    """Two UDPSockets on ephemeral ports, closed afterwards."""
    a, b = wire.UDPSocket(), wire.UDPSocket()
    yield a, b
    a.close()
    b.close()


def test_udp_socket_ipv4(udp_pair):
    """Sending to ('127.0.0.1', port) arrives; the source reads as plain IPv4."""
    a, b = udp_pair
    assert a.port != b.port and 0 < a.port < 65536
    a.sendto(b'hello', ('127.0.0.1', b.port))
    data, source = _receive(b)
    assert data == b'hello'
    assert source == ('127.0.0.1', a.port)
    b.sendto(b'back', source)                  # the source is good to answer
    assert _receive(a) == (b'back', ('127.0.0.1', b.port))


def test_udp_socket_ipv6(udp_pair):
    """On a dual-stack socket, ('::1', port) works too and reads as '::1'."""
    a, b = udp_pair
    if not a.dual or not HAS_IPV6_LOOPBACK:
        pytest.skip('no IPv6 loopback here')
    a.sendto(b'six', ('::1', b.port))
    assert _receive(b) == (b'six', ('::1', a.port))
    a.sendto(b'four', ('::1', b.port, 0, 0))   # a 4-tuple socket address is fine too
    assert _receive(b) == (b'four', ('::1', a.port))
    a.sendto(b'mixed', ('127.0.0.1', b.port))
    assert _receive(b) == (b'mixed', ('127.0.0.1', a.port))


def test_udp_socket_is_dual_stack_where_ipv6_exists():
    """Where the system has IPv6 the socket is AF_INET6 with V6ONLY off, bound to '::'."""
    udp = wire.UDPSocket()
    try:
        if not socket.has_ipv6 or not HAS_IPV6_LOOPBACK:
            pytest.skip('no IPv6 here')
        assert udp.dual
        assert udp.sock.family == socket.AF_INET6
        assert udp.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        assert udp.sock.getsockname()[0] == '::'
    finally:
        udp.close()


def test_udp_socket_bind_and_port(udp_pair):
    """bind= picks the local address and port= the port; port reads what was bound."""
    if not HAS_IPV6_LOOPBACK:
        pytest.skip('no IPv6 loopback here')
    a, _ = udp_pair
    first = wire.UDPSocket(bind='::1')
    try:
        port = first.port
        assert first.sock.getsockname()[:2] == ('::1', port)
        first.close()
        first = wire.UDPSocket(port, bind='::1')
        assert first.port == port
        a.sendto(b'to ::1 only', ('::1', port))
        assert _receive(first) == (b'to ::1 only', ('::1', a.port))
    finally:
        first.close()


def test_udp_socket_port_in_use_raises_and_closes(monkeypatch):
    """A port already taken raises OSError, and the half-made socket is closed."""
    taken = wire.UDPSocket()
    made = []
    real = socket.socket

    def spy(*args, **kwargs):
        sock = real(*args, **kwargs)
        made.append(sock)
        return sock

    monkeypatch.setattr(wire.socket, 'socket', spy)
    try:
        with pytest.raises(OSError):
            wire.UDPSocket(taken.port)
        assert made and all(sock.fileno() == -1 for sock in made)
    finally:
        taken.close()


def test_udp_socket_non_blocking_and_selectable(udp_pair):
    """setblocking(False) makes an empty recvfrom raise; fileno() works with selectors."""
    a, b = udp_pair
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recvfrom(100)
    with selectors.DefaultSelector() as selector:
        selector.register(b, selectors.EVENT_READ)
        assert selector.select(0) == []
        a.sendto(b'x', ('127.0.0.1', b.port))
        assert [key.fileobj for key, _ in selector.select(2.0)] == [b]
    assert b.recvfrom(100) == (b'x', ('127.0.0.1', a.port))


def test_udp_socket_bind_ipv4_address():
    """bind='127.0.0.1' on a dual-stack socket listens on IPv4 loopback, like sendto's hosts."""
    udp = wire.UDPSocket(bind='127.0.0.1')
    try:
        assert wire.plain(udp.sock.getsockname()) == ('127.0.0.1', udp.port)
    finally:
        udp.close()


# ---------------------------------------------------------------------------
# FramedStream: framed messages over a non-blocking stream socket.


class Endpoint:
    """One side of a socketpair wrapped in a FramedStream; records what it is told."""

    def __init__(self, sock, selector):
        self.messages = []
        self.closed = []
        self.stream = wire.FramedStream(sock, selector, self.messages.append,
                                        self.closed.append)


def pump(selector, rounds=10000):
    """Drive the selector by hand until nothing is ready (or rounds run out)."""
    for _ in range(rounds):
        events = selector.select(0)
        if not events:
            return
        for key, mask in events:
            key.data(key.fileobj, mask)
    raise AssertionError('the streams never settled')


@pytest.fixture
def streams():
    """Two FramedStreams joined by a socketpair, on one hand-driven selector."""
    selector = selectors.DefaultSelector()
    left, right = socket.socketpair()
    a, b = Endpoint(left, selector), Endpoint(right, selector)
    yield a, b, selector
    a.stream.close()
    b.stream.close()
    selector.close()


def test_framed_stream_both_directions(streams):
    """Messages sent either way arrive decoded, whole and in order."""
    a, b, selector = streams
    sent_ab = [wire.encode(t, **f) for t, f in CASES[:20]]
    sent_ba = [wire.encode(t, **f) for t, f in CASES[20:40]]
    for data in sent_ab:
        a.stream.send(data)
    b.stream.send(b''.join(sent_ba))           # several messages in one send
    pump(selector)
    assert b.messages == [wire.decode(m) for m in sent_ab]
    assert a.messages == [wire.decode(m) for m in sent_ba]
    assert a.closed == b.closed == []
    assert a.stream.open and b.stream.open


def test_framed_stream_over_tcp_sends_each_message_at_once():
    """TCP_NODELAY: no message waits for the previous one's acknowledgement (Nagle)."""
    with socket.create_server(('127.0.0.1', 0)) as listener, \
            socket.create_connection(listener.getsockname()) as client, \
            selectors.DefaultSelector() as selector:
        stream = wire.FramedStream(client, selector, lambda message: None, lambda why: None)
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        stream.close()


def test_framed_stream_partial_writes_queued(streams):
    """What the socket does not take stays queued, with write interest, until it drains."""
    a, b, selector = streams
    a.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.stream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = [wire.encode(wire.RELAY, session=TOKEN_A, message=bytes([i]) * 60000)
           for i in range(20)]
    for data in big:
        a.stream.send(data)
    assert len(a.stream.output) > 0            # 1.2 MB do not fit in the socket buffers
    assert selector.get_key(a.stream.sock).events == selectors.EVENT_READ | selectors.EVENT_WRITE
    a.stream.send(wire.encode(wire.LIST))      # queued behind, not interleaved
    pump(selector)
    assert b.messages == [wire.decode(m) for m in big] + [wire.Message(wire.LIST)]
    assert a.stream.output == bytearray()
    assert selector.get_key(a.stream.sock).events == selectors.EVENT_READ
    assert a.closed == b.closed == []


def test_framed_stream_other_side_closes(streams):
    """When the other side closes, on_closed is called once with a reason; our own close
    calls nothing."""
    a, b, selector = streams
    b.stream.send(wire.encode(wire.LIST))
    b.stream.close()
    assert not b.stream.open
    pump(selector)
    assert a.messages == [wire.Message(wire.LIST)]     # what came before the close is read
    assert len(a.closed) == 1
    assert 'closed' in a.closed[0]
    assert not a.stream.open
    assert b.closed == []                      # we closed it ourselves: nothing to tell
    a.stream.close()                           # closing again is harmless
    a.stream.send(wire.encode(wire.LIST))      # and so is sending on a closed stream
    pump(selector)
    assert len(a.closed) == 1
    assert selector.get_map() == {}


def test_framed_stream_close_with_reason(streams):
    """close(why) tells on_closed; close() does not; either way the socket is unregistered."""
    a, b, selector = streams
    a.stream.close('we are leaving')
    assert a.closed == ['we are leaving']
    a.stream.close('again')
    assert a.closed == ['we are leaving']
    pump(selector)
    assert len(b.closed) == 1 and b.closed[0]


def test_framed_stream_bad_magic_closes(streams):
    """A stream that loses its framing is closed, naming the problem."""
    a, b, selector = streams
    b.stream.sock.send(wire.encode(wire.LIST) + b'GET / HTTP/1.1\r\n\r\n')
    pump(selector)
    assert a.messages == [wire.Message(wire.LIST)]
    assert len(a.closed) == 1
    assert 'bad message' in a.closed[0] and 'magic' in a.closed[0]
    assert not a.stream.open


def test_framed_stream_bad_field_closes(streams):
    """A well-framed message with a bad field closes the stream too: a peer that lies."""
    a, b, selector = streams
    b.stream.send(frame(wire.CONNECT, pack_name(b'a b')) + wire.encode(wire.LIST))
    pump(selector)
    assert a.messages == []
    assert len(a.closed) == 1 and 'target' in a.closed[0]


def test_framed_stream_length_over_reader_limit():
    """A custom FrameReader's max_length is enforced: a longer frame closes the stream."""
    left, right = socket.socketpair()
    closed, messages = [], []
    with selectors.DefaultSelector() as selector:
        stream = wire.FramedStream(left, selector, messages.append, closed.append,
                                   reader=wire.FrameReader(max_length=10))
        right.send(wire.encode(wire.LIST) + wire.encode(wire.PUNCH, **peer(nonce=NONCE_A)))
        pump(selector)
        assert messages == [wire.Message(wire.LIST)]
        assert len(closed) == 1 and 'length' in closed[0]
        assert not stream.open
    right.close()


def test_framed_stream_closed_by_its_own_handler(streams):
    """on_message may close the stream: the rest of that read is dropped, quietly."""
    a, b, selector = streams
    seen = []

    def first_only(message):
        seen.append(message)
        a.stream.close()

    a.stream.on_message = first_only
    b.stream.send(wire.encode(wire.LIST) * 3)
    pump(selector)
    assert seen == [wire.Message(wire.LIST)]
    assert a.closed == []


def test_framed_stream_send_to_closed_peer(streams):
    """Writing to a peer that has gone reports the error through on_closed, once."""
    a, b, selector = streams
    b.stream.close()
    a.stream.send(wire.encode(wire.LIST))
    pump(selector)
    assert len(a.closed) == 1 and a.closed[0]
    assert not a.stream.open


def test_framed_stream_closed_earlier_in_the_same_batch():
    """A stream closed by another stream's handler ignores its stale write event."""
    selector = selectors.DefaultSelector()
    left1, right1 = socket.socketpair()
    left2, right2 = socket.socketpair()
    left2.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    closed = []
    second = wire.FramedStream(left2, selector, lambda m: None, closed.append)
    first = wire.FramedStream(left1, selector, lambda m: second.close(), closed.append)
    try:
        second.send(wire.encode(wire.RELAY, session=TOKEN_A, message=bytes(60000)) * 4)
        assert second.output                   # waiting for write interest
        right2.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while right2.recv(1 << 20):        # drain: second becomes writable
                pass
        right1.send(wire.encode(wire.LIST))    # first becomes readable
        events = selector.select(1.0)
        # The loop serves first, whose handler closes second; then second's event.
        events.sort(key=lambda event: event[0].fileobj is left2)
        assert [key.fileobj for key, _ in events] == [left1, left2]
        for key, mask in events:
            key.data(key.fileobj, mask)
        assert not second.open and closed == []
    finally:
        first.close()
        second.close()
        for sock in (right1, right2):
            sock.close()
        selector.close()
