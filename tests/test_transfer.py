"""Tests for transfer.py: file names, progress, and whole transfers in memory.

Two ``Transfers`` objects, one per peer, are joined by a fake ``send`` that
encodes each message, queues it, and hands it through ``wire.decode`` to the
other side's ``handle``.  Time is an explicit ``now`` that the tests move on;
``tick`` is called in a loop.  No sockets, no sleeps.  Messages are
sealed with the session's MAC (identity.SessionKey) as the Session's send
does, and checked on arrival; ``sealed`` makes one as a peer would.
"""

import collections
import hashlib
import os
import random
import re
import threading

import pytest

import identity
import p2pcommon as wire
import reliable
import transfer
from transfer import (CHUNK_SIZE, PROGRESS_EVERY, REPEAT, Progress, Receiving, TransferError,
                      Transfers, check_file_name, human, unused_name)

TOKEN = bytes(range(16))    # the session's token, as INTRODUCE gives it
START = 1000.0              # a monotonic clock is never near zero


# ---------------------------------------------------------------------------
# check_file_name.


@pytest.mark.parametrize('name', [
    '', '.', '..', '/', 'a/b', '/etc/passwd', '../evil', '../../.ssh/authorized_keys',
    'downloads/', 'a\\b', '..\\evil.exe', 'C:\\Windows\\evil.dll', 'x\0y', '\0',
    'line\nbreak', 'tab\there', 'bell\a', '\x1b[31mred', '\x7f', 'cr\r', '\u202egpj.exe',
    'a\u2028b', '\x85',
], ids=repr)
def test_check_file_name_refuses(name):
    """Empty, dot names, path separators of either kind, NUL and control characters."""
    with pytest.raises(TransferError, match='plain file name'):
        check_file_name(name)


@pytest.mark.parametrize('name', [
    'report 日本.pdf', 'a', 'report.pdf', '.bashrc', '...', 'a..b', 'zoë – résumé.txt',
    'x' * 200, '🙂.png', 'no extension', '-rf',
])
def test_check_file_name_accepts(name):
    """Any other printable name, spaces and non-ASCII included, is a plain file name."""
    check_file_name(name)


def test_check_file_name_says_which_name():
    """The error quotes the name, safely (repr), for the user."""
    with pytest.raises(TransferError) as info:
        check_file_name('../x\x1b')
    assert repr('../x\x1b') in str(info.value)
    assert '\x1b' not in str(info.value)


# ---------------------------------------------------------------------------
# unused_name.


def touch(path, content=b''):
    """Create a file with some content."""
    path.write_bytes(content)
    return path


def test_unused_name_free(tmp_path):
    """A free name is used as it is."""
    assert unused_name(str(tmp_path), 'report.pdf') == str(tmp_path / 'report.pdf')


def test_unused_name_counts_up(tmp_path):
    """name, then name-1, name-2 ... before the extension."""
    touch(tmp_path / 'report.pdf')
    assert unused_name(str(tmp_path), 'report.pdf') == str(tmp_path / 'report-1.pdf')
    touch(tmp_path / 'report-1.pdf')
    assert unused_name(str(tmp_path), 'report.pdf') == str(tmp_path / 'report-2.pdf')
    touch(tmp_path / 'report-2.pdf')
    touch(tmp_path / 'report-4.pdf')
    assert unused_name(str(tmp_path), 'report.pdf') == str(tmp_path / 'report-3.pdf')


def test_unused_name_without_extension(tmp_path):
    """A name with no dot gets the number at the end."""
    touch(tmp_path / 'README')
    assert unused_name(str(tmp_path), 'README') == str(tmp_path / 'README-1')
    touch(tmp_path / 'README-1')
    assert unused_name(str(tmp_path), 'README') == str(tmp_path / 'README-2')


def test_unused_name_dotfile(tmp_path):
    """A dotfile is all name and no extension: .bashrc-1, not -1.bashrc."""
    touch(tmp_path / '.bashrc')
    assert unused_name(str(tmp_path), '.bashrc') == str(tmp_path / '.bashrc-1')
    touch(tmp_path / '.bashrc-1')
    assert unused_name(str(tmp_path), '.bashrc') == str(tmp_path / '.bashrc-2')


def test_unused_name_last_extension_only(tmp_path):
    """Only the last extension is kept after the number."""
    touch(tmp_path / 'archive.tar.gz')
    assert unused_name(str(tmp_path), 'archive.tar.gz') == str(tmp_path / 'archive.tar-1.gz')


def test_unused_name_skips_folders(tmp_path):
    """A folder of that name is in the way too."""
    (tmp_path / 'photos').mkdir()
    assert unused_name(str(tmp_path), 'photos') == str(tmp_path / 'photos-1')


def test_unused_name_never_an_existing_file(tmp_path):
    """Whatever exists already, the answer is a name that does not."""
    rng = random.Random(5)
    names = ['a.txt', 'a', '.a', 'a.b.c']
    for _ in range(200):
        name = rng.choice(names)
        result = unused_name(str(tmp_path), name)
        assert not os.path.lexists(result)
        assert os.path.dirname(result) == str(tmp_path)
        touch(tmp_path / os.path.basename(result))
    assert len(os.listdir(tmp_path)) == 200


def test_unused_name_skips_dangling_symlink(tmp_path):
    """A dangling symlink occupies its name: os.link onto it would fail."""
    os.symlink(str(tmp_path / 'nowhere'), str(tmp_path / 'notes.txt'))
    assert unused_name(str(tmp_path), 'notes.txt') == str(tmp_path / 'notes-1.txt')


# ---------------------------------------------------------------------------
# human and Progress.


@pytest.mark.parametrize('count,text', [
    (0, '0 bytes'), (1, '1 bytes'), (999, '999 bytes'), (1000, '1.0 kB'), (1500, '1.5 kB'),
    (200_000, '200.0 kB'), (1_234_567, '1.2 MB'), (10**9, '1.0 GB'), (2 * 10**12, '2000.0 GB'),
    (512.4, '512 bytes'),
])
def test_human(count, text):
    """Decimal units, one decimal place from kB on; GB is the largest unit."""
    assert human(count) == text


def test_human_rounding_at_unit_boundaries():
    """Just below a unit boundary the rounded text moves to the next unit."""
    assert human(999_999) == '1.0 MB'
    assert human(999.7) == '1.0 kB'


def test_progress_not_before_progress_every():
    """No line until PROGRESS_EVERY has passed, then one, then none for another second."""
    progress = Progress(1000, START)
    assert progress.line(100, START) is None
    assert progress.line(100, START + PROGRESS_EVERY - 0.001) is None
    assert progress.line(500, START + PROGRESS_EVERY) == '50% at 500 bytes/s, 1 s left'
    assert progress.line(500, START + PROGRESS_EVERY) is None
    assert progress.line(600, START + 2 * PROGRESS_EVERY - 0.001) is None
    assert progress.line(600, START + 2 * PROGRESS_EVERY) == '60% at 300 bytes/s, 1 s left'


def test_progress_at_most_once_per_interval():
    """Called every 10 ms for 10 s, it gives about one line a second."""
    progress = Progress(10**6, START)
    times = [START + i / 100 for i in range(1, 1001)
             if progress.line(i * 1000, START + i / 100) is not None]
    assert 9 <= len(times) <= 10
    assert all(b - a >= PROGRESS_EVERY - 1e-9 for a, b in zip(times, times[1:]))


