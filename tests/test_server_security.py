"""The rendezvous server on the open internet: consent, names, floods, limits.

Each test drives the real server with raw protocol messages and checks
what a user would notice: who hears what, whose name stays whose, and that
a legitimate peer is still served while strangers misbehave.
"""

import os
import socket
import threading
import time

import pytest

import limits
import p2pcommon as wire
import rendezvous
from procs import start_server
from test_server import RawPeer, introduce, proof_of, sealed


def error_of(peer):
    """The next message, which must be an ERROR: (code, text)."""
    message = peer.receive()
    assert message.type == wire.ERROR, message
    return message.code, message.text


def asked(asker, target):
    """asker sends CONNECT; the server asks target and tells asker so (point 8's two flags)."""
    asker.send(wire.CONNECT, target=target.name)
    assert asker.receive() == wire.Message(wire.ASK, wire.FLAG_REPLY, name=target.name)
    assert target.receive() == wire.Message(wire.ASK, name=asker.name)


def declined(peer, name, why):
    """The next message is the server's word that name declined or did not answer."""
    assert peer.receive() == wire.Message(wire.DECLINE, wire.FLAG_REPLY, name=name, why=why)


def nothing_else_came(peer):
    """True when nothing is queued for peer: a LIST's answer is the next message."""
    peer.send(wire.LIST)
    message = peer.receive()
    return message.type == wire.PEERS or message


# -- consent (article point 4) -------------------------------------------------


def test_connect_asks_the_target_and_tells_it_only_the_name(peers):
    alice, bob = peers('alice'), peers('bob')
    asked(alice, bob)
    assert nothing_else_came(alice) is True         # no INTRODUCE before bob agrees
    assert nothing_else_came(bob) is True


def test_the_target_agrees_by_connecting_back(peers):
    alice, bob = peers('alice'), peers('bob')
    to_alice, to_bob = introduce(alice, bob)
    assert to_alice.session == to_bob.session
    assert (to_alice.role, to_bob.role) == (0, 1)


def test_the_target_declines_and_the_asker_hears_so(peers):
    alice, bob = peers('alice'), peers('bob')
    asked(alice, bob)
    bob.send(wire.DECLINE, name='alice', why=wire.DECLINED)
    declined(alice, 'bob', wire.DECLINED)
    asked(bob, alice)                               # a new question, not a yes
    assert nothing_else_came(bob) is True


def test_declining_what_nobody_asked_says_so(peers):
    alice, bob = peers('alice'), peers('bob')
    bob.send(wire.DECLINE, name='alice', why=wire.DECLINED)
    assert error_of(bob) == (wire.E_UNKNOWN_PEER, "no request from 'alice'")
    assert nothing_else_came(alice) is True


@pytest.mark.server_args('--ask-timeout', '0.5')
def test_an_unanswered_ask_runs_out(peers):
    alice, bob = peers('alice'), peers('bob')
    asked(alice, bob)
    declined(alice, 'bob', wire.NO_ANSWER)
    asked(bob, alice)                               # too late: a new question


def test_an_ask_to_a_peer_that_leaves_ends(peers):
    alice, bob = peers('alice'), peers('bob')
    asked(alice, bob)
    bob.close()
    declined(alice, 'bob', wire.NO_ANSWER)


@pytest.mark.server_args('--max-asks', '2')
def test_one_target_has_a_bounded_number_of_asks_waiting(peers):
    bob = peers('bob')
    askers = [peers(f'asker{i}') for i in range(3)]
    for asker in askers:
        asker.send(wire.CONNECT, target='bob')
    assert [bob.receive().name for _ in range(2)] == ['asker0', 'asker1']
    assert [asker.receive().type for asker in askers[:2]] == [wire.ASK, wire.ASK]
    assert error_of(askers[2]) == (wire.E_TOO_MANY, 'bob has 2 requests waiting; '
                                                    'try again later')
    assert nothing_else_came(bob) is True
    bob.send(wire.CONNECT, target='asker0')         # answering one frees a place
    assert bob.receive().type == askers[0].receive().type == wire.INTRODUCE
    asked(askers[2], bob)


