"""File transfer through the command line, as a new user met it (issue #11).

The real server and clients on loopback, driven through stdin like
test_loopback.py (whose fixtures these tests use): /send of things that are
not files, hashing a big file while chat goes on, ~ in a path, the mode of
a received file, what /quit reports, choosing among offers, /cancel, and
the time and speed on the completion lines.
"""

import os

import pytest

import test_loopback
from test_loopback import connect

# test_loopback's fixtures, used here too: a server, registered clients, two folders.
server = test_loopback.server
clients = test_loopback.clients
folders = test_loopback.folders

SPEED = r' in \d+\.\d s \(\d+(?:\.\d)? (?:bytes|kB|MB|GB)/s\)$'


def test_a_device_or_fifo_is_refused_and_the_client_goes_on(clients, folders):
    """/dev/zero never ends and a FIFO blocks in open: both refused with one line."""
    source, _ = folders
    os.mkfifo(source / 'pipe')
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    alice.send('/send /dev/zero')
    alice.expect(r"^\* cannot send '/dev/zero': not a regular file$")
    alice.send(f'/send {source / "pipe"}')
    alice.expect(r"^\* cannot send '.*/pipe': not a regular file$")
    alice.send('still here')
    bob.expect(r'^<alice> still here$')


def test_chat_goes_on_while_a_big_file_is_hashed(clients, folders):
    """A 64 GB sparse file takes most of a minute to hash: meanwhile chat goes both ways,
    before the offer; /quit does not wait for the hash either."""
    source, _ = folders
    with open(source / 'big.iso', 'wb') as stream:
        stream.truncate(64_000_000_000)                # a hole: no disk is used
    alice, bob = clients('alice'), clients('bob')
    connect(alice, bob)
    alice.send(f'/send {source / "big.iso"}')
    alice.expect(r'^\* hashing big\.iso \(64\.0 GB\)\.\.\.$')
    alice.send('while hashing')
    bob.expect(r'^<alice> while hashing$')
    bob.send('and back')
    alice.expect(r'^<bob> and back$')
    assert not [line for line in alice.lines if 'offering' in line], alice.transcript()
    assert not [line for line in bob.lines if 'offers' in line], bob.transcript()
    alice.send('/quit')
    alice.expect(r'^\* transfer of big\.iso with bob stopped: we left$')
    assert alice.wait() == 0


def test_tilde_means_the_home_folder(clients, folders):
    """/send ~/photo.jpg, as a shell would expand it."""
    source, downloads = folders
    (source / 'photo.jpg').write_bytes(b'jpeg' * 1000)
    alice = clients('alice', env={**os.environ, 'HOME': str(source)})
    bob = clients('bob', '--downloads', downloads)
    connect(alice, bob)
    alice.send('/send ~/photo.jpg')
    bob.expect(r'^\* alice offers photo\.jpg \(4\.0 kB\): /accept or /reject$')
    bob.send('/accept')
    bob.expect(r'^\* received photo\.jpg from alice: 4000 bytes, SHA-256 ok')
    assert (downloads / 'photo.jpg').read_bytes() == b'jpeg' * 1000


@pytest.mark.parametrize('umask, mode', [(0o022, 0o644), (0o027, 0o640)])
def test_a_received_file_has_the_mode_cp_would_give(clients, folders, umask, mode):
    """0o666 less the receiver's umask, not the temporary file's 0o600."""
    source, downloads = folders
    (source / 'notes.txt').write_text('shared')
    alice = clients('alice')
    bob = clients('bob', '--downloads', downloads, umask=umask)
    connect(alice, bob)
    alice.send(f'/send {source / "notes.txt"}')
    bob.expect(r'offers notes\.txt')
    bob.send('/accept')
    bob.expect(r'^\* received notes\.txt from alice: ')
    assert (downloads / 'notes.txt').stat().st_mode & 0o777 == mode