@pytest.mark.parametrize('size,done,seconds,text', [
    (1000, 999, 1.0, '99% at 999 bytes/s, 0 s left'),       # percent rounds down
    (1000, 1000, 2.0, '100% at 500 bytes/s, 0 s left'),
    (10 * 10**9, 5 * 10**9, 10.0, '50% at 500.0 MB/s, 10 s left'),
    (200_000, 50_000, 4.0, '25% at 12.5 kB/s, 12 s left'),
    (2**63, 2**62, 1.0, '50% at 4611686018.4 GB/s, 1 s left'),
])
def test_progress_numbers(size, done, seconds, text):
    """Percent of the size, average rate since the start, time left at that rate."""
    progress = Progress(size, START)
    assert progress.line(done, START + seconds) == text


def test_progress_sane_percent():
    """The percent is 0-100 all along a transfer, and never goes backwards."""
    progress = Progress(123_457, START)
    percents = []
    for i in range(1, 60):
        line = progress.line(min(i * 2500, 123_457), START + i)
        percent = int(line.split('%')[0])
        assert 0 <= percent <= 100
        percents.append(percent)
    assert percents == sorted(percents) and percents[-1] == 100


def test_progress_nothing_done_yet():
    """Nothing moved in a second: 0% and no division by zero."""
    line = Progress(1000, START).line(0, START + 1)
    assert line.startswith('0% at 0 bytes/s')


# ---------------------------------------------------------------------------
# Two peers in memory.


class Side:
    """One peer: its Transfers, its download folder and what it said."""

    def __init__(self, link, name, peer, downloads):
        self.link = link
        self.name = name
        self.downloads = downloads
        self.lines = []                     # (now, text)
        self.sent = collections.Counter()   # message type -> count
        # Each peer is a program of its own: its own numbers for /accept N and /cancel N.
        self.offers = transfer.Numbering(transfer.OFFERS.live, 'is on offer')
        self.sends = transfer.Numbering(transfer.SENDS.live, 'is being sent')
        self.transfers = Transfers(peer, self.send, self.say, str(downloads),
                                   offers=self.offers, sends=self.sends)
        self.key = identity.SessionKey(TOKEN, role=int(name == 'bob'))
        self.other = None

    def send(self, type, **fields):
        """The session's send: seal, check the size, queue for the other side."""
        data = self.key.seal(type, **fields)
        assert len(data) <= wire.MAX_DATAGRAM
        self.sent[type] += 1
        self.link.queue.append((self.other, data))

    def say(self, text):
        self.lines.append((self.link.now, text))

    @property
    def text(self):
        """Everything said, one string."""
        return '\n'.join(text for _, text in self.lines)

    def said(self, fragment):
        """The lines containing fragment."""
        return [text for _, text in self.lines if fragment in text]


class Link:
    """Alice and Bob joined in memory; a filter may drop or change messages in transit."""

    def __init__(self, tmp_path):
        self.now = START
        self.queue = collections.deque()
        self.filter = None                  # filter(to_side, message) -> message or None
        self.chunks_per_step = None         # a bottleneck: CHUNKs past this wait a step
        self.spent = 0
        self.held = []                      # (due, to_side, data): late messages
        self.delivered = collections.Counter()
        self.alice = Side(self, 'alice', 'bob', tmp_path / 'alice')
        self.bob = Side(self, 'bob', 'alice', tmp_path / 'bob')
        self.alice.other, self.bob.other = self.bob, self.alice

    def deliver(self):
        """Hand every queued message (and their answers) to the other side, at now."""
        for _ in range(1_000_000):
            if not self.queue:
                return
            to, data = self.queue.popleft()
            message = wire.decode(data)
            if message.type == wire.CHUNK and self.chunks_per_step is not None:
                if self.spent >= self.chunks_per_step:
                    self.queue.appendleft((to, data))
                    return
                self.spent += 1
            assert message.type in Transfers.MESSAGES
            assert to.key.check(message)
            if self.filter:
                message = self.filter(to, message)
                if message is None:
                    continue
            self.delivered[message.type] += 1
            to.transfers.handle(message, self.now)
        raise AssertionError('messages never stopped')

    def hashed(self):
        """Wait for the hashing threads: a step then sees every hash done."""
        for side in (self.alice, self.bob):
            for sending in side.transfers.outgoing.values():
                sending.hashing.join()

    def step(self, dt=0.01):
        """Move time on, tick both sides (hashing done), deliver what they sent."""
        self.hashed()
        self.now = round(self.now + dt, 6)
        self.spent = 0
        late = [(to, data) for due, to, data in self.held if due <= self.now]
        self.held = [item for item in self.held if item[0] > self.now]
        self.queue.extend(late)
        self.alice.transfers.tick(self.now)
        self.bob.transfers.tick(self.now)
        self.deliver()

    def hold(self, to, message, delay):
        """Deliver a (copy of a) message delay seconds later than now."""
        data = wire.encode(message.type, message.flags, **message.fields)
        self.held.append((self.now + delay, to, data))

    def run(self, until, dt=0.01, limit=120.0):
        """Step until until() is true; fail after limit seconds of simulated time."""
        start = self.now
        while not until():
            assert self.now - start < limit, 'the transfer never finished'
            self.step(dt)

    def offer(self, path, accept=True):
        """Alice offers a file, Bob is asked and answers; return the Sending."""
        self.alice.transfers.offer(str(path), self.now)
        sending = self.alice.transfers.outgoing[max(self.alice.transfers.outgoing)]
        self.step()
        receiving = self.bob.transfers.waiting_for_answer()
        assert receiving is not None and receiving.transfer == sending.transfer
        self.bob.transfers.answer(receiving, accept, self.now)
        self.deliver()
        return sending


@pytest.fixture
def link(tmp_path):
    """Two peers joined in memory, with a folder of files to send."""
    (tmp_path / 'files').mkdir()
    return Link(tmp_path)


def make_file(tmp_path, name, size, seed=1):
    """A file of random bytes in tmp_path/files."""
    data = random.Random(seed).randbytes(size)
    path = tmp_path / 'files' / name
    path.write_bytes(data)
    return path, data


def leftovers(folder):
    """Files in a download folder, hidden temporary ones included."""
    return sorted(os.listdir(folder)) if folder.exists() else []


def done(sending):
    return lambda: sending.state == 'done'


# -- the good case ----------------------------------------------------------