# -- errors that quote a bad name ------------------------------------------------

# 255 bytes that the server quotes in its error: 'é' is one character and two
# bytes, each control byte four characters ('\x01'): 1,000 characters of
# the error are more than the 1,000 bytes an ERROR may carry.
LONG_BAD_NAME = 'é'.encode() + b'\x01' * 253


def frame(type, payload):
    """A message with a payload built by hand (our encoder refuses bad names)."""
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, type, 0, len(payload)) + payload


def counted_name(raw):
    """A name field holding any bytes."""
    return bytes([len(raw)]) + raw


@pytest.mark.parametrize('request_with_bad_name', [
    'register', 'connect', 'relay'])
def test_an_error_quoting_a_long_bad_name_fits_the_wire(peers, request_with_bad_name):
    alice, bob = peers('alice'), peers('bob')
    mallory = peers() if request_with_bad_name == 'register' else peers('mallory')
    if request_with_bad_name == 'register':
        mallory.tcp.sendall(frame(wire.REGISTER, counted_name(LONG_BAD_NAME) + b'\0'
                                  + bytes(2) + bytes(wire.PROOF_SIZE)))
    elif request_with_bad_name == 'connect':
        mallory.tcp.sendall(frame(wire.CONNECT, counted_name(LONG_BAD_NAME)))
    else:
        session = introduce(mallory, alice)[0].session
        inner = frame(wire.CONNECT, counted_name(LONG_BAD_NAME))
        mallory.send(wire.RELAY, session=session, message=inner)
    code, text = error_of(mallory)
    assert code == wire.E_BAD_MESSAGE and 'bytes, must be 1 to 32' in text
    assert len(text.encode()) <= wire.MAX_TEXT
    introduce(alice, bob)                           # and everyone else is served


# -- names that belong to someone ------------------------------------------------


def refused(peer, name, proof=None):
    """Register name and expect an ERROR: (code, text, whether the server closed)."""
    peer.send_register(name, proof)
    code, text = error_of(peer)
    peer.tcp.settimeout(0.5)
    try:
        closed = peer.tcp.recv(100) == b''
    except TimeoutError:
        closed = False
    peer.tcp.settimeout(5)
    return code, text, closed


def listed(peer):
    """The names a LIST shows."""
    peer.send(wire.LIST)
    return peer.receive().names


MALLORY = proof_of('bob', key=b'mallory has another key')


def test_a_name_stays_with_the_key_that_registered_it(peers):
    peers('bob')
    assert refused(peers(), 'bob', MALLORY) == (wire.E_NAME_TAKEN, "name 'bob' is taken", True)
    assert listed(peers('carol')) == ['bob', 'carol']


@pytest.mark.parametrize('lookalike, reading', [
    ('Bob', 'another case'), ('BOB', 'capitals'), ('ｂｏｂ', 'fullwidth')])
def test_a_name_that_reads_as_a_taken_one_is_taken(peers, lookalike, reading):
    bob = peers('bob')
    assert refused(peers(), lookalike, MALLORY) == (
        wire.E_NAME_TAKEN, f"name {lookalike!r} is taken (it reads as 'bob')", True)
    carol = peers('carol')
    carol.send(wire.CONNECT, target=lookalike)      # lookups read names the same way
    assert bob.receive() == wire.Message(wire.ASK, name='carol')


