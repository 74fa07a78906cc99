"""Hostile input and faults: the server and the client keep working for everyone else."""

import random
import resource
import select
import signal
import socket
import time

import pytest

import p2pcommon as wire
from identity import SessionKey
from procs import command, start, start_server
from test_server import RawPeer, introduce

CONNECTED = r'^\* connected to {} at .* \(direct, (?:tcp, )?\d+ ms\)$'


@pytest.fixture
def server(request):
    """A rendezvous server; a test may pass its options with @pytest.mark.server_args."""
    marker = request.node.get_closest_marker('server_args')
    proc, port = start_server(*(marker.args if marker else ()))
    yield proc, port
    proc.stop()
    assert not [line for line in proc.err.lines if 'Traceback' in line], proc.transcript()


@pytest.fixture
def pair(server):
    """alice and bob, registered and connected directly."""
    port = server[1]
    procs = [start(command('p2pclient.py', name, '--server', f'127.0.0.1:{port}'), name)
             for name in ('alice', 'bob')]
    alice, bob = procs
    for proc in procs:
        proc.expect(r'^\* registered as ')
    alice.send('/connect bob')
    bob.expect(r'^\* alice asks to connect')
    bob.send('/connect alice')
    for proc, peer in ((alice, 'bob'), (bob, 'alice')):
        if 'tcp' not in proc.expect(CONNECTED.format(peer)).group(0):
            # UDP won the race; on loopback TCP stands too, and takes over.
            proc.expect(rf'^\* connected to {peer} at \S+ \(direct, tcp, \d+ ms\)$')
    yield alice, bob
    for proc in procs:
        proc.stop()
        assert proc.err.lines == [], proc.transcript()


def chat(alice, bob, text):
    """A line from alice to bob arrives, as ever."""
    alice.send(text)
    bob.expect(rf'^<alice> {text}$')


def samples():
    """One valid encoding of every message type."""
    token = bytes(range(16))
    key = SessionKey(token, 0)
    endpoint = ('198.51.100.7', 4000)
    fields = {
        wire.REGISTER: dict(name='mallory', private=[endpoint], tcp_port=5, proof=bytes(16)),
        wire.REGISTERED: dict(token=token), wire.ERROR: dict(code=1, text='x'),
        wire.MAPPING: dict(token=token, public=endpoint), wire.LIST: {},
        wire.PEERS: dict(names=['a', 'b']), wire.CONNECT: dict(target='alice'),
        wire.ASK: dict(name='alice'), wire.DECLINE: dict(name='alice', why=0),
        wire.ALIVE: {}, wire.CHALLENGE: dict(nonce=bytes(16)),
        wire.INTRODUCE: dict(name='a', session=token, role=0, public=endpoint, port_delta=1,
                             private=[endpoint], tcp_public=endpoint, tcp_port=5),
        wire.RELAY: dict(session=token, message=b'x' * 40), wire.BYE: {},
    }
    sealed = [key.seal(wire.PUNCH, nonce=bytes(16)), key.seal(wire.PUNCH_ACK),
              key.seal(wire.DATA, seq=1, oldest=0, text='hello'),
              key.seal(wire.ACK, seq=1, sack=bytes(wire.SACK_BYTES)),
              key.seal(wire.KEEPALIVE), key.seal(wire.GOODBYE)]
    return [wire.encode(type, **f) for type, f in fields.items()] + sealed


def mutate(rng, data):
    """A broken copy of data: flipped bits, cut short, lying length, junk."""
    data = bytearray(data)
    how = rng.randrange(6)
    if how == 0:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == 1:
        del data[rng.randrange(len(data)):]
    elif how == 2:
        data[6:8] = rng.randrange(65536).to_bytes(2, 'big')
    elif how == 3:
        data[2] = rng.choice([0, 1, 255])                     # version
    elif how == 4:
        data += bytes([40]) + bytes(rng.randrange(256) for _ in range(40))   # huge name
    else:
        data = bytearray(rng.randbytes(rng.randrange(1, 300)))
    return bytes(data)


