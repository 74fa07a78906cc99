"""The article's server alone (rendezvous.py --article): real clients still meet and chat.

``Rendezvous`` without its additions (limits, names as they read, asks
that run out) must still speak the whole wire format: two real clients
register, learn their mappings, connect with consent and chat directly.
"""

import pytest

import rendezvous
from serversockets import ControlIO
from labpeers import chat_both_ways
from procs import command, start, start_server

CONNECTED = r'^\* connected to {} at 127\.0\.0\.1:\d+ \(direct, \d+ ms\)$'


@pytest.fixture
def article_server():
    """rendezvous.py --article on a free port pair; yields (Proc, port)."""
    proc, port = start_server('--article', '--bind', '127.0.0.1')
    yield proc, port
    proc.stop()
    assert not [line for line in proc.err.lines if 'Traceback' in line], proc.transcript()


def client(name, port):
    """A real p2pclient.py, UDP punching only, saying yes to anyone; registered."""
    proc = start(command('p2pclient.py', name, '--udp-only', '--allow', '*',
                         '--server', f'127.0.0.1:{port}'), name)
    proc.expect(rf'^\* registered as {name} with 127\.0\.0\.1:{port}; '
                r'public endpoint 127\.0\.0\.1:\d+')
    return proc


def test_two_clients_connect_and_chat_through_the_article_server(article_server):
    server, port = article_server
    assert server.err.lines[0].endswith("for probes, the article's design only")
    alice = client('alice', port)
    try:
        bob = client('bob', port)
        try:
            alice.send('/connect bob')
            alice.expect(CONNECTED.format('bob'))
            bob.expect(CONNECTED.format('alice'))
            chat_both_ways(alice, bob)
            server.expect_log(r'introduced alice \(127\.0\.0\.1:\d+\) and bob ')
        finally:
            bob.stop()
    finally:
        alice.stop()


def test_the_article_server_is_the_plain_rendezvous():
    """--article serves with Rendezvous itself: no addition overrides its hooks.

    (serversockets.ControlIO, its base, is the bytes of a control
    connection, not an addition.)
    """
    assert rendezvous.Rendezvous.__mro__ == (rendezvous.Rendezvous, ControlIO, object)
    assert rendezvous.Server.__mro__[-3:] == rendezvous.Rendezvous.__mro__