@pytest.mark.parametrize('name, reason', [
    ('bоb', 'name: mixes Latin and Cyrillic'),
    ('bοb', 'name: mixes Latin and Greek'),
    ('bo\u0336b', "name: a combining mark on 'o', U+0336 (COMBINING LONG STROKE OVERLAY); "
                  "use a letter that has the mark"),
    ('bob\u3164', 'name: holds an invisible character, U+3164 (HANGUL FILLER)'),
    ('\u2800bob', 'name: holds an invisible character, U+2800 (BRAILLE PATTERN BLANK)'),
    ('bob\u115f', 'name: holds an invisible character, U+115F (HANGUL CHOSEONG FILLER)'),
    ('b\uffa0ob', 'name: holds an invisible character, U+FFA0 (HALFWIDTH HANGUL FILLER)'),
])
def test_a_name_that_does_not_read_reliably_is_refused_with_the_reason(peers, name, reason):
    bob = peers('bob')
    assert refused(peers(), name) == (wire.E_BAD_MESSAGE, reason, False)
    assert listed(bob) == ['bob']


def test_names_in_one_script_are_welcome(peers):
    for name in ('Zoë', 'Zoe\u0308b', 'Алиса', 'さくら', 'dev-01', 'dev-さくら', 'नमस्ते'):
        peers(name)
    assert len(listed(peers('bob'))) == 8


def test_the_owners_new_connection_takes_the_name_over(peers):
    old, carol = peers('bob'), peers('carol')
    new = peers('bob')                              # same key: the same user
    assert error_of(old) == (wire.E_NAME_TAKEN,
                             'a new connection with your key took over your name')
    assert old.tcp.recv(100) == b''
    carol.send(wire.CONNECT, target='bob')
    assert new.receive() == wire.Message(wire.ASK, name='carol')


def test_a_name_is_kept_for_its_owner_after_the_connection_closes(peers):
    alice, bob = peers('alice'), peers('bob')
    asked(alice, bob)
    bob.close()
    declined(alice, 'bob', wire.NO_ANSWER)          # bob is gone
    assert refused(peers(), 'bob', MALLORY)[:2] == (wire.E_NAME_TAKEN, "name 'bob' is taken")
    assert peers('bob').token                       # and its owner has it back


@pytest.mark.server_args('--name-hold', '0.3', '--accept-rate', '0')
def test_a_name_kept_too_long_is_free_again(server, peers):
    bob = peers('bob')
    bob.close()
    deadline = time.monotonic() + 5
    while True:                                     # until the server frees it
        mallory = RawPeer(server[1])
        mallory.send_register('bob', MALLORY)
        reply = mallory.receive()
        mallory.close()
        if reply.type == wire.REGISTERED:
            break
        assert reply.code == wire.E_NAME_TAKEN and time.monotonic() < deadline


# -- bounded everything ------------------------------------------------------------


def test_alive_is_answered(peers):
    alice = peers('alice')
    alice.send(wire.ALIVE)
    assert alice.receive() == wire.Message(wire.ALIVE, wire.FLAG_REPLY)


@pytest.mark.server_args('--idle-timeout', '0.5')
def test_a_silent_peer_is_closed_and_one_that_says_alive_is_not(peers):
    silent, talker = peers('silent'), peers('talker')
    silent.tcp.settimeout(0.1)
    deadline = time.monotonic() + 5
    while True:                                     # until the server closes it
        talker.send(wire.ALIVE)
        assert talker.receive().type == wire.ALIVE
        try:
            if silent.tcp.recv(100) == b'':
                break
        except TimeoutError:
            assert time.monotonic() < deadline, 'the silent peer was never closed'
    assert introduce(talker, peers('bob'))          # the talker is served still


def test_control_connections_ask_the_kernel_for_keepalives():
    """A dead peer sends no FIN: its connection must still close, in process here.

    (An addition, limits.LimitsMixIn: the article's Rendezvous alone asks for none.)
    """
    server = rendezvous.Server(['127.0.0.1'], 0)
    try:
        with socket.create_connection(('127.0.0.1', server.port)):
            deadline = time.monotonic() + 5
            while not server.connections and time.monotonic() < deadline:
                server.serve_once(0.5)
            sock = next(iter(server.connections))
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000
    finally:
        for key in list(server.selector.get_map().values()):
            key.fileobj.close()


