"""Names that stay with their owner, and peer messages that prove their session."""

import os
import stat

import pytest

import identity
import p2pcommon as wire
from identity import SessionKey

TOKEN = bytes(range(wire.TOKEN_SIZE))
OTHER_TOKEN = b'\x99' * wire.TOKEN_SIZE


# ---------------------------------------------------------------------------
# The user's key.


def test_load_key_creates_a_private_key_file_on_first_use(tmp_path):
    """The first load makes the folder and a 0600 file; later loads read the same key."""
    path = tmp_path / 'config' / 'p2pnat' / 'key'
    key = identity.load_key(str(path))
    assert len(key) == identity.KEY_SIZE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert identity.load_key(str(path)) == key
    assert path.read_text().strip() == key.hex()
    assert sorted(os.listdir(path.parent)) == ['key']        # no temporary file left


def test_two_users_get_two_keys(tmp_path):
    """Each new key is random."""
    assert identity.load_key(str(tmp_path / 'a')) != identity.load_key(str(tmp_path / 'b'))


def test_an_existing_key_file_is_read_not_replaced(tmp_path):
    """A key the user brought (--key FILE) is used as it is."""
    path = tmp_path / 'key'
    path.write_text('00112233445566778899aabbccddeeff\n')
    assert identity.load_key(str(path)) == bytes.fromhex('00112233445566778899aabbccddeeff')
    assert path.read_text() == '00112233445566778899aabbccddeeff\n'


@pytest.mark.parametrize('text', ['not hex at all', '0011zz', '00112233', ''])
def test_a_bad_key_file_is_a_value_error_naming_the_path(tmp_path, text):
    """Not hex, or too short: ValueError, and the message says which file."""
    path = tmp_path / 'key'
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        identity.load_key(str(path))
    assert str(path) in str(info.value)


