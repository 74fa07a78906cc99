"""Drive the real programs as a user would: start them, type, read the screen.

Every wait is for an event (a line matching a pattern) with a timeout, never
a fixed sleep; a failed wait shows the whole transcript.
"""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def command(program, *args):
    """argv for one of our programs, run with this Python, unbuffered."""
    return [PYTHON, '-u', os.path.join(ROOT, program), *map(str, args)]


class Stream:
    """One output stream of a program, read line by line in the background."""

    def __init__(self, pipe):
        self.lines = []
        self.fresh = queue.Queue()
        self.reader = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self.reader.start()

    def _pump(self, pipe):
        for line in pipe:
            self.lines.append(line.rstrip('\n'))
            self.fresh.put(self.lines[-1])

    def next_match(self, regex, deadline):
        """The next line that matches regex before deadline, or None."""
        while True:
            try:
                line = self.fresh.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            match = regex.search(line)
            if match:
                return match


class Proc:
    """A running program: type into its stdin, wait for lines on its output."""

    def __init__(self, popen, label):
        self.popen = popen
        self.label = label
        self.out = Stream(popen.stdout)
        self.err = Stream(popen.stderr)

    @property
    def lines(self):
        """Every stdout line so far."""
        return self.out.lines

    def expect(self, pattern, timeout=10.0, stream=None):
        """Wait for the next line (stdout, or the stream given) matching pattern."""
        stream = stream or self.out
        match = stream.next_match(re.compile(pattern), time.monotonic() + timeout)
        if match is None:
            raise AssertionError(
                f'{self.label}: no line matching {pattern!r} within {timeout} s\n'
                f'{self.transcript()}')
        return match

    def seen(self, pattern, timeout=10.0):
        """A stdout line matching pattern, printed already or within timeout.

        For lines whose order against the other lines a test waits for is
        not the point (a chat line and a status line racing on two paths).
        """
        regex = re.compile(pattern)
        for line in list(self.out.lines):
            match = regex.search(line)
            if match:
                return match
        return self.expect(pattern, timeout)

    def expect_log(self, pattern, timeout=10.0):
        """Wait for a line on stderr (where the server logs) matching pattern."""
        return self.expect(pattern, timeout, self.err)

    def send(self, line):
        """Type one line."""
        self.popen.stdin.write(line + '\n')
        self.popen.stdin.flush()

    def close_stdin(self):
        """End of input, as Ctrl-D."""
        self.popen.stdin.close()

    def wait(self, timeout=10.0):
        """Wait for the program to exit; return its exit code."""
        code = self.popen.wait(timeout)
        self.out.reader.join(timeout)
        self.err.reader.join(timeout)
        return code

    def stop(self):
        """Kill the program if it still runs."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.wait()

    def transcript(self):
        """What the program printed, for failure messages."""
        out = '\n'.join(f'  | {line}' for line in self.out.lines)
        err = '\n'.join(f'  ! {line}' for line in self.err.lines)
        return f'--- {self.label} stdout:\n{out}\n--- {self.label} stderr:\n{err}'


def start(argv, label, popen=subprocess.Popen, **kwargs):
    """Start a program with pipes for stdin, stdout and stderr, as a terminal's foreground job.

    A shell starts background jobs with SIGINT ignored, and children inherit
    that: run from one (``bash .ci/run &``), a test's Ctrl-C would never
    reach the program.  A terminal's foreground job has SIGINT as usual.
    """
    kwargs.setdefault('preexec_fn', sigint_as_usual)
    process = popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, encoding='utf-8', bufsize=1,
                    **kwargs)
    return Proc(process, label)


def sigint_as_usual():
    """In the child, before exec: SIGINT's default action, whatever the parent ignores."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_server(*args, popen=subprocess.Popen):
    """Start rendezvous.py on a free port pair; return (Proc, port)."""
    server = start(command('rendezvous.py', '--port', '0', *args), 'rendezvous', popen)
    try:
        port = int(server.expect_log(r'listening on \S+:(\d+)').group(1))
    except AssertionError:
        server.stop()
        raise
    return server, port
