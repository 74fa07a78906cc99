"""The command line as a new user meets it: options, exit codes, stdin that is not a terminal.

Every test runs the real programs (tests/procs.py) and checks what a user
sees: the exit code, one clear line on an error, and never a traceback.
"""

import os
import socket
import subprocess

import pytest

import p2pcommon as wire
from procs import command, start, start_server
from servermain import default_bind


def run(program, *args, timeout=10.0):
    """Run one of our programs to its end with no input; return the finished Proc.

    A program that is still running after timeout (it took a bad command
    line and started) is killed, and the caller's checks fail on its code.
    """
    proc = start(command(program, *args), program)
    proc.close_stdin()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.stop()
    return proc


def no_traceback(proc):
    """Assert that the program printed no Python traceback."""
    assert not any('Traceback' in line for line in proc.err.lines + proc.lines), \
        proc.transcript()


@pytest.mark.parametrize('program', ['rendezvous.py', 'p2pclient.py'])
def test_version_is_the_packages(program):
    proc = run(program, '--version')
    assert proc.popen.returncode == 0, proc.transcript()
    assert proc.lines == [f'p2pnat {wire.__version__}'], proc.transcript()


def test_bind_help_gives_one_default():
    proc = run('rendezvous.py', '--help')
    assert proc.popen.returncode == 0, proc.transcript()
    entry = help_entry(proc.lines, '--bind')
    assert entry.count('default') == 1, entry


def help_entry(lines, option):
    """The text of one option's entry in --help: its line and the indented ones after it."""
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith(option))
    entry = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith(' ' * 8):
            break
        entry.append(line)
    return ' '.join(entry)


@pytest.mark.parametrize('program, option, value', [
    ('rendezvous.py', '--port', '70000'),
    ('rendezvous.py', '--port', '-5'),
    ('rendezvous.py', '--port', '65535'),       # its probe port would be 65536
    ('rendezvous.py', '--max-output', '-1'),
    ('rendezvous.py', '--register-timeout', '-3'),
    ('rendezvous.py', '--idle-timeout', 'nan'),
    ('rendezvous.py', '--ipv6-prefix', '200'),  # the first IPv6 peer crashed the server
    ('p2pclient.py', '--port', '99999'),
    ('p2pclient.py', '--keepalive', '-1'),
    ('p2pclient.py', '--punch-timeout', '-2'),
])
def test_a_bad_number_is_a_bad_command_line(program, option, value):
    # A server that takes the bad value listens on a free port, not on 7777.
    first = ['alice'] if program == 'p2pclient.py' else ['--port', '0']
    proc = run(program, *first, option, value, timeout=3.0)
    assert proc.popen.returncode == 2, proc.transcript()
    assert f'error: argument {option}: {value} ' in proc.err.lines[-1], proc.transcript()
    no_traceback(proc)


def test_a_second_server_cannot_take_the_first_ones_port():
    """A server on PORT - 1 would need UDP PORT, the first server's: it must not share it."""
    first, port = start_server()
    try:
        second = run('rendezvous.py', '--port', port - 1, timeout=5.0)
        assert second.popen.returncode == 1, second.transcript()
        assert len(second.err.lines) == 1, second.transcript()
        assert f'cannot listen on {default_bind()} port {port - 1} (tcp, udp) and {port} ' \
               f'(udp): Address already in use' in second.err.lines[0], second.transcript()
    finally:
        first.stop()


@pytest.fixture
def server():
    """A rendezvous server on a free port; yields its port."""
    proc, port = start_server()
    yield port
    proc.stop()
    no_traceback(proc)


def reading(stdin):
    """A popen for procs.start that gives the program stdin, an open file, instead of a pipe."""
    def popen(argv, **kwargs):
        return subprocess.Popen(argv, **{**kwargs, 'stdin': stdin})
    return popen


def client(name, port, *args, stdin=None):
    """Start p2pclient.py NAME against the server; stdin an open file, or a pipe to type in."""
    argv = command('p2pclient.py', name, '--server', f'127.0.0.1:{port}', *args)
    return start(argv, name) if stdin is None else start(argv, name, reading(stdin))


def registered(proc, port):
    """Wait for the line that says proc registered."""
    proc.expect(rf'^\* registered as {proc.label} with 127\.0\.0\.1:{port}; ')


def test_stdin_from_dev_null_registers_and_exits_0(server):
    with open(os.devnull) as nothing:
        alice = client('alice', server, stdin=nothing)
    try:
        registered(alice, server)
        assert alice.wait() == 0, alice.transcript()
    finally:
        alice.stop()
    assert alice.err.lines == [], alice.transcript()


def test_stdin_from_a_file_runs_its_commands_in_order_then_quits(server, tmp_path):
    """The file's /connect and the line for bob both happen before end of input quits."""
    bob = client('bob', server, '--allow', '*')
    registered(bob, server)
    script = tmp_path / 'commands.txt'
    script.write_text('/list\n/connect bob\nhello bob, from a file\n')
    with open(script) as commands:
        alice = client('alice', server, stdin=commands)
    try:
        registered(alice, server)
        alice.expect(r'^\* peers: alice, bob$')
        alice.expect(r'^\* connected to bob ')
        bob.expect(r'^<alice> hello bob, from a file$')
        assert alice.wait() == 0, alice.transcript()
        bob.expect(r'^\* alice left$')
    finally:
        alice.stop()
        bob.stop()
    assert alice.err.lines == [] and bob.err.lines == [], alice.transcript() + bob.transcript()


def test_a_piped_list_prints_the_peers_then_exits_0(server):
    """printf '/list\\n' | p2pclient.py alice: the answer comes before the end of input quits."""
    alice = client('alice', server)
    try:
        registered(alice, server)
        alice.send('/list')
        alice.close_stdin()
        alice.expect(r'^\* peers: alice$')
        assert alice.wait() == 0, alice.transcript()
    finally:
        alice.stop()
    assert alice.err.lines == [], alice.transcript()


def test_raw_mode_sends_a_files_lines_then_exits_0(tmp_path):
    """--raw < lines.txt: each line is one datagram to the peer, as netcat sends it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(('127.0.0.1', 0))
        peer.settimeout(10.0)
        script = tmp_path / 'lines.txt'
        script.write_text('one\ntwo\n')
        with open(script) as lines:
            proc = start(command('p2pclient.py', '--raw', '--peer',
                                 f'127.0.0.1:{peer.getsockname()[1]}'), 'raw', reading(lines))
        try:
            assert [peer.recv(100), peer.recv(100)] == [b'one\n', b'two\n']
            assert proc.wait() == 0, proc.transcript()
        finally:
            proc.stop()
    assert proc.err.lines == [], proc.transcript()