def test_udp_fuzz_is_dropped_counted_and_everyone_else_is_served(server, pair):
    proc, port = server
    alice, bob = pair
    rng = random.Random(4)
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for round in range(6):
            for _ in range(500):
                data = mutate(rng, rng.choice(samples()))
                sock.sendto(data, ('127.0.0.1', port + rng.randrange(2)))
                sent += 1
            chat(alice, bob, f'still chatting {round}')
    carol = start(command('p2pclient.py', 'carol', '--server', f'127.0.0.1:{port}'), 'carol')
    carol.send('/connect alice')
    alice.expect(r'^\* carol asks to connect')
    alice.send('/connect carol')
    carol.expect(CONNECTED.format('alice'))
    carol.stop()
    proc.popen.send_signal(signal.SIGTERM)
    proc.wait()
    summary = proc.expect_log(r'dropped (\d+) datagrams: ')
    assert 0 < int(summary.group(1)) <= sent
    assert len(proc.err.lines) < 50                     # a summary, not a line per packet


@pytest.mark.server_args('--accept-rate', '0', '--request-rate', '0')   # parsing, not limits
def test_tcp_fuzz_gets_errors_or_a_close_and_everyone_else_is_served(server, pair):
    _, port = server
    alice, bob = pair
    rng = random.Random(5)
    for round in range(200):
        with socket.create_connection(('127.0.0.1', port), timeout=5) as sock:
            frames = b''.join(mutate(rng, rng.choice(samples())) for _ in range(5))
            sock.sendall(frames)
            sock.shutdown(socket.SHUT_WR)
            reader = wire.FrameReader()
            while data := sock.recv(65536):
                reader.feed(data)
            for frame in reader.frames():
                message = wire.decode(frame)
                assert message.type in (wire.ERROR, wire.REGISTERED, wire.PEERS,
                                        wire.ASK, wire.ALIVE)
                if message.type == wire.ERROR:
                    assert ':' in message.text or ' ' in message.text
        if round % 50 == 0:
            chat(alice, bob, f'still chatting {round}')
    proc = server[0]
    proc.popen.send_signal(signal.SIGTERM)
    proc.wait()
    refused = proc.expect_log(r'refused (\d+) requests and connections: ')
    assert int(refused.group(1)) > 200
    assert len(proc.err.lines) < 50                     # a summary, not a line per frame


def test_a_malformed_frame_gets_an_error_that_names_the_field(server):
    with RawPeer(server[1]) as peer:
        peer.tcp.sendall(wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.CONNECT, 0, 3)
                         + b'\x05ab')
        error = peer.receive()
        assert (error.code, error.text) == (wire.E_BAD_MESSAGE,
                                            'target: says 5 bytes, only 2 left')
        peer.register('alice')                        # the stream is still in step


def test_garbage_to_a_clients_udp_port_is_ignored_silently(server, pair):
    alice, bob = pair
    port = int(alice.lines[0].split('public endpoint 127.0.0.1:')[1].split()[0])
    seen = len(alice.lines)
    rng = random.Random(6)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _ in range(2000):
            sock.sendto(mutate(rng, rng.choice(samples())), ('127.0.0.1', port))
    bob.send('after the garbage')
    alice.expect(r'^<bob> after the garbage$')
    assert alice.lines[seen:] == ['<bob> after the garbage']


def test_an_endless_stdin_line_is_cut_not_fatal(pair):
    alice, bob = pair
    alice.popen.stdin.write('x' * 200_000 + '\n')
    alice.popen.stdin.flush()
    chat(alice, bob, 'and the next line')
    received = sum(len(line) - len('<alice> ') for line in bob.lines
                   if line.startswith('<alice> x'))
    assert received == 200_000


