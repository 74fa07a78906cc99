"""The command line as a new user meets it: options, exit codes, stdin that is not a terminal.

Every test runs the real programs (tests/procs.py) and checks what a user
sees: the exit code, one clear line on an error, and never a traceback.
"""

import subprocess

import pytest

import p2pcommon as wire
from procs import command, start, start_server
from rendezvous import default_bind


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