@pytest.mark.parametrize('size', [200_000, 0, 1, CHUNK_SIZE, CHUNK_SIZE + 1])
def test_transfer_arrives_byte_identical(tmp_path, link, size):
    """A file arrives whole, under its name, and both sides say so."""
    path, data = make_file(tmp_path, 'report.bin', size)
    link.alice.transfers.offer(str(path), link.now)
    assert link.alice.transfers.busy
    assert link.alice.lines == []                   # the SHA-256 is worked out first
    link.step()
    assert link.alice.said(f'offering report.bin ({human(size)}) to bob; waiting for an answer')
    assert link.bob.said(f'alice offers report.bin ({human(size)}): /accept or /reject')
    receiving = link.bob.transfers.waiting_for_answer()
    assert (receiving.name, receiving.size) == ('report.bin', size)
    assert receiving.sha256 == hashlib.sha256(data).digest()
    link.bob.transfers.answer(receiving, True, link.now)
    link.deliver()
    assert link.bob.said('accepted report.bin from alice')
    assert link.alice.said('bob accepted report.bin; sending')
    sending = link.alice.transfers.outgoing[1]
    link.run(done(sending))
    saved = tmp_path / 'bob' / 'report.bin'
    assert saved.read_bytes() == data
    assert leftovers(tmp_path / 'bob') == ['report.bin']       # no temporary file left
    received = link.bob.said('received report.bin from alice')
    assert len(received) == 1
    assert f'{size} bytes, SHA-256 ok' in received[0]
    told = link.alice.said('bob received report.bin')
    assert len(told) == 1 and 'SHA-256 ok' in told[0]
    assert 'stopped' not in link.alice.text + link.bob.text
    assert not link.alice.transfers.busy
    assert link.bob.transfers.waiting_for_answer() is None
    assert sending.stream.closed
    assert path.read_bytes() == data                           # the original is untouched
    assert link.delivered[wire.CHUNK] >= -(-size // CHUNK_SIZE)
    assert link.delivered[wire.FINISH] == 1


def test_transfer_progress_lines(tmp_path, link):
    """Over a slow path, progress lines come on both sides, at most one a second each."""
    path, data = make_file(tmp_path, 'big.bin', 1_000_000)
    link.chunks_per_step = 2                    # 2 kB every 10 ms: 200 kB/s, about 5 s
    sending = link.offer(path)
    link.run(done(sending))
    assert (tmp_path / 'bob' / 'big.bin').read_bytes() == data
    for side, prefix in [(link.alice, 'sending big.bin to bob: '),
                         (link.bob, 'receiving big.bin from alice: ')]:
        times = [now for now, text in side.lines if text.startswith(prefix)]
        assert len(times) >= 3, side.text
        assert all(b - a >= PROGRESS_EVERY - 1e-9 for a, b in zip(times, times[1:]))
        for text in side.said(prefix):
            percent = int(text[len(prefix):].split('%')[0])
            assert 0 <= percent <= 100


def test_existing_file_not_overwritten(tmp_path, link):
    """A file of the same name in the download folder stays as it was: report-1.pdf."""
    (tmp_path / 'bob').mkdir()
    touch(tmp_path / 'bob' / 'report.pdf', b'mine')
    touch(tmp_path / 'bob' / 'report-1.pdf', b'mine too')
    path, data = make_file(tmp_path, 'report.pdf', 5000)
    sending = link.offer(path)
    link.run(done(sending))
    assert (tmp_path / 'bob' / 'report.pdf').read_bytes() == b'mine'
    assert (tmp_path / 'bob' / 'report-1.pdf').read_bytes() == b'mine too'
    assert (tmp_path / 'bob' / 'report-2.pdf').read_bytes() == data
    assert link.bob.said(str(tmp_path / 'bob' / 'report-2.pdf'))
    assert leftovers(tmp_path / 'bob') == ['report-1.pdf', 'report-2.pdf', 'report.pdf']


def test_same_file_twice(tmp_path, link):
    """Sending the same file twice keeps both copies; transfer ids differ."""
    path, data = make_file(tmp_path, 'twice.txt', 3000)
    first = link.offer(path)
    link.run(done(first))
    second = link.offer(path)
    link.run(done(second))
    assert (first.transfer, second.transfer) == (1, 2)
    assert (tmp_path / 'bob' / 'twice.txt').read_bytes() == data
    assert (tmp_path / 'bob' / 'twice-1.txt').read_bytes() == data


def test_both_ways_at_once(tmp_path, link):
    """Alice and Bob send each other a file at the same time, both with transfer id 1."""
    a_path, a_data = make_file(tmp_path, 'from-alice.bin', 50_000, seed=1)
    b_path, b_data = make_file(tmp_path, 'from-bob.bin', 70_000, seed=2)
    link.alice.transfers.offer(str(a_path), link.now)
    link.bob.transfers.offer(str(b_path), link.now)
    link.step()
    for side in (link.alice, link.bob):
        side.transfers.answer(side.transfers.waiting_for_answer(), True, link.now)
    link.deliver()
    link.run(lambda: not link.alice.transfers.busy and not link.bob.transfers.busy)
    assert (tmp_path / 'bob' / 'from-alice.bin').read_bytes() == a_data
    assert (tmp_path / 'alice' / 'from-bob.bin').read_bytes() == b_data


def test_offer_repeated_until_answered(tmp_path, link):
    """The OFFER is repeated every REPEAT seconds; the user is asked only once."""
    path, _ = make_file(tmp_path, 'slow.txt', 100)
    link.alice.transfers.offer(str(path), link.now)
    link.run(lambda: link.now >= START + 3.5 * REPEAT)
    assert link.alice.sent[wire.OFFER] == 4
    assert len(link.bob.said('alice offers slow.txt')) == 1
    assert link.bob.sent[wire.ANSWER] == 0
    assert link.alice.transfers.busy


def test_lossy_transfer(tmp_path, link):
    """A fifth of all messages lost, some late (reordered), some duplicated: the file still
    arrives intact, once."""
    rng = random.Random(11)

    def bad_path(to, message):
        if rng.random() < 0.2:
            return None
        if rng.random() < 0.1:
            link.hold(to, message, rng.uniform(0.01, 0.3))
            return None
        if rng.random() < 0.05:
            link.hold(to, message, rng.uniform(0.01, 0.3))
        return message

    path, data = make_file(tmp_path, 'lossy.bin', 100_000)
    link.filter = bad_path
    link.alice.transfers.offer(str(path), link.now)
    link.run(lambda: link.bob.transfers.waiting_for_answer() is not None)
    link.bob.transfers.answer(link.bob.transfers.waiting_for_answer(), True, link.now)
    sending = link.alice.transfers.outgoing[1]
    link.run(done(sending), limit=300)
    link.run(lambda: not link.held)             # stragglers change nothing
    assert (tmp_path / 'bob' / 'lossy.bin').read_bytes() == data
    assert leftovers(tmp_path / 'bob') == ['lossy.bin']
    assert len(link.bob.said('received lossy.bin from alice')) == 1
    assert len(link.alice.said('bob received lossy.bin')) == 1
    assert 'stopped' not in link.alice.text + link.bob.text


def test_lost_answer_and_finish_are_repeated(tmp_path, link):
    """If ANSWER or FINISH is lost, the repeated OFFER or END gets them again, the same."""
    lose = {wire.ANSWER: 1, wire.FINISH: 2}

    def drop_first(to, message):
        if lose.get(message.type):
            lose[message.type] -= 1
            return None
        return message

    link.filter = drop_first
    path, data = make_file(tmp_path, 'again.txt', 10_000)
    sending = link.offer(path)
    assert sending.state == 'offered'          # the ANSWER was lost
    link.run(done(sending))
    assert (tmp_path / 'bob' / 'again.txt').read_bytes() == data
    assert link.bob.sent[wire.FINISH] == 3
    assert len(link.bob.said('received again.txt')) == 1      # said once, answered thrice
    assert len(link.alice.said('bob received again.txt')) == 1
    assert leftovers(tmp_path / 'bob') == ['again.txt']


# -- refusals -----------------------------------------------------------------


def test_receiver_rejects(tmp_path, link):
    """/reject: the sender is told and stops; nothing is written."""
    path, _ = make_file(tmp_path, 'unwanted.zip', 20_000)
    sending = link.offer(path, accept=False)
    assert link.bob.said('rejected unwanted.zip from alice')
    assert link.alice.said('bob rejected unwanted.zip')
    assert sending.state == 'done' and sending.stream.closed
    assert not link.alice.transfers.busy
    assert link.bob.transfers.waiting_for_answer() is None
    link.run(lambda: link.now > START + 5)
    assert link.alice.sent[wire.CHUNK] == 0
    assert leftovers(tmp_path / 'bob') == []


def test_repeated_offer_after_reject_gets_reject_again(tmp_path, link):
    """A rejection whose ANSWER was lost is repeated when the OFFER comes again."""
    lose = {wire.ANSWER: 1}

    def drop_first(to, message):
        if lose.get(message.type):
            lose[message.type] -= 1
            return None
        return message

    link.filter = drop_first
    path, _ = make_file(tmp_path, 'unwanted.zip', 2000)
    sending = link.offer(path, accept=False)
    assert sending.state == 'offered'
    link.run(done(sending))
    assert link.alice.said('bob rejected unwanted.zip')
    assert len(link.bob.said('rejected unwanted.zip')) == 1
    assert leftovers(tmp_path / 'bob') == []


ALICE = identity.SessionKey(TOKEN, role=0)      # seals what a hostile alice sends bob
BOB = identity.SessionKey(TOKEN, role=1)        # and what a hostile bob sends alice


def sealed(type, sender=ALICE, **fields):
    """A peer message with a good MAC, decoded as the other side's client would."""
    return wire.decode(sender.seal(type, **fields))


def forged_offer(name, size=10, transfer_id=7, data=b'0123456789'):
    """An OFFER as a hostile peer could send it, through the wire format."""
    return sealed(wire.OFFER, transfer=transfer_id, size=size,
                  sha256=hashlib.sha256(data).digest(), name=name)


@pytest.mark.parametrize('name', ['../evil.txt', '../../.bashrc', 'sub/dir.txt', '/etc/passwd',
                                  '..', '.', '', 'a\\b.txt', '..\\..\\evil.exe', 'x\0y',
                                  '\x1b]0;pwned\x07', 'a\nb'], ids=repr)
def test_path_in_offered_name_refused(tmp_path, link, name):
    """An offered name with path components is refused without asking; nothing is written,
    even if the peer sends the chunks and END anyway."""
    before = sorted(str(p) for p in tmp_path.rglob('*'))
    bob = link.bob.transfers
    bob.handle(forged_offer(name), link.now)
    assert bob.waiting_for_answer() is None
    assert bob.incoming == {}
    answers = [wire.decode(data) for to, data in link.queue]
    assert [(m.type, m.transfer, m.accept) for m in answers] == [(wire.ANSWER, 7, 0)]
    assert link.bob.said('alice offered a file; refused the name')
    assert 'offers' not in link.bob.text
    chunk = sealed(wire.CHUNK, transfer=7, seq=0, oldest=0, data=b'0123456789')
    bob.handle(chunk, link.now)
    bob.handle(sealed(wire.END, transfer=7), link.now)
    assert len(link.queue) == 1                # no CHUNK_ACK, no FINISH
    assert sorted(str(p) for p in tmp_path.rglob('*')) == before
    assert not (tmp_path / 'bob').exists()


def test_path_in_name_refused_end_to_end(tmp_path, link):
    """A sender whose offered name has a path in it is refused, and told so."""
    path, _ = make_file(tmp_path, 'innocent.txt', 100)
    link.alice.transfers.offer(str(path), link.now)
    sending = link.alice.transfers.outgoing[1]
    sending.name = '../outside.txt'
    link.run(done(sending))
    assert link.alice.said('bob rejected ../outside.txt')
    assert link.bob.said('refused the name')
    assert not (tmp_path / 'outside.txt').exists()
    assert leftovers(tmp_path / 'bob') == []


def test_send_missing_file_or_folder(tmp_path, link):
    """/send of something that is not a readable file says why and offers nothing."""
    link.alice.transfers.offer(str(tmp_path / 'files' / 'nope.txt'), link.now)
    link.alice.transfers.offer(str(tmp_path / 'files'), link.now)
    assert len(link.alice.said('cannot send')) == 2
    assert link.alice.transfers.outgoing == {}
    link.step()
    assert link.queue == collections.deque() and link.bob.lines == []


# -- failures leave nothing behind ----------------------------------------------


def test_a_file_that_grows_sends_what_was_offered(tmp_path, link):
    """Bytes appended after the offer are not sent: the offered 20,000 arrive, checked."""
    path, data = make_file(tmp_path, 'grows.log', 20_000)
    sending = link.offer(path)
    with open(path, 'ab') as stream:                   # it grows after the offer
        stream.write(b'x' * 10_000)
    link.run(done(sending))
    assert link.bob.said('received grows.log from alice: 20000 bytes, SHA-256 ok')
    assert (tmp_path / 'bob' / 'grows.log').read_bytes() == data
    assert not link.alice.transfers.busy


def test_forged_chunks_beyond_size(tmp_path, link):
    """A peer that offers 10 bytes and sends 1024 is stopped; nothing is written."""
    bob = link.bob.transfers
    bob.handle(forged_offer('small.txt', size=10), link.now)
    bob.answer(bob.waiting_for_answer(), True, link.now)
    assert len(leftovers(tmp_path / 'bob')) == 1       # the hidden temporary file
    bob.handle(sealed(wire.CHUNK, transfer=7, seq=0, oldest=0, data=b'y' * CHUNK_SIZE),
               link.now)
    assert link.bob.said('stopped: more data than the 10 bytes offered')
    assert leftovers(tmp_path / 'bob') == []


def test_sha256_mismatch_leaves_no_file(tmp_path, link):
    """The same size but other bytes: the receiver deletes it and says so; so does the sender."""
    path, data = make_file(tmp_path, 'changed.bin', 30_000)
    sending = link.offer(path)
    with open(path, 'r+b') as stream:                  # changed after the offer, same size
        stream.seek(12_345)
        stream.write(b'CHANGED')
    link.run(done(sending))
    assert link.bob.said('changed.bin from alice failed: SHA-256 mismatch; deleted')
    assert link.alice.said('transfer of changed.bin with bob stopped: bob refused it: '
                           'SHA-256 mismatch; deleted')
    assert leftovers(tmp_path / 'bob') == []


def test_corrupted_chunk_in_transit(tmp_path, link):
    """A chunk altered on the way (a bad relay) is caught by the SHA-256."""
    def corrupt(to, message):
        if message.type == wire.CHUNK and message.seq == 3:
            message.fields['data'] = message.data[:-1] + bytes([message.data[-1] ^ 1])
            message.data = message.fields['data']
        return message

    link.filter = corrupt
    path, _ = make_file(tmp_path, 'flipped.bin', 10_000)
    sending = link.offer(path)
    link.run(done(sending))
    assert link.bob.said('SHA-256 mismatch; deleted')
    assert leftovers(tmp_path / 'bob') == []


def test_short_file_stops(tmp_path, link):
    """A file that shrank after the offer ends the transfer, one way or the other, and
    leaves nothing behind."""
    path, _ = make_file(tmp_path, 'shrinks.bin', 10_000)
    sending = link.offer(path)
    with open(path, 'r+b') as stream:
        stream.truncate(4000)
    link.run(done(sending))
    assert 'shrinks.bin' in link.alice.text and 'stopped' in link.alice.text + link.bob.text \
        or link.bob.said('size mismatch: 4000 of 10000 bytes; deleted')
    assert not link.alice.transfers.busy
    assert leftovers(tmp_path / 'bob') == []


def test_abort_deletes_the_temporary_file(tmp_path, link):
    """The peer leaves mid-transfer: the temporary file goes, nothing is saved, both stop."""
    path, _ = make_file(tmp_path, 'half.bin', 300_000)
    sending = link.offer(path)
    receiving = link.bob.transfers.incoming[1]
    link.run(lambda: receiving.received >= 50_000)
    assert receiving.received < 300_000
    temporary = leftovers(tmp_path / 'bob')
    assert len(temporary) == 1 and temporary[0].startswith('.half.bin.')
    assert temporary[0].endswith('.part')
    link.bob.transfers.abort('alice left')
    assert leftovers(tmp_path / 'bob') == []
    assert link.bob.said('transfer of half.bin with alice stopped: alice left')
    link.alice.transfers.abort('bob left')
    assert link.alice.said('transfer of half.bin with bob stopped: bob left')
    assert sending.state == 'done' and sending.stream.closed
    assert not link.alice.transfers.busy
    link.run(lambda: link.now > START + 60)        # late chunks change nothing
    assert leftovers(tmp_path / 'bob') == []
    assert len(link.bob.said('stopped')) == 1
    link.bob.transfers.abort('again')               # a second abort says nothing more
    assert len(link.bob.said('stopped')) == 1


def test_abort_before_answering(tmp_path, link):
    """An offer still waiting for /accept is dropped by abort; no file was ever made."""
    path, _ = make_file(tmp_path, 'asked.txt', 100)
    link.alice.transfers.offer(str(path), link.now)
    link.step()
    link.bob.transfers.abort('alice left')
    assert link.bob.transfers.waiting_for_answer() is None
    assert leftovers(tmp_path / 'bob') == []


def test_late_end_after_abort(tmp_path, link):
    """An END that arrives after the receiver aborted (a late datagram) saves nothing and
    raises nothing."""
    hold = {'end': True}
    link.filter = lambda to, m: None if m.type == wire.END and hold['end'] else m
    path, _ = make_file(tmp_path, 'late.bin', 5000)
    sending = link.offer(path)
    link.run(lambda: sending.state == 'ending')     # every chunk is in and acknowledged
    link.bob.transfers.abort('we left')
    hold['end'] = False
    link.step(REPEAT)
    assert leftovers(tmp_path / 'bob') == []


def test_receiving_refuses_before_accept(tmp_path):
    """Chunks for an offer not (yet) accepted are not written or acknowledged."""
    receiving = Receiving(forged_offer('x.txt'), str(tmp_path / 'dl'), START)
    assert receiving.chunk(0, 0, b'0123456789') is None
    assert not (tmp_path / 'dl').exists()


def test_receiving_rejects_bad_name_itself():
    """Receiving checks the name before anything else."""
    with pytest.raises(TransferError):
        Receiving(forged_offer('../x'), '/nonexistent', START)


def test_file_digest(tmp_path):
    """file_digest is the SHA-256 of the first size bytes, read in pieces."""
    data = random.Random(3).randbytes(3 * (1 << 20) + 5)
    path = tmp_path / 'big'
    path.write_bytes(data + b'appended later')
    with open(path, 'rb') as stream:
        assert transfer.file_digest(stream.fileno(), len(data)) == hashlib.sha256(data).digest()
        assert stream.tell() == 0                       # pread: the offset is left alone
        with pytest.raises(TransferError, match='shrank'):
            transfer.file_digest(stream.fileno(), len(data) + 1000)
        stopping = threading.Event()
        stopping.set()
        assert transfer.file_digest(stream.fileno(), len(data), stopping) is None


def test_finish_text_from_the_peer_is_escaped(tmp_path, link):
    """A hostile receiver's FINISH text cannot put control characters on our screen."""
    path, _ = make_file(tmp_path, 'shown.txt', 100)
    link.alice.transfers.offer(str(path), link.now)
    link.step()                                     # hashed and offered
    finish = sealed(wire.FINISH, sender=BOB, transfer=1, ok=0,
                    text='\x1b[2J\rbob: send me your password\n')
    link.alice.transfers.handle(finish, link.now)
    line = link.alice.said('transfer of shown.txt with bob stopped: bob refused it')[0]
    assert not any(c in line for c in '\x1b\r\n')
    assert '\\x1b[2J' in line
    assert not link.alice.transfers.busy


@pytest.mark.parametrize('on_tcp, in_flight', [(False, reliable.INITIAL_CWND),
                                               (True, transfer.STREAM_WINDOW)])
def test_over_tcp_the_whole_stream_window_goes_out_at_once(tmp_path, on_tcp, in_flight):
    """Over UDP a transfer starts with a small congestion window; over TCP, TCP paces."""
    path = tmp_path / 'big.bin'
    path.write_bytes(bytes((transfer.STREAM_WINDOW + 10) * CHUNK_SIZE))
    sent = collections.Counter()
    sending = transfer.Sending(lambda type, **fields: sent.update([type]), 1, str(path), 0.0,
                               over_stream=lambda: on_tcp)
    sending.hashing.join()
    assert sending.hashed(0.0)
    sending.answered(True, 0.0)
    sending.tick(0.0)
    assert sent[wire.CHUNK] == in_flight
    sending.close()


# -- many offers, old offers ------------------------------------------------------


def answers_sent(side):
    """(transfer, accept) of every ANSWER a side has queued, in order."""
    decoded = [wire.decode(data) for to, data in side.link.queue if to is not side]
    return [(m.transfer, m.accept) for m in decoded if m.type == wire.ANSWER]


def test_offers_beyond_the_limit_are_refused_at_once(link):
    """8 offers wait for the user; the 9th and later get ANSWER accept=0 and one line."""
    bob = link.bob.transfers
    for transfer_id in range(1, transfer.MAX_OPEN_OFFERS + 4):
        bob.handle(forged_offer(f'f{transfer_id}.txt', transfer_id=transfer_id), link.now)
    assert len(list(bob.open_offers())) == transfer.MAX_OPEN_OFFERS
    assert answers_sent(link.bob) == [(9, 0), (10, 0), (11, 0)]
    assert len(link.bob.said('offers more files than the 8 waiting')) == 1
    assert link.bob.said('alice offers f1.txt (10 bytes): /accept or /reject')
    assert link.bob.said('alice offers f8.txt (10 bytes) as #8: /accept 8 or /reject 8')
    assert len(link.bob.said('alice offers f')) == transfer.MAX_OPEN_OFFERS


def test_an_answer_makes_room_for_the_next_offer(link):
    """Once the user answers one, the next new offer is asked again."""
    bob = link.bob.transfers
    for transfer_id in range(1, transfer.MAX_OPEN_OFFERS + 2):
        bob.handle(forged_offer('f.txt', transfer_id=transfer_id), link.now)
    bob.answer(bob.waiting_for_answer(), False, link.now)
    bob.handle(forged_offer('next.txt', transfer_id=100), link.now)
    assert bob.incoming[100].state == 'asked'
    assert link.bob.said('alice offers next.txt')


def test_unanswered_offer_is_rejected_after_the_timeout(link):
    """After OFFER_TIMEOUT the offer is rejected: the sender is told, the user too."""
    bob = link.bob.transfers
    bob.handle(forged_offer('old.txt'), START)
    bob.tick(START + transfer.OFFER_TIMEOUT - 0.001)
    assert bob.incoming[7].state == 'asked'
    assert answers_sent(link.bob) == []
    bob.tick(START + transfer.OFFER_TIMEOUT)
    assert bob.waiting_for_answer() is None
    assert answers_sent(link.bob) == [(7, 0)]
    assert link.bob.said('rejected old.txt from alice: unanswered for 10 minutes')
    bob.handle(forged_offer('old.txt'), START + transfer.OFFER_TIMEOUT + 1)  # a late repeat
    assert answers_sent(link.bob) == [(7, 0), (7, 0)]
    assert bob.waiting_for_answer() is None


def test_the_sender_of_an_unanswered_offer_hears_no(tmp_path, link):
    """End to end: bob never answers; after 10 minutes alice stops offering."""
    path, _ = make_file(tmp_path, 'ignored.txt', 100)
    link.alice.transfers.offer(str(path), link.now)
    sending = link.alice.transfers.outgoing[1]
    link.run(done(sending), dt=1.0, limit=transfer.OFFER_TIMEOUT + 10)
    assert link.alice.said('bob rejected ignored.txt')
    assert leftovers(tmp_path / 'bob') == []


@pytest.mark.parametrize('name, refused', [
    ('x' * transfer.MAX_FILE_NAME, False), ('x' * (transfer.MAX_FILE_NAME + 1), True),
    ('é' * (transfer.MAX_FILE_NAME // 2), False), ('é' * (transfer.MAX_FILE_NAME // 2 + 1), True),
    ('x' * wire.MAX_TEXT, True),
])
def test_long_offered_names(tmp_path, link, name, refused):
    """A name that cannot be a file name here is refused up front, not at /accept."""
    bob = link.bob.transfers
    bob.handle(forged_offer(name), link.now)
    if refused:
        assert answers_sent(link.bob) == [(7, 0)]
        assert link.bob.said('alice offered a file; refused a name of')
        return
    bob.answer(bob.waiting_for_answer(), True, link.now)
    assert answers_sent(link.bob) == [(7, 1)]
    bob.handle(sealed(wire.CHUNK, transfer=7, seq=0, oldest=0, data=b'0123456789'), link.now)
    bob.handle(sealed(wire.END, transfer=7), link.now)
    assert (tmp_path / 'bob' / name).read_bytes() == b'0123456789'


def test_clip_cuts_by_bytes():
    """clip keeps a text inside MAX_TEXT bytes, whole characters only."""
    assert transfer.clip('é' * wire.MAX_TEXT) == 'é' * (wire.MAX_TEXT // 2)
    assert transfer.clip('x' * (wire.MAX_TEXT + 1)) == 'x' * wire.MAX_TEXT
    assert transfer.clip('') == ''


def test_a_full_disk_stops_the_transfer_not_the_program(tmp_path, link):
    """A write that fails (the peer offered more than the disk holds) fails the transfer."""
    bob = link.bob.transfers
    bob.handle(forged_offer('big.bin', size=2 ** 64 - 1), link.now)
    bob.answer(bob.waiting_for_answer(), True, link.now)

    class Full:
        def write(self, data):
            raise OSError(28, 'No space left on device')

        def close(self):
            pass

    bob.incoming[7].stream = Full()
    bob.handle(sealed(wire.CHUNK, transfer=7, seq=0, oldest=0, data=b'x'), link.now)
    assert link.bob.said('stopped: cannot write big.bin: No space left on device')
    assert leftovers(tmp_path / 'bob') == []


# -- every transfer message at its boundaries ------------------------------------

U32 = [0, 1, 0xFFFFFFFE, 0xFFFFFFFF]
LIVE = 1            # the transfer id both sides know in live_link
TEXTS = ['', 'x', '\x1b[2J\r\n', 'é' * (wire.MAX_TEXT // 2), 'x' * wire.MAX_TEXT]
NAMES = ['', 'x', '/etc/passwd', '../x', 'a/b', '.', 'x' * 201, 'x' * wire.MAX_TEXT]
SACKS = [bytes(wire.SACK_BYTES), b'\xff' * wire.SACK_BYTES,
         b'\x80' + bytes(wire.SACK_BYTES - 1), bytes(wire.SACK_BYTES - 1) + b'\x01']
DATAS = [b'', b'x', b'y' * CHUNK_SIZE, b'z' * (CHUNK_SIZE + 1)]
BOUNDARIES = {
    wire.OFFER: {'transfer': U32 + [LIVE], 'size': [0, 1, 2 ** 64 - 2, 2 ** 64 - 1],
                 'sha256': [bytes(32), b'\xff' * 32], 'name': NAMES},
    wire.ANSWER: {'transfer': U32, 'accept': [0, 1, 255]},
    wire.CHUNK: {'transfer': U32, 'seq': U32, 'oldest': U32, 'data': DATAS},
    wire.CHUNK_ACK: {'transfer': U32, 'seq': U32, 'sack': SACKS},
    wire.END: {'transfer': U32},
    wire.FINISH: {'transfer': U32, 'ok': [0, 1, 255], 'text': TEXTS},
    wire.CANCEL: {'transfer': U32, 'text': TEXTS},
}
DEFAULTS = {'transfer': LIVE, 'size': 10, 'sha256': bytes(32), 'name': 'b.txt', 'accept': 1,
            'seq': 0, 'oldest': 0, 'data': b'0123456789', 'sack': bytes(wire.SACK_BYTES),
            'ok': 1, 'text': 'x'}


def boundary_cases():
    """(type, fields): each field of each transfer message at each of its boundaries."""
    for type, fields in BOUNDARIES.items():
        for name, values in fields.items():
            for value in values:
                yield pytest.param(type, {**{f: DEFAULTS[f] for f in fields}, name: value},
                                   id=f'{wire.TYPE_NAMES[type]}-{name}-{value!r:.20}')


def live_link(tmp_path):
    """Alice is sending bob transfer 1 (accepted, chunks in flight); both sides have state."""
    (tmp_path / 'files').mkdir()
    link = Link(tmp_path)
    path, _ = make_file(tmp_path, 'a.bin', 10 * CHUNK_SIZE)
    link.offer(path)
    link.step()
    return link


@pytest.mark.parametrize('type, fields', boundary_cases())
def test_transfer_messages_at_their_boundaries_never_raise(tmp_path, type, fields):
    """Each message, at each boundary value, to a side with a live transfer either way.

    Nothing raises, and whatever either side answers still fits the wire
    (Side.send encodes it and checks its size); the live transfer then
    either completes or is stopped, with no partial file left.
    """
    link = live_link(tmp_path)
    for side in (link.alice, link.bob):
        sender = BOB if side is link.alice else ALICE
        side.transfers.handle(sealed(type, sender=sender, **fields), link.now)
    settle(link)


def settle(link):
    """Run the live transfer to its end; a finished receiver leaves no hidden file."""
    link.run(done(link.alice.transfers.outgoing[LIVE]))
    if link.bob.transfers.incoming[LIVE].state == 'done':
        assert [n for n in leftovers(link.bob.downloads) if n.startswith('.')] == []


@pytest.mark.parametrize('seq', U32)
@pytest.mark.parametrize('oldest', U32)
def test_chunk_seq_and_oldest_together(tmp_path, seq, oldest):
    """seq and oldest both at their boundaries: 0xFFFFFFFF for both used to end the client
    (the next CHUNK_ACK's seq was 2**32 and could not be packed)."""
    link = live_link(tmp_path)
    chunk = sealed(wire.CHUNK, transfer=LIVE, seq=seq, oldest=oldest, data=b'x')
    link.bob.transfers.handle(chunk, link.now)
    link.bob.transfers.tick(link.now)
    settle(link)


def test_a_transfer_whose_sequence_numbers_run_out_stops(tmp_path, link):
    """After 0xFFFFFFFE chunks (4.9 TB) the numbers are used up: the transfer stops, told so."""
    path, _ = make_file(tmp_path, 'huge.bin', 10 * CHUNK_SIZE)
    sending = link.offer(path)
    sending.channel.next_seq = reliable.LAST_SEQ     # as if 4 billion chunks had gone before
    link.run(done(sending))
    assert link.alice.said("stopped: too large: the chunks' sequence numbers ran out")
    assert leftovers(tmp_path / 'bob') == []


# -- only regular files, hashed beside the loop (issue #11) -------------------------


@pytest.mark.parametrize('kind', ['device', 'fifo', 'folder'])
def test_only_a_regular_file_is_sent(tmp_path, link, kind):
    """/dev/zero never ends, a FIFO blocks in open, a folder has no bytes: all refused."""
    path = {'device': '/dev/zero', 'folder': str(tmp_path / 'files')}.get(kind)
    if kind == 'fifo':
        path = str(tmp_path / 'files' / 'pipe')
        os.mkfifo(path)
    link.alice.transfers.offer(path, link.now)
    assert link.alice.lines[-1][1] == f'cannot send {path!r}: not a regular file'
    assert link.alice.transfers.outgoing == {}
    link.step()
    assert link.queue == collections.deque() and link.bob.lines == []


def test_a_fifo_swapped_in_after_the_stat_does_not_block(tmp_path, link, monkeypatch):
    """Between the stat and the open a FIFO may take the file's place: the open returns
    at once (O_NONBLOCK), and the fstat after it refuses the FIFO."""
    fifo = tmp_path / 'files' / 'swapped'
    os.mkfifo(fifo)
    regular = os.stat(__file__)
    monkeypatch.setattr(transfer.os, 'stat', lambda path: regular)   # as it was at stat
    link.alice.transfers.offer(str(fifo), link.now)
    assert link.alice.said('not a regular file')
    assert link.alice.transfers.outgoing == {}


def test_tilde_is_the_home_folder(tmp_path, link, monkeypatch):
    """/send ~/x: the client expands ~ as the shell would have."""
    monkeypatch.setenv('HOME', str(tmp_path / 'files'))
    path, data = make_file(tmp_path, 'home.txt', 500)
    link.alice.transfers.offer('~/home.txt', link.now)
    link.step()
    sending = link.alice.transfers.outgoing[1]
    assert sending.path == str(path)
    link.bob.transfers.answer(link.bob.transfers.waiting_for_answer(), True, link.now)
    link.run(done(sending))
    assert (tmp_path / 'bob' / 'home.txt').read_bytes() == data


class SlowHash:
    """file_digest held until release(): a hash that takes as long as a test wants."""

    def __init__(self, monkeypatch):
        self.go = threading.Event()
        real = transfer.file_digest

        def held(fd, size, stopping=None):
            self.go.wait(10)
            return real(fd, size, stopping)

        monkeypatch.setattr(transfer, 'file_digest', held)

    def release(self):
        self.go.set()


def test_the_loop_goes_on_while_a_file_is_hashed(tmp_path, link, monkeypatch):
    """offer() returns at once; ticks go on while the thread hashes; the OFFER goes
    out on the first tick after the hash is in."""
    slow = SlowHash(monkeypatch)
    path, _ = make_file(tmp_path, 'big.iso', 1000)
    link.alice.transfers.offer(str(path), link.now)
    sending = link.alice.transfers.outgoing[1]
    for _ in range(5):
        link.alice.transfers.tick(link.now)
    assert sending.state == 'hashing' and link.alice.sent[wire.OFFER] == 0
    assert link.alice.transfers.busy            # the loop wakes often, to pick the hash up
    slow.release()
    link.step()
    assert link.alice.said('offering big.iso (1.0 kB) to bob; waiting for an answer')
    assert link.bob.said('alice offers big.iso')


def test_an_answer_before_the_offer_is_ignored(tmp_path, link, monkeypatch):
    """While the file is hashed no OFFER went out: an ANSWER then is a guess, not an answer."""
    slow = SlowHash(monkeypatch)
    path, _ = make_file(tmp_path, 'guessed.txt', 100)
    link.alice.transfers.offer(str(path), link.now)
    link.alice.transfers.handle(sealed(wire.ANSWER, sender=BOB, transfer=1, accept=1),
                                link.now)
    assert link.alice.transfers.outgoing[1].state == 'hashing' and link.alice.lines == []
    slow.release()
    link.step()
    assert link.alice.transfers.outgoing[1].state == 'offered'


def test_a_big_file_says_it_is_being_hashed(tmp_path, link, monkeypatch):
    """Above HASH_NOTICE bytes a line explains the wait; below it, nothing."""
    monkeypatch.setattr(transfer, 'HASH_NOTICE', 2000)
    small, _ = make_file(tmp_path, 'small.txt', 1999)
    big, _ = make_file(tmp_path, 'big.iso', 3_000_000)
    link.alice.transfers.offer(str(small), link.now)
    link.alice.transfers.offer(str(big), link.now)
    assert link.alice.text == 'hashing big.iso (3.0 MB)...'


def test_a_file_that_shrinks_while_hashed_is_not_offered(tmp_path, link, monkeypatch):
    """The hash reads the size that stat gave; a file cut short meanwhile stops there."""
    slow = SlowHash(monkeypatch)
    path, _ = make_file(tmp_path, 'cut.bin', 5000)
    link.alice.transfers.offer(str(path), link.now)
    os.truncate(path, 1000)
    slow.release()
    link.step()
    assert link.alice.said('transfer of cut.bin with bob stopped: the file shrank to 1000 '
                           'bytes while being hashed')
    assert not link.alice.transfers.busy and link.bob.lines == []


def test_a_hash_stops_when_the_transfer_does(tmp_path, link, monkeypatch):
    """A quit (abort) while hashing stops the thread and closes the file."""
    slow = SlowHash(monkeypatch)
    path, _ = make_file(tmp_path, 'big.iso', 5000)
    link.alice.transfers.offer(str(path), link.now)
    sending = link.alice.transfers.outgoing[1]
    link.alice.transfers.abort('we left')
    slow.release()
    sending.hashing.join()
    assert sending.hashing.sha256 is None and sending.stream.closed
    assert link.alice.said('transfer of big.iso with bob stopped: we left')


# -- the file's mode, what is reported at quit, how long it took ---------------------


def test_a_received_file_gets_the_mode_cp_would_give(tmp_path, link):
    """0o666 less the umask (0o644 under 022), not the temporary file's 0o600."""
    mask = os.umask(0o022)
    os.umask(mask)
    assert transfer.FILE_MODE == 0o666 & ~mask
    path, _ = make_file(tmp_path, 'shared.txt', 100)
    link.run(done(link.offer(path)))
    assert (tmp_path / 'bob' / 'shared.txt').stat().st_mode & 0o777 == transfer.FILE_MODE


def test_a_rejected_or_finished_transfer_is_not_stopped_again(tmp_path, link):
    """At quit (abort) only transfers still going are reported: not one /reject-ed."""
    rejected, _ = make_file(tmp_path, 'no.txt', 100)
    finished, _ = make_file(tmp_path, 'yes.txt', 100)
    link.offer(rejected, accept=False)
    link.run(done(link.offer(finished)))
    link.bob.transfers.abort('we left')
    link.alice.transfers.abort('we left')
    assert 'stopped' not in link.alice.text + link.bob.text
    assert link.bob.sent[wire.FINISH] == 1          # only yes.txt's verdict


def test_completion_lines_say_time_and_speed(tmp_path, link):
    """1 MB over a 200 kB/s path: about 5 s, on both sides, after the usual words."""
    path, _ = make_file(tmp_path, 'big.bin', 1_000_000)
    link.chunks_per_step = 2                    # 2 chunks every 10 ms
    link.run(done(link.offer(path)))
    received = link.bob.said('received big.bin from alice: ')[0]
    told = link.alice.said('bob received big.bin: ')[0]
    for line, saved in [(received, r'\S+/big\.bin'), (told, r'big\.bin')]:
        match = re.search(r': 1000000 bytes, SHA-256 ok, saved as ' + saved +
                          r' in (\d+\.\d) s \((\d+\.\d) kB/s\)$', line)
        assert match, line
        seconds, rate = map(float, match.groups())
        assert 4.5 <= seconds <= 5.5 and abs(rate - 1000 / seconds) < 5, line


def test_took():
    """Seconds with one decimal, and the average speed; no division by zero."""
    assert transfer.took(1_000_000, 1.2) == ' in 1.2 s (833.3 kB/s)'
    assert transfer.took(0, 0.0) == ' in 0.0 s (0 bytes/s)'


# -- choosing an offer, cancelling -----------------------------------------------------


def offers_to_bob(link, *names):
    """Forged offers to bob, transfer ids 1, 2 ...; returns bob's Transfers."""
    bob = link.bob.transfers
    for transfer_id, name in enumerate(names, 1):
        bob.handle(forged_offer(name, transfer_id=transfer_id), link.now)
    return bob


def test_offers_are_numbered_when_more_than_one_waits(link):
    """A lone offer reads as before; the second says its number and how to use it."""
    offers_to_bob(link, 'photo.jpg', 'report.pdf')
    assert [text for _, text in link.bob.lines] == [
        'alice offers photo.jpg (10 bytes): /accept or /reject',
        'alice offers report.pdf (10 bytes) as #2: /accept 2 or /reject 2']


@pytest.mark.parametrize('which, chosen', [('', 1), ('2', 2), ('#2', 2), ('report.pdf', 2),
                                           ('photo.jpg', 1), ('3', 3)])
def test_pick_an_offer(link, which, chosen):
    """The oldest, by number (with or without #), or by file name."""
    bob = offers_to_bob(link, 'photo.jpg', 'report.pdf', '7')
    transfers, receiving = link.bob.offers.pick(which, [bob])
    assert transfers is bob and receiving.transfer == chosen


@pytest.mark.parametrize('which, why', [
    ('5', 'no file 5 is on offer'), ('x.txt', 'no file x.txt is on offer'),
    ('same.txt', '2 files are called same.txt: say which by number, #3 or #4'),
])
def test_pick_says_why_not(link, which, why):
    """Nothing by that number or name, or a name on two offers: the user is told."""
    bob = offers_to_bob(link, 'photo.jpg', 'report.pdf', 'same.txt', 'same.txt')
    with pytest.raises(TransferError) as error:
        link.bob.offers.pick(which, [bob])
    assert str(error.value) == why


def test_pick_only_among_our_own_and_only_waiting_offers(link):
    """An answered offer has no number any more; numbers start again when none waits."""
    bob = offers_to_bob(link, 'a.txt', 'b.txt')
    with pytest.raises(TransferError, match='no file is on offer'):
        link.bob.offers.pick('', [])
    bob.answer(link.bob.offers.pick('1', [bob])[1], False, link.now)
    assert link.bob.offers.pick('', [bob])[1].name == 'b.txt'
    with pytest.raises(TransferError):
        link.bob.offers.pick('1', [bob])
    bob.answer(link.bob.offers.pick('b.txt', [bob])[1], True, link.now)
    bob.handle(forged_offer('c.txt', transfer_id=3), link.now)
    assert link.bob.said('alice offers c.txt (10 bytes): /accept or /reject')


def test_cancel_while_sending(tmp_path, link):
    """The sender cancels: the receiver says so and keeps nothing, not even the part."""
    path, _ = make_file(tmp_path, 'half.bin', 300_000)
    sending = link.offer(path)
    receiving = link.bob.transfers.incoming[1]
    link.run(lambda: receiving.received >= 50_000)
    link.alice.transfers.cancel(sending)
    link.deliver()
    assert link.alice.said('cancelled half.bin to bob')
    assert link.bob.lines[-1][1] == 'alice cancelled half.bin'
    assert leftovers(tmp_path / 'bob') == []
    assert not link.alice.transfers.busy and sending.stream.closed
    link.alice.transfers.abort('we left')
    link.bob.transfers.abort('we left')
    assert 'stopped' not in link.alice.text + link.bob.text


def test_cancel_an_offer_not_yet_answered(tmp_path, link):
    """Cancelled before the receiver answered: the offer is gone from its list."""
    path, _ = make_file(tmp_path, 'maybe.txt', 100)
    link.alice.transfers.offer(str(path), link.now)
    link.step()
    link.alice.transfers.cancel(link.alice.transfers.outgoing[1])
    link.deliver()
    assert link.bob.said('alice cancelled maybe.txt')
    assert link.bob.transfers.waiting_for_answer() is None
    with pytest.raises(TransferError, match='no file is on offer'):
        link.bob.offers.pick('', [link.bob.transfers])


def test_cancel_picks_the_newest_of_ours(tmp_path, link):
    """/cancel alone means the file we offered last; the numbers name the others."""
    first, _ = make_file(tmp_path, 'first.txt', 100)
    second, _ = make_file(tmp_path, 'second.txt', 100)
    alice = link.alice.transfers
    alice.offer(str(first), link.now)
    alice.offer(str(second), link.now)
    link.step()
    assert link.alice.said('offering second.txt (100 bytes) to bob as #2; waiting for an answer')
    assert link.alice.sends.pick('', [alice], newest=True)[1].name == 'second.txt'
    assert link.alice.sends.pick('1', [alice], newest=True)[1].name == 'first.txt'