def test_no_udp_reply_is_larger_than_its_request(server):
    _, port = server
    sent = {}                                 # socket -> the request it sent
    try:
        for request in samples():
            for target in (port, port + 1):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.sendto(request, ('127.0.0.1', target))
                sent[sock] = request
        answered = 0
        deadline = time.monotonic() + 1.0     # replies come at once; wait out stragglers
        while time.monotonic() < deadline:
            for sock in select.select(list(sent), [], [], 0.1)[0]:
                answer = sock.recv(65536)
                assert len(answer) <= len(sent[sock]), wire.decode(sent[sock])
                answered += 1
        assert answered == 2                  # only MAPPING is answered, on both ports
    finally:
        for sock in sent:
            sock.close()


@pytest.mark.server_args('--max-per-address', '5')
def test_connections_per_address_are_limited(server):
    _, port = server
    held = [socket.create_connection(('127.0.0.1', port), timeout=5) for _ in range(5)]
    try:
        with socket.create_connection(('127.0.0.1', port), timeout=5) as extra:
            assert extra.recv(100) == b''               # closed at once
        held.pop().close()
        deadline = time.monotonic() + 5                 # until the server sees the close
        while True:
            try:
                with RawPeer(port, 'alice'):            # a slot is free again
                    break
            except (ConnectionError, AssertionError):
                assert time.monotonic() < deadline, 'the freed slot was never reused'
    finally:
        for sock in held:
            sock.close()


@pytest.mark.server_args('--register-timeout', '0.5')
def test_a_connection_that_never_registers_is_closed(server):
    with socket.create_connection(('127.0.0.1', server[1]), timeout=5) as idle:
        assert idle.recv(100) == b''                    # within the 5 s timeout


@pytest.mark.server_args('--max-output', '65536')
def test_a_peer_that_never_reads_is_dropped_and_others_go_on(server):
    port = server[1]
    with RawPeer(port, 'eve', receive_buffer=4096) as eve, RawPeer(port, 'bob') as bob, \
            RawPeer(port, 'alice') as alice:
        introduce(bob, eve)
        eve.tcp.setblocking(False)
        deadline = time.monotonic() + 60
        closed = False
        while not closed and time.monotonic() < deadline:   # LIST after LIST, never reading
            try:
                eve.tcp.send(wire.encode(wire.LIST) * 100)
            except BlockingIOError:
                pass
            except OSError:
                closed = True                       # the server closed the connection
        assert closed, 'the server still writes to a peer that never reads'
        told = bob.receive()                        # eve's partner: the relay is gone
        assert told.type == wire.RELAY and told.message == b''
        alice.send(wire.LIST)
        assert alice.receive().names == ['alice', 'bob']


@pytest.mark.server_args('--max-output', '65536', '--relay-rate', '0')
def test_relayed_traffic_to_a_slow_reader_is_dropped_not_the_reader(server):
    """Relayed messages are datagrams: past half the limit they are dropped, and counted."""
    proc, port = server
    with RawPeer(port, 'eve', receive_buffer=4096) as eve, RawPeer(port, 'bob') as bob:
        session = introduce(bob, eve)[0].session
        junk = SessionKey(session, 0).seal(wire.DATA, seq=0, oldest=0, text='x' * 1000)
        for _ in range(8000):       # 8 MB for eve, who reads nothing: more than kernel buffers
            bob.send(wire.RELAY, session=session, message=junk)
        bob.send(wire.LIST)
        assert bob.receive().names == ['bob', 'eve']    # eve is still there
        proc.popen.send_signal(signal.SIGTERM)
        proc.wait()
    summary = proc.expect_log(r'dropped (\d+) relayed messages: (.*)$')
    assert 'to a peer that reads too slowly' in summary.group(2)
    assert 0 < int(summary.group(1)) < 8000


