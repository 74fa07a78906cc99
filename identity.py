"""Who is who: names that belong to someone, and peers that prove their session.

The article asks the peers to "validate the peer's identity" (point 10):
behind the same NAT, a stranger may answer on the peer's private address.
This module is how we do it, and how a name stays with its owner:

* A name's secret.  Each user keeps one random key (created on first use,
  in the user's config folder, or ``--key FILE``).  REGISTER carries a
  proof derived from it, the name and the server; the server gives the
  name to the first proof it sees and afterwards only to the same proof.
* A session's MAC.  The server's INTRODUCE gives both peers a session
  token over their control connections, and that token never goes
  anywhere else.  Every peer message carries instead a session id and a
  short MAC, both derived from the token: whoever has not seen the token
  can neither read it off the wire nor forge a message, and the counter
  under the MAC makes a replayed copy of an old message useless.
"""

import hashlib
import hmac
import os
import secrets
import tempfile

import p2pcommon as wire

KEY_SIZE = 32


def default_key_path():
    """~/.config/p2pnat/key, or under $XDG_CONFIG_HOME where that is set."""
    home_config = os.path.join(os.path.expanduser('~'), '.config')
    config = os.environ.get('XDG_CONFIG_HOME') or home_config
    return os.path.join(config, 'p2pnat', 'key')


def load_key(path):
    """The user's secret key, read from path; created there (mode 0600) on first use.

    Raises OSError or ValueError with a reason a user can act on.
    """
    try:
        with open(path) as stream:
            text = stream.read().strip()
    except FileNotFoundError:
        try:
            return create_key(path)
        except FileExistsError:     # another client of ours made it just now
            return load_key(path)
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f'{path} is not a p2pnat key (hex digits expected)') from None
    if len(key) < 16:
        raise ValueError(f'{path} holds {len(key)} bytes; a key needs at least 16')
    return key


def create_key(path):
    """A new random key, written where only its owner can read it.

    Written whole to a temporary file first and then linked into place,
    so that two clients starting at once never read half a key: the
    second link fails (FileExistsError) and that client reads the first's.
    """
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, mode=0o700, exist_ok=True)
    key = secrets.token_bytes(KEY_SIZE)
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix='.key-')   # mode 0600
    try:
        with os.fdopen(descriptor, 'w') as stream:
            stream.write(key.hex() + '\n')
        os.link(temporary, path)
    finally:
        os.unlink(temporary)
    return key


def name_proof(key, name, server):
    """REGISTER's proof that we hold the name's secret, for one server.

    The server is part of it, so that one server cannot use what we sent
    it to take our name at another.
    """
    message = b'p2pnat name\0' + name.encode('utf-8') + b'\0' + server.encode('utf-8')
    return hmac.digest(key, message, hashlib.sha256)[:wire.PROOF_SIZE]


def session_id(token):
    """The public name of a session on the peer path, derived from its token."""
    return hmac.digest(token, b'p2pnat session id', hashlib.sha256)[:wire.SESSION_ID_SIZE]


class SessionKey:
    """Seals our peer messages and checks the peer's, for one session.

    ``role`` is ours from INTRODUCE (0 or 1); the peer's is the other.  The
    MAC covers the sender's role, the header and every field before it, so
    a message of ours reflected back at us does not pass as the peer's.
    """

    def __init__(self, token, role):
        self.id = session_id(token)
        self.key = hmac.digest(token, b'p2pnat mac key', hashlib.sha256)
        self.role = role
        self.sent = 0               # the counter of our last message
        self.newest = 0             # the highest counter accepted from the peer

    def seal(self, type, **fields):
        """Encode a peer message of ours, with the next counter and its MAC."""
        self.sent += 1
        data = wire.encode(type, session=self.id, counter=self.sent, mac=wire.NO_MAC, **fields)
        return data[:-wire.MAC_SIZE] + self.mac(self.role, data[:-wire.MAC_SIZE])

    def mac(self, role, body):
        """The MAC of one message's bytes, as sent by role."""
        digest = hmac.digest(self.key, bytes([role]) + body, hashlib.sha256)
        return digest[:wire.MAC_SIZE]

    def check(self, message):
        """True when a decoded peer message is the peer's, in this session."""
        if message.session != self.id:
            return False
        body, tag = message.raw[:-wire.MAC_SIZE], message.raw[-wire.MAC_SIZE:]
        return hmac.compare_digest(tag, self.mac(1 - self.role, body))

    def newer(self, message):
        """True when a checked message is newer than any accepted before; notes it.

        Only such a message may move the path to a new source address: an
        old one may be a copy that someone replays from elsewhere.
        """
        if message.counter <= self.newest:
            return False
        self.newest = message.counter
        return True
