"""The MAPPING fast path (fastpath.py) answers exactly as the plain one (rendezvous.py).

Both servers, in this process, get the same datagrams from the same
sources; what each sends back, byte for byte, and what each notes of the
peer, must be the same.
"""

import random

import pytest

import p2pcommon as wire
import rendezvous

TOKEN = bytes(range(16))


class Recorder:
    """A UDP socket that records what the server sends."""

    def __init__(self):
        self.sent = []

    def sendto(self, data, destination):
        """Record one answer."""
        self.sent.append((bytes(data), destination))

    def getsockname(self):
        """The server's port, for its log."""
        return ('127.0.0.1', 7777)


@pytest.fixture
def servers():
    """The plain Rendezvous and the Server main() runs, each with one registered peer."""
    made = [rendezvous.Rendezvous(['127.0.0.1'], 0), rendezvous.Server(['127.0.0.1'], 0)]
    for server in made:
        peer = rendezvous.Peer(None, ('127.0.0.1', 1), 0.0, server.limits)
        peer.name, peer.token = 'alice', TOKEN
        server.by_token[TOKEN] = peer
    yield made
    for server in made:
        for key in list(server.selector.get_map().values()):
            key.fileobj.close()


def requests():
    """Well-formed requests, with our token and another, and broken ones."""
    good = [wire.encode(wire.MAPPING, token=token, public=public)
            for token in (TOKEN, bytes(16)) for public in (('0.0.0.0', 0), ('::', 0))]
    rng = random.Random(3)
    broken = []
    for data in good:
        for _ in range(20):
            damaged = bytearray(data)
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
            broken.append(bytes(damaged))
    return good + broken + [b'', b'junk', good[0][:-1], good[0] + b'\0']


SOURCES = [('198.51.100.7', 40000), ('::ffff:203.0.113.9', 1), ('2001:db8::5', 65535),
           ('198.18.0.1', 7777)]


def test_the_fast_path_answers_byte_for_byte_as_the_plain_one(servers):
    answers = []
    for server in servers:
        sock = Recorder()
        for i, data in enumerate(requests()):
            server.answer_mapping(sock, data, SOURCES[i % len(SOURCES)], now=float(i))
        answers.append(sock.sent)
    plain, fast = answers
    assert plain == fast
    assert len(plain) >= 8                  # the good ones, at least, were answered
    assert servers[0].by_token[TOKEN].public == servers[1].by_token[TOKEN].public
    assert dict(servers[0].dropped) == dict(servers[1].dropped)
    assert servers[1].addresses              # and the fast path did answer them
