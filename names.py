"""Names that people read: one owner for what reads alike (an addition to the article).

People read names, not bytes.  "bob", "Bob", "bоb" (with a Cyrillic о),
"ｂｏｂ" (fullwidth) and "bob" with an invisible character after it are
five different strings that a person reads as one name, and whoever
registers a lookalike of bob's name is trusted as bob.  So the server
compares names by how they read (``fold``), refuses the names that cannot
be read reliably (``check_readable``), and keeps each name for the user
who first proved to hold its secret (``Owners``; the proof is identity.py's).

``NameOwnersMixIn`` plugs this into the server, composed in rendezvous.py:

    class Server(..., NameOwnersMixIn, Rendezvous): ...

Only the standard library's ``unicodedata`` is used.  It has no script
property, so a letter's script is the first word of its Unicode name
("LATIN SMALL LETTER O", "CYRILLIC SMALL LETTER O"): enough to see a name
that mixes alphabets.  What this does not catch: a name written wholly in
another script that happens to look Latin ("аре", all Cyrillic).
"""

import hmac
import logging
import time
import unicodedata

import p2pcommon as wire

log = logging.getLogger('rendezvous')

# Characters that show nothing, or nothing but blank space.  The
# categories catch most (format, control, unassigned, private, spaces);
# these are the rest: letters and symbols that are blank by design (the
# Hangul fillers, the Braille blank) and the other default-ignorables.
INVISIBLE_CATEGORIES = frozenset({'Cf', 'Cc', 'Cs', 'Co', 'Cn', 'Zs', 'Zl', 'Zp'})
INVISIBLE = frozenset(
    [0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x2800, 0x3164, 0xFEFF,
     0xFFA0]
    + list(range(0x180B, 0x1810)) + list(range(0x200B, 0x2010))
    + list(range(0x2060, 0x2070)) + list(range(0xFE00, 0xFE10))
    + list(range(0xE0100, 0xE01F0)))

# Scripts whose letters take a precomposed form: a combining mark left
# over after NFKC on one of their letters (o + U+0336, a stroke through it)
# is a decoration that other eyes read past.  In Devanagari, Hebrew or
# Arabic, combining marks are how the script is written.
PRECOMPOSED = frozenset({'Latin', 'Greek', 'Cyrillic'})

# The first word of a Unicode name, for the scripts that share a family.
# Chinese and Japanese writing mixes Han with the kana.
FAMILIES = {'CJK': 'Chinese/Japanese', 'HIRAGANA': 'Chinese/Japanese',
            'KATAKANA': 'Chinese/Japanese', 'IDEOGRAPHIC': 'Chinese/Japanese',
            'BOPOMOFO': 'Chinese/Japanese'}
# Latin goes with the East Asian scripts in everyday names ("dev-さくら"),
# and shares no lookalike letters with them (Unicode TR 39, "highly
# restrictive"); those may mix, nothing else may.
MAY_MIX = frozenset({'Latin', 'Chinese/Japanese', 'Hangul'})


def fold(name):
    """The key under which a name is unique: how it reads, not how it is spelled.

    NFKC makes compatibility forms plain ('ｂ' -> 'b', 'ﬁ' -> 'fi'), casefold
    makes case irrelevant ('Bob', 'BOB' -> 'bob'; 'ß' -> 'ss'), and a last
    NFKC puts back together what casefolding took apart.
    """
    return unicodedata.normalize(
        'NFKC', unicodedata.normalize('NFKC', name).casefold())


def check_readable(name):
    """Raise ProtocolError, saying why, for a name that does not read reliably.

    A name may not hold invisible characters, combining marks that float
    on a Latin, Greek or Cyrillic letter, or letters of two scripts.
    """
    for char in name:
        if ord(char) in INVISIBLE or unicodedata.category(char) in INVISIBLE_CATEGORIES:
            raise wire.ProtocolError(f'name: holds an invisible character, {describe(char)}')
    plain = unicodedata.normalize('NFKC', name)
    check_marks(plain)
    scripts = [script for script in dict.fromkeys(map(script_of, plain)) if script]
    if len(scripts) > 1 and not set(scripts) <= MAY_MIX:
        raise wire.ProtocolError(f'name: mixes {" and ".join(scripts)}')


def check_marks(plain):
    """Raise ProtocolError for a combining mark that no letter took in (NFKC form)."""
    base = None
    for char in plain:
        if not unicodedata.category(char).startswith('M'):
            base = char
        elif base is None:
            raise wire.ProtocolError(f'name: starts with a combining mark, {describe(char)}')
        elif script_of(base) in PRECOMPOSED:
            raise wire.ProtocolError(
                f'name: a combining mark on {base!r}, {describe(char)}; '
                f'use a letter that has the mark')


