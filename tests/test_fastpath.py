"""The MAPPING fast path (fastpath.py) answers exactly as the plain one (rendezvous.py).

The servers, in this process, get the same datagrams from the same
sources; what each sends back, byte for byte, and what each notes of the
peer, must be the same.
"""

import random

import pytest

import p2pcommon as wire
import rendezvous
from fastpath import FastMappingMixIn

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


# The server main() runs, but for the fast path: what it counts as dropped
# (limits.py) must be the same too.
WithoutFastPath = type('WithoutFastPath', tuple(
    base for base in rendezvous.Server.__bases__ if base is not FastMappingMixIn), {})


@pytest.fixture
def servers():
    """The plain Rendezvous, the Server without its fast path, and the Server main() runs.

    Each has one registered peer.
    """
    made = [rendezvous.Rendezvous(['127.0.0.1'], 0), WithoutFastPath(['127.0.0.1'], 0),
            rendezvous.Server(['127.0.0.1'], 0)]
    for server in made:
        peer = rendezvous.Peer(None, ('127.0.0.1', 1))
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
    article, plain, fast = answers
    assert article == plain == fast
    assert len(plain) >= 8                  # the good ones, at least, were answered
    assert len({server.by_token[TOKEN].public for server in servers}) == 1
    assert dict(servers[1].dropped) == dict(servers[2].dropped)
    assert servers[2].addresses              # and the fast path did answer them