def test_choose_among_offers_by_number_or_name(clients, folders):
    """The second offer says its number; /accept 2, /reject NAME, /accept (the oldest)."""
    source, downloads = folders
    for name in ('photo.jpg', 'report.pdf', 'spam.bin'):
        (source / name).write_bytes(name.encode() * 100)
    alice, bob = clients('alice'), clients('bob', '--downloads', downloads)
    connect(alice, bob)
    alice.send(f'/send {source / "photo.jpg"}')
    bob.expect(r'^\* alice offers photo\.jpg \(900 bytes\): /accept or /reject$')
    alice.send(f'/send {source / "report.pdf"}')
    bob.expect(r'^\* alice offers report\.pdf \(1\.0 kB\) as #2: /accept 2 or /reject 2$')
    alice.send(f'/send {source / "spam.bin"}')
    bob.expect(r'^\* alice offers spam\.bin \(800 bytes\) as #3: /accept 3 or /reject 3$')
    bob.send('/accept 2')
    bob.expect(r'^\* received report\.pdf from alice: ')
    bob.send('/reject spam.bin')
    alice.expect(r'^\* bob rejected spam\.bin$')
    bob.send('/accept 3')
    bob.expect(r'^\* no file 3 is on offer$')
    bob.send('/accept')
    bob.expect(r'^\* received photo\.jpg from alice: ')
    assert sorted(os.listdir(downloads)) == ['photo.jpg', 'report.pdf']


def test_reject_a_peer_name_declines_its_request_not_a_file(clients, folders):
    """/reject carol with carol asking to connect declines carol; alice's offer still waits.
    /reject with a file's name rejects the file."""
    source, downloads = folders
    (source / 'photo.jpg').write_bytes(b'x' * 100)
    alice, bob = clients('alice'), clients('bob', '--downloads', downloads)
    carol = clients('carol')
    connect(alice, bob)
    alice.send(f'/send {source / "photo.jpg"}')
    bob.expect(r'offers photo\.jpg')
    carol.send('/connect bob')
    bob.expect(r'^\* carol asks to connect: /connect carol to accept, /reject carol to decline$')
    bob.send('/reject carol')
    bob.expect(r'^\* declined carol$')
    carol.expect(r'^\* bob declined$')
    bob.send('/reject dave')
    bob.expect(r'^\* no file dave is on offer, and dave has not asked to connect$')
    bob.send('/reject photo.jpg')
    alice.expect(r'^\* bob rejected photo\.jpg$')


def test_the_sender_cancels_and_the_receiver_keeps_nothing(clients, folders):
    """/cancel mid-transfer: the receiver hears it, and no part of the file stays."""
    source, downloads = folders
    with open(source / 'big.iso', 'wb') as stream:
        stream.truncate(1_000_000_000)
    # UDP: slower than TCP on loopback, so the cancel comes mid-transfer.
    alice = clients('alice', '--udp-only')
    bob = clients('bob', '--udp-only', '--downloads', downloads)
    connect(alice, bob)
    alice.send('/cancel')
    alice.expect(r'^\* no file is being sent$')
    alice.send(f'/send {source / "big.iso"}')
    bob.expect(r'offers big\.iso', timeout=30)
    bob.send('/accept')
    bob.expect(r'^\* receiving big\.iso from alice: \d+%', timeout=30)
    alice.send('/cancel big.iso')
    alice.expect(r'^\* cancelled big\.iso to bob$')
    bob.expect(r'^\* alice cancelled big\.iso$')
    assert os.listdir(downloads) == []
    alice.send('/quit')
    assert alice.wait() == 0
    assert not [line for line in alice.lines + bob.lines if 'stopped' in line]


def test_completion_lines_say_time_and_speed(clients, folders):
    """Both sides end with how long it took and the average speed."""
    source, downloads = folders
    (source / 'photo.jpg').write_bytes(os.urandom(1_000_000))
    alice, bob = clients('alice'), clients('bob', '--downloads', downloads)
    connect(alice, bob)
    alice.send(f'/send {source / "photo.jpg"}')
    bob.expect(r'offers photo\.jpg')
    bob.send('/accept')
    bob.expect(r'^\* received photo\.jpg from alice: 1000000 bytes, SHA-256 ok, saved as '
               r'\S+/photo\.jpg' + SPEED, timeout=30)
    alice.expect(r'^\* bob received photo\.jpg: 1000000 bytes, SHA-256 ok, saved as '
                 r'photo\.jpg' + SPEED, timeout=30)


def test_help_lists_the_file_commands(clients):
    """/help says how to name an offer and that a file on offer comes before a peer."""
    alice = clients('alice')
    alice.send('/help')
    alice.expect(r'^  /accept \[N\] +accept a file on offer: the oldest, or number N')
    alice.expect(r'^  /reject \[N\] +refuse a file on offer the same way; a file on offer')
    alice.expect(r'^ +comes before a request to connect from a peer NAME$')
    alice.expect(r'^  /cancel \[N\] +stop sending a file: the newest')