@pytest.mark.server_args('--mapping-rate', '10')
def test_mapping_requests_are_rate_limited_per_address(server):
    port = server[1]
    request = wire.encode(wire.MAPPING, token=bytes(16), public=('0.0.0.0', 0))
    answers = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        for _ in range(100):
            sock.sendto(request, ('127.0.0.1', port))
        try:
            while sock.recv(100):
                answers += 1
        except TimeoutError:
            pass
    assert 15 <= answers <= 30                          # a burst of 20, then 10 a second


def test_connect_requests_are_rate_limited_per_peer(server):
    with RawPeer(server[1], 'alice') as alice, RawPeer(server[1], 'bob'):
        for _ in range(20):
            alice.send(wire.CONNECT, target='bob')
        replies = [alice.receive() for _ in range(20)]
        limited = [r for r in replies if r.type == wire.ERROR]
        assert limited and limited[0].text == 'too many connect requests: at most 5 a second'
        assert len(limited) < 20


def test_silent_partial_and_deaf_connections_do_not_slow_anyone(server):
    port = server[1]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    hostile = []
    try:
        for i in range(1000):                 # 1,000 that send nothing, from 17 addresses
            sock = socket.socket()
            sock.bind((f'127.0.0.{2 + i // 60}', 0))
            sock.connect(('127.0.0.1', port))
            hostile.append(sock)
        partial = socket.create_connection(('127.0.0.1', port))
        partial.sendall(wire.encode(wire.LIST)[:5])        # a frame that never completes
        deaf = socket.create_connection(('127.0.0.1', port))
        deaf.sendall(wire.encode(wire.REGISTER, name='deaf', private=[], tcp_port=0,
                                 proof=bytes(16)) +
                     wire.encode(wire.LIST) * 2000)       # and never reads a reply
        hostile += [partial, deaf]
        names = ('alice', 'bob')
        procs = [start(command('p2pclient.py', name, '--server', f'127.0.0.1:{port}'), name)
                 for name in names]
        try:
            for proc in procs:
                proc.expect(r'^\* registered as ', timeout=5)
            procs[0].send('/connect bob')
            procs[1].expect(r'^\* alice asks to connect', timeout=5)
            procs[1].send('/connect alice')
            procs[0].expect(CONNECTED.format('bob'), timeout=5)
            chat(procs[0], procs[1], 'nobody slowed us down')
        finally:
            for proc in procs:
                proc.stop()
    finally:
        for sock in hostile:
            sock.close()


def test_kill_9_keeps_the_name_for_its_owner(server, pair):
    alice, bob = pair
    bob.popen.kill()
    with pytest.raises(AssertionError, match='taken'):
        RawPeer(server[1], 'bob')                       # a stranger cannot take it
    again = start(command('p2pclient.py', 'bob', '--server', f'127.0.0.1:{server[1]}'), 'bob')
    try:
        again.expect(r'^\* registered as bob ')        # bob, with his key, takes it back
    finally:
        again.stop()


@pytest.mark.parametrize('family, padding', [(5, bytes(12)), (4, b'\1' * 12)])
def test_a_mapping_request_with_a_bad_endpoint_is_dropped(server, family, padding):
    """The fast path answers only what the full decoder would accept."""
    _, port = server
    good = wire.encode(wire.MAPPING, token=bytes(16), public=('0.0.0.0', 0))
    xored_padding = bytes(a ^ b for a, b in zip(padding, wire.XOR_ADDRESS[4:]))
    endpoint = bytes([family]) + good[-18:-12] + xored_padding     # port, IPv4, padding
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(good[:-19] + endpoint, ('127.0.0.1', port))
        with pytest.raises(TimeoutError):
            sock.recv(100)
        sock.sendto(good, ('127.0.0.1', port))             # the good one is answered
        assert len(sock.recv(100)) == len(good)


