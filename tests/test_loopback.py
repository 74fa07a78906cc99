"""End to end on loopback: the real server and clients, driven through stdin."""

import os
import pty
import signal
import socket
import subprocess
import termios

import pytest

import p2pcommon as wire
from labpeers import chat_both_ways
from procs import Proc, command, start, start_server

CONNECTED = r'^\* connected to {} at 127\.0\.0\.1:\d+ \(direct, (?:tcp, )?\d+ ms\)$'


@pytest.fixture
def server():
    """A rendezvous server on a free port; yields its port."""
    proc, port = start_server()
    yield port
    proc.stop()
    assert not [line for line in proc.err.lines if 'Traceback' in line], proc.transcript()


@pytest.fixture
def clients(server):
    """A factory for registered clients; checks at the end that none crashed."""
    started = []

    def client(name, *args, register=True, **options):
        """options go to Popen: env=, umask= ..."""
        proc = start(command('p2pclient.py', name, '--server', f'127.0.0.1:{server}', *args),
                     name, **options)
        started.append(proc)
        if register:
            proc.expect(rf'^\* registered as {name} with 127\.0\.0\.1:{server}; '
                        r'public endpoint 127\.0\.0\.1:\d+')
        return proc

    yield client
    for proc in started:
        proc.stop()
        assert proc.err.lines == [], proc.transcript()


def connect(alice, bob):
    """alice asks bob, bob says yes; both say how they are connected (direct, on loopback)."""
    alice.send(f'/connect {bob.label}')
    consent(alice, bob)
    alice.expect(CONNECTED.format(bob.label))
    bob.expect(CONNECTED.format(alice.label))


def consent(alice, bob):
    """bob is asked about alice's request and says yes."""
    bob.expect(rf'^\* {alice.label} asks to connect: /connect {alice.label} to accept, '
               rf'/reject {alice.label} to decline$')
    bob.send(f'/connect {alice.label}')


def test_connect_by_name_and_chat_both_ways(clients):
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    alice.send('hello bob')
    bob.expect(r'^<alice> hello bob$')
    bob.send('hi alice')
    alice.expect(r'^<bob> hi alice$')


def test_connect_on_the_command_line(clients):
    bob = clients('bob')
    alice = clients('alice', '--connect', 'bob')
    consent(alice, bob)
    alice.expect(CONNECTED.format('bob'))


def test_the_article_alone_connects_and_chats(clients):
    """--article runs the core Peer without any addition: UDP, consent, the punch, chat."""
    alice, bob = clients('alice', '--article'), clients('bob', '--article')
    connect(alice, bob)
    alice.send('hello bob, from the article')
    bob.expect(r'^<alice> hello bob, from the article$')
    bob.send('/help')
    bob.expect(r'^  /help +this text$')
    assert not [line for line in bob.out.lines if '/send' in line or '/status' in line]
    bob.send('/quit')
    alice.expect(r'^\* bob left$')


def test_the_article_alone_says_what_it_does_not_have(clients):
    """An addition's command is unknown to --article, and its options are refused."""
    alice = clients('alice', '--article')
    alice.send('/send /etc/hostname')
    alice.expect(r"^\* unknown command '/send /etc/hostname'; /help lists the commands$")
    refused = start(command('p2pclient.py', 'carol', '--article', '--allow', '*'), 'carol')
    assert refused.wait() == 2
    refused.expect_log(r'--article runs one server, without --allow or -v')


def test_list_shows_registered_names(clients):
    alice = clients('alice')
    clients('bob')
    alice.send('/list')
    alice.expect(r'^\* peers: alice, bob$')


def test_name_taken_is_one_clear_line_and_exit_1(clients, tmp_path):
    clients('alice')
    second = clients('alice', '--key', tmp_path / 'another-key', register=False)
    second.expect(r"^\* the rendezvous server at \S+ refused to register us: .*'alice' is taken")
    assert second.wait() == 1


def test_name_is_free_again_once_its_holder_leaves(clients):
    first = clients('alice')
    first.send('/quit')
    assert first.wait() == 0
    clients('alice')


def test_unknown_peer_is_named_in_the_error(clients):
    alice = clients('alice')
    alice.send('/connect carol')
    alice.expect(r"^\* error from the rendezvous server: no peer named 'carol'$")
    alice.send('/list')
    alice.expect(r'^\* peers: alice$')        # and the client goes on


