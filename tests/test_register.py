"""Tests for control.ServerLink.wait_registered: a hostile server during registration.

Whatever the server sends, the client either registers or stops with one
clear, printable line (control.Fatal), never a traceback and never the
server's own escape sequences.  The "server" is the far end of a socket
pair: the test writes its bytes, and closes it where a server would.
"""

import socket
import struct

import pytest

import control
import p2pcommon as wire

ADDRESS = ('127.0.0.1', 7777)
TOKEN = bytes(range(16))


@pytest.fixture
def pair():
    """A ServerLink whose socket is one end of a pair; the test plays the server at the other."""
    ours, server = socket.socketpair()
    link = control.ServerLink(client=None, address=ADDRESS)
    link.sock = ours
    yield link, server
    ours.close()
    server.close()


def fatal_line(link, server, data, close=True):
    """What wait_registered raises after the server sends data (then closes)."""
    server.sendall(data)
    if close:
        server.close()
    with pytest.raises(control.Fatal) as info:
        link.wait_registered()
    text = str(info.value)
    assert text.isprintable(), text             # one line, no escape sequences
    return text


def frame(version=wire.VERSION, type=wire.REGISTERED, payload=TOKEN, length=None):
    """A frame as raw bytes; the header may lie about its version or length."""
    length = len(payload) if length is None else length
    return struct.pack('!HBBBxH', wire.MAGIC, version, type, 0, length) + payload


def test_registered():
    """The plain case: REGISTERED gives the token, and what follows stays for the loop."""
    ours, server = socket.socketpair()
    with ours, server:
        link = control.ServerLink(client=None, address=ADDRESS)
        link.sock = ours
        after = wire.encode(wire.PEERS, flags=wire.FLAG_REPLY, names=['bob'])
        server.sendall(wire.reply(wire.REGISTERED, token=TOKEN) + after)
        link.wait_registered()
        assert link.token == TOKEN
        assert [wire.decode(f) for f in link.reader.frames()] == [wire.decode(after)]


def test_error_with_escape_sequences_is_shown_safely(pair):
    """An ERROR's text is shown through wire.safe, naming the server that refused us."""
    link, server = pair
    error = wire.reply(wire.ERROR, code=wire.E_NAME_TAKEN,
                       text="name 'alice' is taken\x1b[2J\r\n* registered as alice")
    text = fatal_line(link, server, error, close=False)
    assert text == ("the rendezvous server at 127.0.0.1:7777 refused to register us: "
                    "name 'alice' is taken\\x1b[2J\\r\\n* registered as alice")


def test_wrong_version(pair):
    """A frame of another protocol version: the stream cannot be read; one line says why."""
    link, server = pair
    text = fatal_line(link, server, frame(version=wire.VERSION - 1), close=False)
    assert text == ('the rendezvous server at 127.0.0.1:7777 sent a bad message: '
                    f'version: {wire.VERSION - 1}, expected {wire.VERSION}')


def test_truncated_frame_then_close(pair):
    """Half a REGISTERED, then the server closes: we were not registered."""
    link, server = pair
    text = fatal_line(link, server, wire.reply(wire.REGISTERED, token=TOKEN)[:12])
    assert text == ('the rendezvous server at 127.0.0.1:7777 did not register us: '
                    'it closed the connection')


@pytest.mark.parametrize('size', [0, 1, wire.TOKEN_SIZE - 1, wire.TOKEN_SIZE + 1, 255])
def test_registered_of_the_wrong_length(pair, size):
    """A REGISTERED whose token is too short or too long is a bad message, not a traceback."""
    link, server = pair
    text = fatal_line(link, server, frame(payload=bytes(size)), close=False)
    assert text.startswith('the rendezvous server at 127.0.0.1:7777 sent a bad message: ')
    assert link.token is None


@pytest.mark.parametrize('data', [
    b'HTTP/1.1 400 Bad Request\r\n\r\n',                     # not our protocol at all
    frame(length=65535, payload=b''),                        # says more than ever comes
    frame(type=200),                                         # a type we do not know
    frame(type=wire.ERROR, payload=b'\x00\x01\x00\x03\xff\xfe\xfd'),   # text not UTF-8
    frame(type=wire.ERROR, payload=b'\x00\x01\x03\xe9' + b'x' * 1001),  # text over 1,000
], ids=['http', 'never whole', 'unknown type', 'bad utf-8', 'long text'])
def test_other_bad_frames(pair, data):
    """Anything else broken ends the registration with the same kind of line."""
    link, server = pair
    text = fatal_line(link, server, data)
    assert text.startswith('the rendezvous server at 127.0.0.1:7777 ')


def test_nothing_then_close(pair):
    """The server closes without a word."""
    link, server = pair
    assert fatal_line(link, server, b'').endswith('did not register us: it closed the connection')