@pytest.fixture
def open_alice(server, pair):
    """alice accepts anyone (--allow '*'), chatting with bob, who accepts only alice."""
    port = server[1]
    alice, bob = pair
    alice.send('/quit')
    alice.wait()
    alice = start(command('p2pclient.py', 'alice', '--server', f'127.0.0.1:{port}', '--allow',
                          '*'), 'alice')
    try:
        alice.expect(r'^\* registered as ')
        alice.send('/connect bob')
        bob.expect(r'^\* alice asks to connect')
        bob.send('/connect alice')
        alice.expect(CONNECTED.format('bob'))
        yield alice, bob
    finally:
        alice.stop()
    assert alice.err.lines == [], alice.transcript()


def mallory_meets(alice, port):
    """mallory, registered, asks alice (who allows anyone): (mallory, her INTRODUCE)."""
    mallory = RawPeer(port, 'mallory')
    mallory.send(wire.CONNECT, target='alice')
    assert mallory.receive().type == wire.ASK
    alice.expect(r'^\* mallory asks to connect; accepted \(--allow\)$')
    introduction = mallory.receive()
    assert introduction.type == wire.INTRODUCE
    return mallory, introduction


def test_numbers_at_their_limit_from_a_peer_crash_nobody(server, open_alice):
    alice, bob = open_alice
    mallory, introduction = mallory_meets(alice, server[1])
    with mallory:
        key = SessionKey(introduction.session, introduction.role)
        last = 2**32 - 1
        attacks = [key.seal(wire.DATA, seq=last, oldest=last, text='x'),
                   key.seal(wire.DATA, seq=last - 1, oldest=last - 1, text='x'),
                   key.seal(wire.ACK, seq=last, sack=b'\xff' * wire.SACK_BYTES),
                   key.seal(wire.CHUNK, transfer=last, seq=last, oldest=last, data=b'x'),
                   key.seal(wire.OFFER, transfer=last, size=2**64 - 1, sha256=bytes(32),
                            name='../../etc/passwd')]
        for data in attacks:
            mallory.udp.sendto(data, introduction.public)       # straight to alice
            mallory.send(wire.RELAY, session=introduction.session, message=data)
        mallory.send(wire.LIST)
        answer = mallory.receive()
        while answer.type != wire.PEERS:                    # past relayed answers
            answer = mallory.receive()
        assert answer.names == ['alice', 'bob', 'mallory']
    chat(alice, bob, 'alice is still here')
    bob.send('and so is bob')
    alice.expect(r'^<bob> and so is bob$')


def test_a_stranger_who_connects_does_not_take_the_chat(server, open_alice):
    alice, bob = open_alice
    mallory, introduction = mallory_meets(alice, server[1])
    with mallory:
        key = SessionKey(introduction.session, introduction.role)
        mallory.udp.sendto(key.seal(wire.PUNCH, nonce=bytes(16)), introduction.public)
        alice.expect(r'^\* connected to mallory ')
        alice.expect(r'^\* what you type still goes to bob; /to mallory to change$')
        chat(alice, bob, 'for bob only')
        mallory.udp.settimeout(0.5)
        heard = []
        try:
            while True:
                heard.append(wire.decode(mallory.udp.recv(2048)))
        except TimeoutError:
            pass
        assert not [m for m in heard if m.type == wire.DATA]


def test_nothing_goes_toward_an_asker_before_consent(server, pair):
    alice, bob = pair
    with RawPeer(server[1], 'mallory') as mallory:
        mallory.send(wire.CONNECT, target='alice')
        assert mallory.receive() == wire.Message(wire.ASK, wire.FLAG_REPLY, name='alice')
        alice.expect(r'^\* mallory asks to connect: /connect mallory to accept, '
                     r'/reject mallory to decline$')
        alice.send('/reject mallory')
        assert mallory.receive() == wire.Message(wire.DECLINE, wire.FLAG_REPLY,
                                                 name='alice', why=wire.DECLINED)
        mallory.udp.setblocking(False)
        with pytest.raises(BlockingIOError):       # alice sent it nothing, ever
            mallory.udp.recv(2048)
    chat(alice, bob, 'and bob never noticed')