def script_of(char):
    """'Latin', 'Cyrillic', 'Chinese/Japanese', ... for a letter or a digit; None else.

    ASCII digits and the punctuation a name may hold are common to every
    script; a digit of another script counts as that script.
    """
    category = unicodedata.category(char)
    if char in '0123456789' or not (category.startswith('L') or category == 'Nd'):
        return None
    word = unicodedata.name(char, 'UNKNOWN').split()[0].split('-')[0]
    return FAMILIES.get(word, word.title())


def describe(char):
    """U+200B (ZERO WIDTH SPACE): a character that may not show, named for people."""
    return f'U+{ord(char):04X} ({unicodedata.name(char, "unnamed")})'


class Owners:
    """Names that no connection holds now, each kept for the proof that last held it.

    When a connection closes, by accident or because its owner's new
    connection took over, its name is not free: a kicked user's name
    would be free within milliseconds, for whoever asks first.  So it
    stays reserved for ``hold`` seconds; at most ``size`` names are kept,
    and past that the one released longest ago is forgotten first.
    """

    def __init__(self, hold, size):
        self.hold = hold
        self.size = size
        self.held = {}          # folded name -> (proof, until when), oldest first

    def proof(self, key, now):
        """The proof a free name is kept for, or None when anyone may take it."""
        held = self.held.get(key)
        if held is None:
            return None
        if held[1] <= now:
            del self.held[key]
            return None
        return held[0]

    def release(self, key, proof, now):
        """A connection gave the name up: keep it for its proof a while."""
        self.held.pop(key, None)            # to the end: the newest release
        self.held[key] = (proof, now + self.hold)
        while len(self.held) > self.size:
            del self.held[next(iter(self.held))]

    def take(self, key):
        """A connection holds the name now: it is not merely kept any more."""
        self.held.pop(key, None)

    def forget_expired(self, now):
        """Drop the names whose time ran out (oldest first, so from the head)."""
        while self.held:
            key, (_, until) = next(iter(self.held.items()))
            if until > now:
                return
            del self.held[key]


class NameOwnersMixIn:
    """The server's names: compared as they read, each kept for the key that proved it.

    The article's registry takes any free name.  This one refuses names
    that do not read reliably, gives a name to the proof (REGISTER's, of
    the name's key: identity.py) it was first registered with, lets the
    owner's new connection take it over, and keeps it for the owner a
    while after its connection closes (``Owners``).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.owners = Owners(self.limits.name_hold, self.limits.max_held_names)
        self.proofs = {}            # folded name -> the proof its holder registered with

    def name_key(self, name):
        """Names that read alike are one name: the registry's key is the folded one."""
        return fold(name)

    def may_register(self, peer, message, key):
        """A readable name that no one else holds or keeps; the owner takes its own over.

        The owner's new connection takes the name at once: the old one is
        most likely dead and not yet noticed (a laptop that slept, a NAT
        that forgot the mapping).
        """
        try:
            check_readable(message.name)
        except wire.ProtocolError as error:
            self.send_error(peer, wire.E_BAD_MESSAGE, str(error), 'unreadable name')
            return False
        if not self.owns(key, message.proof):
            self.refuse_name(peer, message.name, key)
            return False
        holder = self.peers.get(key)
        if holder is not None:
            log.info('%s: a new connection with its key takes the name over', holder)
            self.send_error(holder, wire.E_NAME_TAKEN,
                            'a new connection with your key took over your name',
                            'name taken over by its owner')
            self.close(holder)
        if not super().may_register(peer, message, key):
            return False
        self.owners.take(key)
        self.proofs[key] = message.proof
        return True

    def owns(self, key, proof):
        """True when no one else holds or keeps the (folded) name."""
        owner = self.proofs[key] if key in self.peers else self.owners.proof(key, time.monotonic())
        return owner is None or hmac.compare_digest(owner, proof)

    def refuse_name(self, peer, name, key):
        """Refuse a name that is someone else's, and close: each guess costs a connection.

        (--accept-rate bounds those.)  The ERROR goes first: on a fresh
        connection the kernel takes its few bytes at once, before the FIN.
        """
        holder = self.peers.get(key)
        spelled = holder.name if holder else name
        self.send_error(peer, wire.E_NAME_TAKEN,
                        f'name {name!r} is taken' if spelled == name
                        else f'name {name!r} is taken (it reads as {spelled!r})',
                        'name taken')
        self.close(peer)

    def forget(self, peer):
        """A closed connection's name is not free: it is kept for its proof a while."""
        if peer.key is not None and self.peers.get(peer.key) is peer:
            self.owners.release(peer.key, self.proofs.pop(peer.key), time.monotonic())
        super().forget(peer)

    def check_timers(self, now):
        """Names kept past --name-hold are free again."""
        super().check_timers(now)
        self.owners.forget_expired(now)
