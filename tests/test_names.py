"""names.py: how names read, which read reliably, how long a left name is kept."""

import re

import pytest

import names
import p2pcommon as wire


@pytest.mark.parametrize('spelling', ['bob', 'Bob', 'BOB', 'ｂｏｂ', 'ⓑⓞⓑ'])
def test_spellings_that_read_alike_fold_alike(spelling):
    assert names.fold(spelling) == 'bob'


def test_fold_composes_what_casefold_takes_apart():
    assert names.fold('Zoe\u0308') == names.fold('ZOË') == 'zoë'
    assert names.fold('Straße') == 'strasse'


@pytest.mark.parametrize('name', ['Zoë', 'Алиса', 'Ωμέγα', 'さくら', '東京タワー', '김철수',
                                  'नमस्ते', 'שָׁלוֹם', 'dev-01', 'a_b.c', 'dev-さくら'])
def test_names_in_one_script_read_reliably(name):
    names.check_readable(name)


@pytest.mark.parametrize('name, reason', [
    ('bоb', 'mixes Latin and Cyrillic'),
    ('pаypal', 'mixes Latin and Cyrillic'),
    ('bob١', 'mixes Latin and Arabic'),
    ('\u0301a', 'starts with a combining mark'),
    ('o\u0338k', "a combining mark on 'o'"),
    ('a\u00adb', 'invisible character, U+00AD'),
    ('x\ufe0f', 'invisible character, U+FE0F'),
    ('\u1160', 'invisible character, U+1160'),
])
def test_names_that_do_not_read_reliably_say_why(name, reason):
    with pytest.raises(wire.ProtocolError, match=re.escape(reason)):
        names.check_readable(name)


def test_a_left_name_is_kept_for_its_proof_until_its_time_runs_out():
    owners = names.Owners(hold=10, size=2)
    owners.release('bob', b'p', now=0)
    assert owners.proof('bob', now=9) == b'p'
    assert owners.proof('bob', now=10) is None


def test_past_its_size_the_name_released_longest_ago_is_freed():
    owners = names.Owners(hold=10, size=2)
    for when, name in enumerate(['a', 'b', 'c']):
        owners.release(name, name.encode(), now=when)
    assert [owners.proof(n, now=3) for n in 'abc'] == [None, b'b', b'c']
