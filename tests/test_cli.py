"""The command line as a new user meets it: options, exit codes, stdin that is not a terminal.

Every test runs the real programs (tests/procs.py) and checks what a user
sees: the exit code, one clear line on an error, and never a traceback.
"""

import pytest

import p2pcommon as wire
from procs import command, start


def run(program, *args):
    """Run one of our programs to its end with no input; return the finished Proc."""
    proc = start(command(program, *args), program)
    proc.close_stdin()
    proc.wait()
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