@pytest.mark.server_args('--request-rate', '2')
def test_requests_past_the_budget_get_an_error(peers):
    alice = peers('alice')                          # REGISTER took one of the 4
    for _ in range(5):
        alice.send(wire.ALIVE)
    assert [alice.receive().type for _ in range(5)] == [wire.ALIVE] * 3 + [wire.ERROR] * 2


@pytest.mark.server_args('--list-rate', '1')
def test_lists_past_their_rate_get_an_error(peers):
    alice = peers('alice')
    for _ in range(3):
        alice.send(wire.LIST)
    assert [alice.receive().type for _ in range(2)] == [wire.PEERS, wire.PEERS]
    assert error_of(alice) == (wire.E_RATE_LIMITED, 'too many list requests: at most 1 a second')


@pytest.mark.server_args('--list-rate', '0')
def test_the_list_follows_who_comes_and_goes(peers):
    alice = peers('alice')
    assert listed(alice) == ['alice']
    bob = peers('bob')
    assert listed(alice) == ['alice', 'bob']
    asked(alice, bob)
    bob.close()
    declined(alice, 'bob', wire.NO_ANSWER)          # the server saw bob leave
    assert listed(alice) == ['alice']


def stranger(port, host='127.0.0.2'):
    """A control connection from another loopback address (another source)."""
    sock = socket.socket()
    sock.bind((host, 0))
    sock.settimeout(5)
    sock.connect(('127.0.0.1', port))
    return sock


@pytest.mark.server_args('--accept-rate', '5')
def test_a_source_that_connects_too_fast_is_cut_off_and_no_one_else(server, peers):
    flood = [stranger(server[1]) for _ in range(20)]
    closed = 0
    for sock in flood:
        sock.sendall(wire.encode(wire.ALIVE))
        try:
            closed += sock.recv(100) == b''
        except ConnectionResetError:
            closed += 1
        sock.close()
    assert closed >= 10                             # a burst of 10, then 5 a second
    assert introduce(peers('alice'), peers('bob'))


@pytest.mark.server_args('--relay-rate', '600')
def test_a_session_relays_at_most_its_byte_rate(server, peers):
    alice, bob, carol = peers('alice'), peers('bob'), peers('carol')
    session = introduce(alice, bob)[0].session
    data = sealed(session, wire.DATA, seq=0, oldest=0, text='x' * 500)    # 541 bytes
    for _ in range(5):
        alice.send(wire.RELAY, session=session, message=data)
    assert nothing_else_came(alice) is True         # all five handled by now
    carol.send(wire.CONNECT, target='bob')          # a marker behind what was relayed
    received = []
    while not received or received[-1] != wire.ASK:
        received.append(bob.receive().type)
    assert received == [wire.RELAY, wire.RELAY, wire.ASK]     # a burst of 1,200 bytes
    server[0].popen.terminate()
    server[0].expect_log(r'dropped 3 relayed messages: 3 over the session rate$')


def test_udp_that_is_not_a_mapping_request_is_dropped_and_counted_by_reason(server, peers):
    proc, port = server
    alice = peers('alice')
    for junk in (b'x', os.urandom(100), wire.encode(wire.LIST),
                 sealed(bytes(16), wire.KEEPALIVE),
                 wire.encode(wire.MAPPING, token=bytes(16), public=('0.0.0.0', 0))[:-1]):
        alice.udp.sendto(junk, ('127.0.0.1', port))
    for name in ('x1', 'x2', 'x3'):                 # errors counted by reason, not by text
        alice.send(wire.CONNECT, target=name)
        assert error_of(alice)[0] == wire.E_UNKNOWN_PEER
    assert alice.mapping(alice.token).public == alice.udp.getsockname()
    proc.popen.terminate()                          # SIGTERM: the last summary
    proc.expect_log(r'dropped 5 datagrams: 5 not a mapping request$')
    proc.expect_log(r'refused 3 requests and connections: 3 unknown peer$')