def test_server_down_at_start():
    with socket.socket() as sock:           # a port with nobody listening
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    alice = start(command('p2pclient.py', 'alice', '--server', f'127.0.0.1:{port}'), 'alice')
    alice.expect(rf'^\* cannot reach the rendezvous server at 127\.0\.0\.1:{port}: '
                 r'Connection refused$')
    assert alice.wait() == 1
    assert alice.err.lines == []


@pytest.mark.parametrize('name', ['', 'with space', 'x' * 33, 'tab\there'])
def test_bad_name_is_refused_before_anything_happens(name):
    proc = start(command('p2pclient.py', name), 'client')
    assert proc.wait() == 2
    assert 'name' in proc.err.lines[-1] and 'Traceback' not in '\n'.join(proc.err.lines)


def test_peer_quits_and_the_other_is_told(clients):
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    bob.send('/quit')
    assert bob.wait() == 0
    alice.expect(r'^\* bob left$')


def test_end_of_input_says_bye_and_exits_0(clients):
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    bob.close_stdin()
    assert bob.wait() == 0
    alice.expect(r'^\* bob left$')


def test_ctrl_c_says_bye_and_exits_0(clients):
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    bob.popen.send_signal(signal.SIGINT)
    assert bob.wait() == 0
    alice.expect(r'^\* bob left$')


def test_utf8_text_arrives_intact(clients):
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    alice.send('grüße, 日本語, emoji 🎉')
    bob.expect(r'^<alice> grüße, 日本語, emoji 🎉$')


def test_control_characters_cannot_forge_a_status_line(clients):
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    alice.send('\r* connected to mallory \x1b[2J')
    line = bob.expect(r'^<alice> ').string
    assert '\x1b' not in line and '\r' not in line
    assert line == r'<alice> \r* connected to mallory \x1b[2J'


def test_a_thousand_lines_arrive_complete_and_in_order(clients):
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    alice.popen.stdin.write(''.join(f'line {i}\n' for i in range(1000)))
    alice.popen.stdin.flush()
    bob.expect(r'^<alice> line 999$', timeout=30)
    chat = [line for line in bob.lines if line.startswith('<alice>')]
    assert chat == [f'<alice> line {i}' for i in range(1000)]


def test_a_long_line_arrives_whole_in_pieces(clients):
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    text = 'é' * 1500           # 3,000 bytes: more than one datagram holds
    alice.send(text)
    bob.expect(r'^<alice> ')
    bob.expect(r'^<alice> ')
    bob.expect(r'^<alice> ')
    received = ''.join(line[len('<alice> '):] for line in bob.lines
                       if line.startswith('<alice> '))
    assert received == text


def test_chat_before_connecting_says_what_to_do(clients):
    alice = clients('alice')
    alice.send('anyone there?')
    alice.expect(r'^\* not connected: /connect PEER first$')


@pytest.mark.parametrize('transport', ['--udp-only', '--tcp-only'])
def test_lines_typed_right_after_connect_go_to_that_peer_once(clients, transport):
    """No need to wait for '* connected': the lines are held, then sent (early)."""
    alice, bob = clients('alice', transport), clients('bob', transport)
    alice.send('/connect bob')
    alice.send('first words')
    alice.send('and more')
    consent(alice, bob)
    bob.expect(r'^<alice> first words$')
    bob.expect(r'^<alice> and more$')
    alice.expect(CONNECTED.format('bob'))
    chat_both_ways(alice, bob, 'later')
    said = [line for line in bob.lines if line.startswith('<alice> ')]
    assert said == ['<alice> first words', '<alice> and more', '<alice> later from alice']


def test_lines_held_for_an_unknown_peer_are_reported_lost(clients):
    alice = clients('alice')
    alice.send('/connect carol')
    alice.send('are you there?')
    alice.expect(r"^\* error from the rendezvous server: no peer named 'carol'$")
    alice.expect(r'^\* not delivered to carol: are you there\?$')
    alice.send('still nobody?')
    alice.expect(r'^\* not connected to carol: /connect carol first$')


def test_unknown_command_is_reported(clients):
    alice = clients('alice')
    alice.send('/frobnicate')
    alice.expect(r"^\* unknown command '/frobnicate'; /help lists the commands$")


