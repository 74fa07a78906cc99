"""Names that people read: one owner for what reads alike (an addition to the article).

People read names, not bytes.  "bob", "Bob", "bоb" (with a Cyrillic о),
"ｂｏｂ" (fullwidth) and "bob" with an invisible character after it are
five different strings that a person reads as one name, and whoever
registers a lookalike of bob's name is trusted as bob.  So the server
compares names by how they read (``fold``), refuses the names that cannot
be read reliably (``check_readable``), and keeps each name for the user
who first proved to hold its secret (``Owners``; the proof is identity.py's).

Only the standard library's ``unicodedata`` is used.  It has no script
property, so a letter's script is the first word of its Unicode name
("LATIN SMALL LETTER O", "CYRILLIC SMALL LETTER O"): enough to see a name
that mixes alphabets.  What this does not catch: a name written wholly in
another script that happens to look Latin ("аре", all Cyrillic).
"""

import unicodedata

import p2pcommon as wire

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