def test_ipv6_sources_count_per_network():
    assert limits.address_key('2001:db8::1', 64) == limits.address_key('2001:db8::ff:2', 64)
    assert limits.address_key('2001:db8::1', 128) != limits.address_key('2001:db8::2', 128)
    assert limits.address_key('2001:db8:0:1::1', 64) != limits.address_key('2001:db8::1', 64)
    assert limits.address_key('192.0.2.1', 64) == '192.0.2.1'


# -- floods: a legitimate peer is served while they run -------------------------------


def list_flood(port, stop):
    """A registered stranger sends LIST without end and never reads."""
    while not stop.is_set():
        with stranger(port) as sock:
            sock.sendall(wire.encode(wire.REGISTER, name=f'l{os.getpid()}', private=[],
                                     tcp_port=0, proof=os.urandom(16)))
            try:
                while not stop.is_set():
                    sock.sendall(wire.encode(wire.LIST) * 100)
            except OSError:
                pass                                # dropped: come again


def register_flood(port, stop):
    """Strangers try to take alice's name and lookalikes of it, a connection each."""
    for attempt in range(1_000_000):
        if stop.is_set():
            return
        try:
            with stranger(port, '127.0.0.3') as sock:
                name = ('alice', 'Alice', 'аlice', 'alice\u3164')[attempt % 4]
                sock.sendall(wire.encode(wire.REGISTER, name=name, private=[], tcp_port=0,
                                         proof=os.urandom(16)))
                sock.recv(100)
        except OSError:
            pass


def udp_flood(port, stop):
    """Junk datagrams at both UDP ports, as fast as we can make them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(('127.0.0.4', 0))
        junk = [os.urandom(n) for n in (1, 43, 100, 1200)] + [wire.encode(wire.LIST)]
        while not stop.is_set():
            for data in junk:
                for target in (port, port + 1):
                    udp.sendto(data, ('127.0.0.1', target))


def register_resending_mapping(peer, name):
    """Register as a real client does: MAPPING again until answered (UDP may be lost)."""
    peer.send_register(name)
    peer.token, peer.name = peer.receive().token, name
    peer.udp.settimeout(0.2)
    for _ in range(25):
        try:
            return peer.mapping(peer.token)
        except TimeoutError:
            pass
    raise AssertionError('no MAPPING answered in 5 s')


@pytest.mark.parametrize('flood', [list_flood, register_flood, udp_flood])
def test_a_legitimate_peer_is_served_during_a_flood(flood):
    proc, port = start_server()         # not -v: a log line per junk message is a flood too
    stop = threading.Event()
    with RawPeer(port, 'alice') as alice:
        threads = [threading.Thread(target=flood, args=(port, stop), daemon=True)
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            started = time.monotonic()
            with RawPeer(port) as bob:
                register_resending_mapping(bob, 'bob')
                introduce(bob, alice)
                assert listed(bob)[:2] == ['alice', 'bob']
            assert time.monotonic() - started < 5
        finally:
            stop.set()
            for thread in threads:
                thread.join(10)
            proc.stop()
    assert not [line for line in proc.err.lines if 'Traceback' in line], proc.transcript()


@pytest.mark.server_args('--connect-rate', '0', '--request-rate', '0', '--accept-rate', '0')
def test_strangers_connecting_cannot_evict_a_session(peers):
    alice, bob = peers('alice'), peers('bob')
    to_alice, _ = introduce(alice, bob)
    strangers = [peers(f'mallory{i}') for i in range(3)]
    for _ in range(limits.MAX_SESSIONS + 10):          # more than a peer may hold
        for stranger in strangers:
            stranger.send(wire.CONNECT, target='alice')
    message = sealed(to_alice.session, wire.DATA, role=1, seq=0, oldest=0, text='still here')
    bob.send(wire.RELAY, session=to_alice.session, message=message)
    answer = alice.receive()
    while answer.type == wire.ASK:                          # the strangers' questions
        answer = alice.receive()
    assert answer == wire.Message(wire.RELAY, wire.FLAG_REPLY, session=to_alice.session,
                                  message=message)