def test_default_key_path_follows_xdg_config_home(monkeypatch, tmp_path):
    """$XDG_CONFIG_HOME/p2pnat/key where set, else ~/.config/p2pnat/key."""
    monkeypatch.setenv('XDG_CONFIG_HOME', str(tmp_path))
    assert identity.default_key_path() == str(tmp_path / 'p2pnat' / 'key')
    monkeypatch.delenv('XDG_CONFIG_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert identity.default_key_path() == str(tmp_path / 'home' / '.config' / 'p2pnat' / 'key')


# ---------------------------------------------------------------------------
# REGISTER's proof.


def test_name_proof_is_stable_and_sized_for_register():
    """The same key, name and server give the same 16 bytes, which REGISTER carries."""
    key = bytes(32)
    proof = identity.name_proof(key, 'alice', 'rendezvous.example:7777')
    assert proof == identity.name_proof(key, 'alice', 'rendezvous.example:7777')
    assert len(proof) == wire.PROOF_SIZE
    data = wire.encode(wire.REGISTER, name='alice', private=[], tcp_port=1, proof=proof)
    assert wire.decode(data).proof == proof


def test_name_proof_differs_per_name_per_server_and_per_key():
    """Another name, another server or another key: another proof."""
    key, other_key = bytes(32), b'\x01' * 32
    proofs = {
        identity.name_proof(key, 'alice', '203.0.113.1:7777'),
        identity.name_proof(key, 'alicf', '203.0.113.1:7777'),
        identity.name_proof(key, 'zoë', '203.0.113.1:7777'),
        identity.name_proof(key, 'alice', '203.0.113.2:7777'),
        identity.name_proof(key, 'alice', '203.0.113.1:7778'),
        identity.name_proof(other_key, 'alice', '203.0.113.1:7777'),
    }
    assert len(proofs) == 6


def test_name_proof_keeps_name_and_server_apart():
    """'ab' at server 'c' is not 'a' at server 'bc': the two are separated."""
    key = bytes(32)
    assert identity.name_proof(key, 'ab', 'c') != identity.name_proof(key, 'a', 'bc')


# ---------------------------------------------------------------------------
# SessionKey: the MAC on every peer message.


def pair(token=TOKEN):
    """The two ends of one session: the peer that asked (0) and the one that answered (1)."""
    return SessionKey(token, 0), SessionKey(token, 1)


def test_session_id_is_derived_from_the_token_and_hides_it():
    """8 bytes, the same on both sides, different per token, and not a piece of the token."""
    ours, theirs = pair()
    assert ours.id == theirs.id == identity.session_id(TOKEN)
    assert len(ours.id) == wire.SESSION_ID_SIZE
    assert ours.id not in TOKEN
    assert identity.session_id(OTHER_TOKEN) != ours.id


def test_a_sealed_message_checks_on_the_peer_side():
    """What one role seals, the other role's key accepts, fields intact."""
    ours, theirs = pair()
    message = wire.decode(ours.seal(wire.DATA, seq=3, oldest=1, text='hello'))
    assert theirs.check(message)
    assert (message.session, message.seq, message.oldest, message.text) == \
        (ours.id, 3, 1, 'hello')
    back = wire.decode(theirs.seal(wire.ACK, seq=3, sack=bytes(wire.SACK_BYTES)))
    assert ours.check(back)


def test_a_sealed_message_carries_no_token():
    """The 16-byte token appears nowhere in a sealed message."""
    ours, _ = pair()
    for type, fields in [(wire.PUNCH, dict(nonce=bytes(16))), (wire.KEEPALIVE, {}),
                         (wire.DATA, dict(seq=0, oldest=0, text='x')), (wire.GOODBYE, {})]:
        assert TOKEN not in ours.seal(type, **fields)


def test_our_own_message_reflected_back_does_not_check():
    """A message of ours sent back at us is not the peer's (the MAC covers the role)."""
    ours, _ = pair()
    message = wire.decode(ours.seal(wire.PUNCH, nonce=bytes(16)))
    assert not ours.check(message)
    assert not SessionKey(TOKEN, 0).check(message)


def test_another_session_does_not_check():
    """A message sealed for another session fails, even with the right role."""
    ours, _ = pair()
    stranger = SessionKey(OTHER_TOKEN, 1)
    assert not ours.check(wire.decode(stranger.seal(wire.KEEPALIVE)))
    forged = wire.encode(wire.KEEPALIVE, session=ours.id, counter=1, mac=wire.NO_MAC)
    assert not ours.check(wire.decode(forged))


def test_a_flipped_bit_anywhere_fails_the_check():
    """Header, session id, counter, fields or MAC: any one bit changed, and it fails."""
    ours, theirs = pair()
    data = ours.seal(wire.DATA, seq=7, oldest=5, text='hé')
    assert theirs.check(wire.decode(data))
    checked = 0
    for bit in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        try:
            message = wire.decode(bytes(mutated))
        except wire.ProtocolError:
            continue                    # the decoder refused it already
        assert not theirs.check(message), f'bit {bit} flipped and still checks'
        checked += 1
    assert checked > len(data) * 4     # most flips decode: the MAC is what catches them


def test_a_truncated_or_extended_message_fails():
    """The MAC covers the length: a message cut short and re-framed does not check."""
    ours, theirs = pair()
    data = ours.seal(wire.FINISH, transfer=1, ok=1, text='saved')
    shorter = wire.encode(wire.FINISH, session=ours.id, counter=1, transfer=1, ok=1,
                          text='save', mac=data[-wire.MAC_SIZE:])
    assert not theirs.check(wire.decode(shorter))


def test_counters_grow_with_every_message_sealed():
    """Each seal uses the next counter, starting at 1."""
    ours, _ = pair()
    counters = [wire.decode(ours.seal(wire.KEEPALIVE)).counter for _ in range(3)]
    assert counters == [1, 2, 3]
    assert ours.sent == 3


def test_newer_accepts_increasing_counters_only():
    """A counter at or below the newest accepted is refused; a higher one moves it on."""
    ours, theirs = pair()
    first, second, third = (wire.decode(theirs.seal(wire.KEEPALIVE)) for _ in range(3))
    assert ours.newer(second)
    assert not ours.newer(second)       # the same message again: a replay
    assert not ours.newer(first)        # an older one, late or replayed
    assert ours.newer(third)
    assert ours.newest == 3
