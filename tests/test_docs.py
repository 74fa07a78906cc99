"""The README's promises about the code: every name its tables cite exists."""

import importlib
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def cited_names():
    """Every code name in the tables "Where each article point lives" and "Reading order".

    `.introduce` after `rendezvous.Rendezvous.connect` is
    rendezvous.Rendezvous.introduce; a bare `FLAG_PUNCHING` after
    `p2pcommon.FLAG_REPLY` is p2pcommon.FLAG_PUNCHING; `transfer.py` is a
    module.
    """
    with open(README, encoding='utf-8') as readme:
        text = readme.read()
    rows = []
    for heading in ('## Where each article point lives', '## Reading order'):
        table = text.split(heading)[1].split('\n## ')[0]
        rows += [row for row in table.splitlines() if row.startswith('| ')][2:]
    names = []
    for row in rows:
        previous = None
        for name in re.findall(r'`([^`]+)`', row.split('|')[2]):
            if name.endswith('.py'):
                full = name[:-3]
            elif name.startswith('.'):
                full = previous.rsplit('.', 1)[0] + name
            elif '.' not in name:
                full = previous.split('.')[0] + '.' + name
            else:
                full = name
            names.append(full)
            previous = full
    return names


@pytest.mark.parametrize('name', cited_names())
def test_every_name_the_points_table_cites_exists(name):
    module, *attributes = name.split('.')
    thing = importlib.import_module(module)
    for attribute in attributes:
        thing = getattr(thing, attribute)


def test_the_points_table_has_a_row_for_every_article_point():
    with open(README, encoding='utf-8') as readme:
        table = readme.read().split('## Where each article point lives')[1].split('\n## ')[0]
    points = {int(cell) for cell in re.findall(r'^\| (\d+)\. ', table, re.MULTILINE)}
    assert points == set(range(1, 12))