def test_a_malformed_control_message_gets_an_error_naming_it(server, clients):
    with socket.create_connection(('127.0.0.1', server), timeout=5) as sock:
        sock.sendall(wire.HEADER.pack(wire.MAGIC, wire.VERSION, 99, 0, 0))
        reader = wire.FrameReader()
        reader.feed(sock.recv(4096))
        error = wire.decode(next(reader.frames()))
    assert error.type == wire.ERROR and error.code == wire.E_BAD_MESSAGE
    assert 'unknown message type 99' in error.text
    alice, bob = clients('alice'), clients('bob')       # everyone else is served
    connect(alice, bob)


def free_udp_port():
    """A UDP port on loopback that nobody uses right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_raw_mode_talks_plain_lines_like_netcat():
    port_a, port_b = free_udp_port(), free_udp_port()
    a = start(command('p2pclient.py', '--raw', '--peer', f'127.0.0.1:{port_b}',
                      '--port', port_a), 'a')
    b = start(command('p2pclient.py', '--raw', '--peer', f'127.0.0.1:{port_a}',
                      '--port', port_b), 'b')
    try:
        # Each side's first line may be lost if the other has not bound yet:
        # repeat until one arrives, as a user of netcat would.
        for attempt in range(50):
            a.send(f'hello b {attempt}')
            try:
                b.expect(r'^hello b \d+$', timeout=0.2)
                break
            except AssertionError:
                continue
        b.send('hello a')
        a.expect(r'^hello a$')
        a.close_stdin()
        assert a.wait() == 0
    finally:
        a.stop()
        b.stop()
    assert a.err.lines == [] and b.err.lines == []


def test_raw_mode_needs_a_peer():
    proc = start(command('p2pclient.py', '--raw'), 'raw')
    assert proc.wait() == 2
    assert proc.err.lines[-1].endswith('--raw needs --peer IP:PORT')


def test_chat_goes_on_without_the_server_and_it_reregisters_on_return():
    server, port = start_server()
    names = {}
    try:
        for name in ('alice', 'bob'):
            names[name] = start(command('p2pclient.py', name, '--server', f'127.0.0.1:{port}'),
                                name)
            names[name].expect(r'^\* registered as')
        alice, bob = names['alice'], names['bob']
        connect(alice, bob)
        server.stop()                   # the mediator is not in the data path (point 7)
        for proc in (alice, bob):
            proc.expect(rf'^\* lost the rendezvous server 127\.0\.0\.1:{port}: .*reconnecting$')
        alice.send('still here?')
        bob.expect(r'^<alice> still here\?$')
        server, _ = start_server('--port', port)
        for name, proc in names.items():
            proc.expect(rf'^\* registered as {name} with 127\.0\.0\.1:{port} again$', timeout=40)
        names['carol'] = start(command('p2pclient.py', 'carol', '--server',
                                       f'127.0.0.1:{port}'), 'carol')
        names['carol'].expect(r'^\* registered as')
        connect(names['carol'], alice)
    finally:
        server.stop()
        for proc in names.values():
            proc.stop()
    for proc in names.values():
        assert proc.err.lines == [], proc.transcript()


def test_with_two_servers_one_can_die():
    first, port1 = start_server()
    second, port2 = start_server()
    procs = []
    try:
        for name in ('alice', 'bob'):
            procs.append(start(command('p2pclient.py', name, '--server', f'127.0.0.1:{port1}',
                                       '--server', f'127.0.0.1:{port2}'), name))
            procs[-1].expect(rf'^\* registered as {name} with 127\.0\.0\.1:{port1};')
            procs[-1].expect(rf'^\* registered as {name} with 127\.0\.0\.1:{port2};')
        first.stop()
        alice, bob = procs
        alice.expect(r'^\* lost the rendezvous server')
        connect(alice, bob)
        alice.send('through the second server')
        bob.expect(r'^<alice> through the second server$')
    finally:
        for proc in (first, second, *procs):
            proc.stop()


@pytest.fixture
def folders(tmp_path):
    """A file to send, and an empty download folder."""
    source = tmp_path / 'out'
    source.mkdir()
    downloads = tmp_path / 'downloads'
    return source, downloads


def test_send_a_file_that_arrives_byte_identical(clients, folders):
    source, downloads = folders
    data = os.urandom(1_000_000)
    (source / 'photo.jpg').write_bytes(data)
    alice = clients('alice')
    bob = clients('bob', '--downloads', downloads)
    connect(alice, bob)
    alice.send(f'/send {source / "photo.jpg"}')
    alice.expect(r'^\* offering photo\.jpg \(1\.0 MB\) to bob; waiting for an answer$')
    bob.expect(r'^\* alice offers photo\.jpg \(1\.0 MB\): /accept or /reject$')
    bob.send('/accept')
    alice.send('and we can still chat')
    bob.expect(r'^<alice> and we can still chat$')
    bob.expect(r'^\* received photo\.jpg from alice: 1000000 bytes, SHA-256 ok, saved as ',
               timeout=30)
    alice.expect(r'^\* bob received photo\.jpg: 1000000 bytes, SHA-256 ok', timeout=30)
    assert (downloads / 'photo.jpg').read_bytes() == data
    assert os.listdir(downloads) == ['photo.jpg']


def test_an_existing_file_is_never_overwritten(clients, folders):
    source, downloads = folders
    downloads.mkdir()
    (downloads / 'notes.txt').write_text('mine')
    (source / 'notes.txt').write_text('theirs')
    alice, bob = clients('alice'), clients('bob', '--downloads', downloads)
    connect(alice, bob)
    alice.send(f'/send {source / "notes.txt"}')
    bob.expect(r'offers notes\.txt')
    bob.send('/accept')
    bob.expect(r'^\* received notes\.txt from alice: .* saved as .*notes-1\.txt in ')
    assert (downloads / 'notes.txt').read_text() == 'mine'
    assert (downloads / 'notes-1.txt').read_text() == 'theirs'


def test_a_rejected_file_is_not_sent(clients, folders):
    source, downloads = folders
    (source / 'spam.bin').write_bytes(b'x' * 5000)
    alice, bob = clients('alice'), clients('bob', '--downloads', downloads)
    connect(alice, bob)
    alice.send(f'/send {source / "spam.bin"}')
    bob.expect(r'offers spam\.bin')
    bob.send('/reject')
    alice.expect(r'^\* bob rejected spam\.bin$')
    assert not downloads.exists() or os.listdir(downloads) == []
    bob.send('/quit')                       # a rejected offer is over: nothing "stopped"
    assert bob.wait() == 0
    alice.expect(r'^\* bob left$')
    assert not [line for line in bob.lines + alice.lines if 'stopped' in line], \
        bob.transcript() + alice.transcript()


def test_an_interrupted_transfer_leaves_no_file(clients, folders):
    source, downloads = folders
    (source / 'big.iso').write_bytes(os.urandom(100_000_000))
    # UDP: slower than TCP on loopback, so the kill comes mid-transfer.
    alice = clients('alice', '--udp-only')
    bob = clients('bob', '--udp-only', '--downloads', downloads)
    connect(alice, bob)
    alice.send(f'/send {source / "big.iso"}')
    bob.expect(r'offers big\.iso')
    bob.send('/accept')
    bob.expect(r'^\* receiving big\.iso from alice: \d+%', timeout=30)
    alice.popen.kill()
    bob.expect(r'^\* lost alice: it left the server and stopped answering$', timeout=30)
    bob.expect(r'^\* transfer of big\.iso with alice stopped: alice is gone$')
    assert os.listdir(downloads) == []


def test_send_without_a_file_says_why(clients, folders):
    source, _ = folders
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    alice.send(f'/send {source / "missing.txt"}')
    alice.expect(r"^\* cannot send '.*missing\.txt': No such file or directory$")
    bob.send('/accept')
    bob.expect(r'^\* no file is on offer$')


@pytest.mark.parametrize('option, how', [('--udp-only', r'direct, \d+ ms'),
                                         ('--tcp-only', r'direct, tcp, \d+ ms')])
def test_udp_only_and_tcp_only(clients, option, how):
    alice, bob = clients('alice', option), clients('bob', option)
    alice.send('/connect bob')
    consent(alice, bob)
    alice.expect(rf'^\* connected to bob at 127\.0\.0\.1:\d+ \({how}\)$')
    bob.expect(rf'^\* connected to alice at 127\.0\.0\.1:\d+ \({how}\)$')
    alice.send('hello over one transport')
    bob.expect(r'^<alice> hello over one transport$')
    bob.send('and back')
    alice.expect(r'^<bob> and back$')


def test_a_connect_goes_through_whichever_server_knows_the_peer():
    first, port1 = start_server()
    second, port2 = start_server()
    procs = []
    try:
        alice = start(command('p2pclient.py', 'alice', '--server', f'127.0.0.1:{port1}',
                              '--server', f'127.0.0.1:{port2}'), 'alice')
        bob = start(command('p2pclient.py', 'bob', '--server', f'127.0.0.1:{port2}'), 'bob')
        procs = [alice, bob]
        alice.expect(rf'^\* registered as alice with 127\.0\.0\.1:{port2};')
        bob.expect(r'^\* registered as bob ')
        connect(alice, bob)                 # the first server has never heard of bob
        assert not [line for line in alice.lines if line.startswith('* error')]
        alice.send('found you')
        bob.expect(r'^<alice> found you$')
    finally:
        for proc in (first, second, *procs):
            proc.stop()


def test_status_says_where_each_peer_stands_and_who_gets_the_lines(clients):
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    alice.send('/status')
    alice.expect(r'^\* you are alice, public endpoint 127\.0\.0\.1:\d+ \(')
    alice.expect(r'^\* server 127\.0\.0\.1:\d+: registered, last heard \d+ s ago$')
    alice.expect(r'^\* bob: direct, (tcp|udp), at 127\.0\.0\.1:\d+(, round trip \d+ ms)? '
                 r'<- what you type goes here$')     # a round trip once one is measured


@pytest.mark.parametrize('line, usage', [('/connect', '/connect PEER'), ('/to', '/to PEER'),
                                         ('/send', '/send PATH')])
def test_a_command_without_its_argument_says_how(clients, line, usage):
    alice = clients('alice')
    alice.send(line)
    alice.expect(rf'^\* usage: {usage}$')


def test_a_line_that_starts_with_a_slash_can_be_said(clients):
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    alice.send('//etc/hosts is where it is')
    bob.expect(r'^<alice> /etc/hosts is where it is$')


def test_a_line_typed_after_connecting_to_another_goes_to_that_one_only(clients):
    alice, bob, carol = clients('alice'), clients('bob'), clients('carol')
    connect(alice, bob)
    alice.send('/connect carol')
    alice.send('hi carol, secret for you only')
    consent(alice, carol)
    carol.expect(r'^<alice> hi carol, secret for you only$')
    alice.send('/connect erin')             # nobody of that name
    alice.expect(r"^\* error from the rendezvous server: no peer named 'erin'$")
    alice.send('and this?')
    alice.expect(r'^\* not connected to erin: /connect erin first, or /to bob, or /to carol$')
    bob.send('/quit')
    alice.expect(r'^\* bob left$')
    alice.send('/to carol')
    alice.send('only carol')
    carol.expect(r'^<alice> only carol$')
    assert not [line for line in bob.lines if 'secret' in line or 'this?' in line]


class AtTerminal(Proc):
    """A client whose stdin is a pseudo-terminal, as when a person types into it."""

    def __init__(self, argv, label):
        self.master, slave = pty.openpty()
        attributes = termios.tcgetattr(slave)
        attributes[3] &= ~termios.ECHO          # nobody reads the echo: do not make one
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        popen = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, encoding='utf-8', bufsize=1)
        os.close(slave)
        super().__init__(popen, label)

    def send(self, line):
        """Type one line at the terminal."""
        os.write(self.master, (line + '\n').encode())

    def stop(self):
        """Kill the client, close the terminal."""
        super().stop()
        os.close(self.master)


def test_a_line_longer_than_the_terminal_takes_is_not_cut_without_a_word(server, clients):
    bob = clients('bob')
    alice = AtTerminal(command('p2pclient.py', 'alice', '--server', f'127.0.0.1:{server}'),
                       'alice')
    try:
        alice.expect(r'^\* registered as alice ')
        connect(alice, bob)
        alice.send('x' * 5000)
        alice.expect(r'^\* your terminal cut that line at 4,095 bytes, its limit; the rest '
                     r'was not sent')
        received = ''.join(bob.expect(r'^<alice> (x+)$').group(1) for _ in range(5))
        assert len(received) == 4095                    # in pieces of 1,000 bytes
    finally:
        alice.stop()
    assert alice.err.lines == [], alice.transcript()


def test_tcp_only_never_takes_a_udp_path(clients):
    alice = clients('alice', '--tcp-only')
    bob = clients('bob', '--udp-only', '--punch-timeout', '1')
    connect_relayed = r'^\* connected to {} \(relayed through the rendezvous server\)$'
    alice.send('/connect bob')
    consent(alice, bob)
    alice.expect(connect_relayed.format('bob'))
    bob.expect(connect_relayed.format('alice'))
    chat_both_ways(alice, bob, 'through the relay')
    assert not [line for line in alice.lines if '(direct' in line]
