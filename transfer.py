"""File transfer over the punched path: the article's "transfer files" idea.

    /send report.pdf        (the sender; /cancel stops it)
    /accept  or  /reject    (the receiver, asked first)

The sender hashes the file in a thread beside the event loop (a 3 GB file
takes seconds, and chat must go on meanwhile), then OFFERs its name, size
and SHA-256, repeating the offer until the receiver ANSWERs.  The chunks
then ride chat's reliable layer (reliable.py), with selective
acknowledgements, a timeout from the measured round trip and a congestion
window that backs off on loss.  When
every chunk is acknowledged the sender asks for the verdict (END, repeated)
and the receiver, having checked size and SHA-256, says how it went
(FINISH).  The sender may CANCEL at any point before that.

The receiver writes into a hidden temporary file in its download folder
and gives it its name only once the checks pass: an interrupted or corrupt
transfer leaves nothing under the final name, and no existing file is ever
overwritten.
"""

import hashlib
import os
import stat
import tempfile
import threading
import time

import p2pcommon as wire
from reliable import ReliableChannel

CHUNK_SIZE = 1152           # bytes of file per datagram: with 38 of headers, inside MAX_DATAGRAM
WINDOW = 512                # chunks in flight at most: 576 KiB, 100 Mbit/s at a 45 ms RTT
# Over TCP a lost segment holds back everything behind it for a round trip
# or more, and no CHUNK_ACK comes meanwhile: a window of only 512 would then
# starve TCP at every loss (at 1 %, that is every 12 ms at 100 Mbit/s).
# 4,096 chunks (4.5 MiB) is about what Linux lets a TCP send buffer grow to.
STREAM_WINDOW = 4096
REPEAT = 1.0                # seconds between repeats of an unanswered OFFER or END
PROGRESS_EVERY = 1.0        # seconds between progress lines
# Offers waiting for the user's /accept or /reject.  Each costs a line on
# the screen and a place in memory, and a peer can make them as fast as it
# sends: beyond 8 at once they are refused, and none waits more than 10
# minutes (the sender repeats its OFFER every second until it is answered).
MAX_OPEN_OFFERS = 8
OFFER_TIMEOUT = 600.0
# Files this large are hashed with a line that says so: at 250 MB/s (a
# laptop without SHA instructions) 100 MB is 0.4 s, a wait worth explaining.
HASH_NOTICE = 100_000_000
HASH_PIECE = 1 << 20        # bytes read and hashed at a time
# Linux allows 255 bytes in a file name; the hidden temporary file adds 15
# ('.' NAME '.' 8 random '.part') and a name already taken gets '-1', '-2'...
MAX_FILE_NAME = 200         # bytes of UTF-8
CANCELLED = 'cancelled'     # a CANCEL's text when the sender's user stopped it, not a failure


def read_umask():
    """The process's umask, read once at start-up.

    os.umask can only set the mask, returning the old one: set a strict
    one for that instant, then put the old one back.  (Not thread-safe:
    it runs when this module is imported, before any thread starts.)
    """
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


# A received file gets the mode cp would give it, 0o644 under umask 022,
# not the 0o600 of the temporary file it was written as.
FILE_MODE = 0o666 & ~read_umask()


class TransferError(Exception):
    """A transfer cannot go on; the text says why, for the user."""


def open_regular(path):
    """(stream, size) of path opened for reading; TransferError unless a regular file.

    /dev/zero never ends and a FIFO blocks in open until a writer comes:
    both would hang the client, so anything but a regular file is refused,
    by stat before we open it, and by fstat after, in case a FIFO took its
    place in between (O_NONBLOCK makes even that open return at once).
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise TransferError('not a regular file')
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise TransferError('not a regular file')
    return os.fdopen(fd, 'rb'), info.st_size


def file_digest(fd, size, stopping=None):
    """SHA-256 of the first size bytes of the open file fd, read in pieces.

    os.pread leaves the file's offset alone, so the sender's stream is
    untouched.  Stops early (returning None) once the event stopping is set.
    """
    digest = hashlib.sha256()
    done = 0
    while done < size:
        if stopping is not None and stopping.is_set():
            return None
        piece = os.pread(fd, min(HASH_PIECE, size - done), done)
        if not piece:
            raise TransferError(f'the file shrank to {done} bytes while being hashed')
        digest.update(piece)
        done += len(piece)
    return digest.digest()


class Hashing(threading.Thread):
    """The SHA-256 of a file to send, computed in a thread beside the event loop.

    hashlib and os.pread let go of Python's global lock while they work on
    a large buffer, so the loop keeps serving chat while a 3 GB file is
    hashed (12 s at 250 MB/s).  The loop asks ``result()`` on each tick.
    """

    def __init__(self, fd, size):
        super().__init__(daemon=True)       # a quit does not wait for it
        self.fd = os.dup(fd)                # ours to close, whenever the sender closes its own
        self.size = size
        self.stopping = threading.Event()
        self.sha256 = None
        self.error = None
        self.start()

    def run(self):
        """Hash the file; keep the digest, or the reason it failed."""
        try:
            self.sha256 = file_digest(self.fd, self.size, self.stopping)
        except TransferError as error:
            self.error = str(error)
        except OSError as error:
            self.error = f'cannot read it: {error.strerror}'
        finally:
            os.close(self.fd)

    def result(self):
        """The digest once the thread is done, None before; TransferError if it failed."""
        if self.is_alive():
            return None
        if self.error:
            raise TransferError(self.error)
        return self.sha256

    def stop(self):
        """Ask the thread to stop after the piece it is hashing (1 MiB: a moment)."""
        self.stopping.set()


def check_file_name(name):
    """Raise TransferError unless name is a plain file name, no folders in it."""
    if (not name or name in ('.', '..') or '/' in name or '\\' in name or '\0' in name
            or not name.isprintable()):
        raise TransferError(f'refused the name {name!r}: it must be a plain file name, '
                            f'with no path components')
    size = len(name.encode('utf-8'))
    if size > MAX_FILE_NAME:
        raise TransferError(f'refused a name of {size} bytes: at most {MAX_FILE_NAME} fit '
                            f'in a file name here')


def clip(text):
    """text cut to MAX_TEXT bytes of UTF-8, the most a message's text field holds.

    Cut by bytes, not characters: 1,000 characters of 'é' are 2,000 bytes.
    """
    return text.encode('utf-8')[:wire.MAX_TEXT].decode('utf-8', 'ignore')


class Progress:
    """Percent, rate and time left, printed at most once a second."""

    def __init__(self, size, now):
        self.size = size
        self.started = now
        self.next_line = now + PROGRESS_EVERY

    def line(self, done, now):
        """The progress text when one is due, else None."""
        if now < self.next_line:
            return None
        self.next_line = now + PROGRESS_EVERY
        rate = done / max(now - self.started, 1e-6)
        left = (self.size - done) / rate if rate else float('inf')
        percent = 100 * done // self.size if self.size else 100
        return f'{percent}% at {human(rate)}/s, {left:.0f} s left'


def took(size, seconds):
    """' in 1.2 s (830.0 kB/s)': how long a transfer took, and its average speed."""
    return f' in {seconds:.1f} s ({human(size / max(seconds, 1e-3))}/s)'


def human(count):
    """1234567 -> '1.2 MB'."""
    for unit in ('bytes', 'kB', 'MB', 'GB'):
        text = f'{count:.0f} {unit}' if unit == 'bytes' else f'{count:.1f} {unit}'
        if float(text.split()[0]) < 1000 or unit == 'GB':
            return text
        count /= 1000


class Sending:
    """A file we offer to the peer and then send in chunks."""

    def __init__(self, send, transfer, path, now, over_stream=lambda: False):
        self.send = send            # send(type, **fields) along the session's path
        self.transfer = transfer
        self.path = path
        self.name = os.path.basename(path)
        self.stream, self.size = open_regular(path)
        self.hashing = Hashing(self.stream.fileno(), self.size)
        self.sha256 = None
        self.channel = ReliableChannel(self.transmit, window=WINDOW, congestion=True,
                                       over_stream=over_stream, stream_window=STREAM_WINDOW)
        self.state = 'hashing'      # hashing -> offered -> sending -> ending -> done
        self.next_repeat = now
        self.progress = Progress(self.size, now)
        self.acked = 0

    def hashed(self, now):
        """True once the SHA-256 is in and the OFFER can go; TransferError if it failed."""
        self.sha256 = self.hashing.result()
        if self.sha256 is None:
            return False
        self.state = 'offered'
        self.next_repeat = now
        return True

    def tick(self, now):
        """Repeat what is unanswered, feed the window, resend what is lost.

        Returns a progress text when one is due.
        """
        if self.state in ('offered', 'ending') and now >= self.next_repeat:
            if self.state == 'offered':
                self.send(wire.OFFER, transfer=self.transfer, size=self.size,
                          sha256=self.sha256, name=self.name)
            else:
                self.send(wire.END, transfer=self.transfer)
            self.next_repeat = now + REPEAT
        if self.state != 'sending':
            return None
        window = self.channel.window        # sending does not change it; acknowledgements do
        while not self.channel.waiting and self.channel.unacknowledged < window:
            piece = self.stream.read(min(CHUNK_SIZE, self.size - self.stream.tell()))
            if not piece:
                break
            self.channel.send(piece, now)
        if self.stream.tell() < self.size and self.channel.idle:
            raise TransferError(f'{self.name} shrank while being sent')
        if self.channel.exhausted:      # 4 billion chunks: 4.9 TB
            raise TransferError('too large: the chunks\' sequence numbers ran out')
        if self.channel.retransmit(now):
            raise TransferError('a chunk was not acknowledged after many tries')
        if self.channel.idle and self.stream.tell() == self.size:
            self.state = 'ending'
            self.next_repeat = now
        return self.progress.line(min(self.acked, self.size), now)

    def transmit(self, seq, data):
        """The reliable layer's way out: one CHUNK."""
        self.send(wire.CHUNK, transfer=self.transfer, seq=seq,
                  oldest=self.channel.oldest, data=data)

    def answered(self, accept, now):
        """The receiver's ANSWER: start sending, or stop (returns False)."""
        if self.state != 'offered':
            return True
        if not accept:
            self.close()
            return False
        self.state = 'sending'
        self.progress = Progress(self.size, now)
        return True

    def chunk_acked(self, seq, sack, now):
        """A CHUNK_ACK: chunks below seq, and those the bitmap marks, arrived.

        Progress counts what the channel took as arrived, not what seq
        claims: the channel ignores an ACK for chunks never sent.
        """
        self.channel.acknowledge(seq, now, sack)
        self.acked = self.channel.oldest * CHUNK_SIZE

    def close(self):
        """Done with the file, whatever the outcome."""
        self.state = 'done'
        self.hashing.stop()
        self.stream.close()

    stop = close


class Receiving:
    """A file offered to us: ask the user, then collect, check and save it."""

    def __init__(self, offer, downloads, now):
        check_file_name(offer.name)
        self.transfer = offer.transfer
        self.name = offer.name
        self.size = offer.size
        self.sha256 = offer.sha256
        self.downloads = downloads
        self.state = 'asked'        # asked -> accepted or rejected -> done
        self.asked_at = now         # an offer unanswered for OFFER_TIMEOUT is rejected
        self.channel = ReliableChannel(None, window=WINDOW)
        self.digest = hashlib.sha256()
        self.received = 0
        self.temporary = None
        self.stream = None
        self.progress = Progress(self.size, now)
        self.verdict = None         # (ok, text) once decided
        self.ack_due = False        # chunks arrived since our last CHUNK_ACK
        self.saved_as = None        # the path, once saved

    def accept(self, now):
        """Open a hidden temporary file to write into."""
        os.makedirs(self.downloads, exist_ok=True)
        handle, self.temporary = tempfile.mkstemp(prefix=f'.{self.name}.', suffix='.part',
                                                  dir=self.downloads)
        self.stream = os.fdopen(handle, 'wb')
        self.state = 'accepted'
        self.progress = Progress(self.size, now)

    def chunk(self, seq, oldest, data):
        """Write what arrived in order; return the next sequence number expected.

        None when we are not (or no longer) taking chunks.  The CHUNK_ACK
        waits for ``acknowledgement()`` at the end of the batch of datagrams
        this one came in, so that one CHUNK_ACK answers them all.
        """
        if self.state != 'accepted':
            return None
        self.ack_due = True
        ready, ack = self.channel.receive(seq, data, oldest)
        for piece in ready:
            self.received += len(piece)
            if self.received > self.size:
                raise TransferError(f'more data than the {self.size} bytes offered')
            self.write(piece)
        return ack

    def write(self, piece):
        """Write one piece to the temporary file; a full disk stops the transfer.

        The peer chooses the size (up to 2**64-1 bytes), so the disk may
        well fill up: that ends this transfer, not the program.
        """
        try:
            self.stream.write(piece)
        except OSError as error:
            raise TransferError(f'cannot write {self.name}: {error.strerror}') from None
        self.digest.update(piece)

    def acknowledgement(self):
        """(ack, sack) for a CHUNK_ACK, if chunks came since the last; else None."""
        if not self.ack_due:
            return None
        self.ack_due = False
        return self.channel.expected, self.channel.selective()

    def finish(self):
        """All chunks are in: check size and SHA-256, then give the file its name.

        Returns (ok, text); asked again (a repeated END), the same answer.
        """
        if self.verdict is None:
            self.verdict = self._check_and_save()
        return self.verdict

    def _check_and_save(self):
        stream, self.stream = self.stream, None
        try:
            stream.close()                          # writes what is buffered: may fail too
        except OSError as error:
            self.discard()
            return False, f'cannot write {self.name}: {error.strerror}; deleted'
        if self.received != self.size:
            self.discard()
            return False, f'size mismatch: {self.received} of {self.size} bytes; deleted'
        if self.digest.digest() != self.sha256:
            self.discard()
            return False, 'SHA-256 mismatch; deleted'
        os.chmod(self.temporary, FILE_MODE)        # mkstemp made it 0o600
        while True:
            final = unused_name(self.downloads, self.name)
            try:
                os.link(self.temporary, final)      # fails, unlike rename, if final exists
                break
            except FileExistsError:
                continue                            # someone took the name just now
        os.remove(self.temporary)
        self.temporary = None
        self.state = 'done'
        self.saved_as = final
        # The peer learns the name we chose, not where our folder is.
        return True, f'{self.size} bytes, SHA-256 ok, saved as {os.path.basename(final)}'

    def discard(self):
        """Remove the temporary file: nothing is left under any name."""
        if self.stream:
            self.stream.close()
        if self.temporary and os.path.exists(self.temporary):
            os.remove(self.temporary)
        self.temporary = None
        self.state = 'done'
        self.verdict = self.verdict or (False, 'stopped; nothing was saved')

    stop = discard


def unused_name(folder, name):
    """folder/name, or folder/name-1, -2 ... if that exists: never overwrite."""
    stem, dot, extension = name.rpartition('.')
    if not stem:
        stem, dot, extension = name, '', ''
    candidate = os.path.join(folder, name)
    number = 0
    while os.path.lexists(candidate):     # a dangling link is taken too
        number += 1
        candidate = os.path.join(folder, f'{stem}-{number}{dot}{extension}')
    return candidate


class Numbering:
    """Transfers the user names by number or by file name, whichever peer they are with.

    A client has one Transfers per peer, but '/accept 2' must name one
    offer whatever peer made it: so the numbers live here, one Numbering
    for the offers waiting for an answer (OFFERS) and one for the files we
    send (SENDS), shared by every Transfers in the program.  An entry
    leaves once it is over (``live`` says when), and the numbers start
    again at 1 once none is left: a lone entry is always #1, and its line
    needs no number.
    """

    def __init__(self, live, noun):
        self.live = live            # live(item): still something the user may name
        self.noun = noun            # 'is on offer': for 'no file is on offer'
        self.entries = {}           # number -> (transfers, item), oldest first
        self.last = 0

    def add(self, transfers, item):
        """Give a new item the next number, and return it."""
        if not self.current():
            self.last = 0
        self.last += 1
        self.entries[self.last] = (transfers, item)
        return self.last

    def current(self):
        """{number: (transfers, item)} of the items still live, oldest first."""
        self.entries = {n: entry for n, entry in self.entries.items() if self.live(entry[1])}
        return self.entries

    def pick(self, which, among, newest=False):
        """The (transfers, item) that which names, from the Transfers in among.

        which is '' for the oldest (the newest with newest=True), a number
        ('2' or '#2') or a file name.  Raises TransferError, saying why,
        when it names none or several (the same name twice).
        """
        entries = [(n, t, item) for n, (t, item) in self.current().items() if t in among]
        number = which.removeprefix('#')
        if not which:
            found = entries[-1:] if newest else entries[:1]
        elif number.isascii() and number.isdecimal():
            found = [entry for entry in entries if entry[0] == int(number)]
        else:
            found = [entry for entry in entries if entry[2].name == which]
        if len(found) == 1:
            return found[0][1:]
        if found:
            numbers = ' or '.join(f'#{n}' for n, _, _ in found)
            raise TransferError(f'{len(found)} files are called {wire.safe(which)}: '
                                f'say which by number, {numbers}')
        raise TransferError(f'no file {wire.safe(which) + " " if which else ""}{self.noun}')


OFFERS = Numbering(lambda receiving: receiving.state == 'asked', 'is on offer')
SENDS = Numbering(lambda sending: sending.state != 'done', 'is being sent')


class Transfers:
    """The files going each way between us and one peer.

    ``send(type, **fields)`` sends along the session's path, direct or
    relayed; ``say(text)`` prints a status line; ``over_stream()`` is True
    while that path is a TCP connection, or is being punched (see
    reliable.ReliableChannel).
    """

    MESSAGES = frozenset({wire.OFFER, wire.ANSWER, wire.CHUNK, wire.CHUNK_ACK,
                          wire.END, wire.FINISH, wire.CANCEL})
    TO_RECEIVER = frozenset({wire.OFFER, wire.CHUNK, wire.END, wire.CANCEL})

    def __init__(self, peer, send, say, downloads, over_stream=lambda: False,
                 offers=OFFERS, sends=SENDS):
        self.peer = peer
        self.offers = offers        # the numbers of offers to us, for /accept N
        self.sends = sends          # the numbers of our files going out, for /cancel N
        self.send = send
        self.over_stream = over_stream
        self.say = say
        self.downloads = downloads
        self.outgoing = {}          # transfer id -> Sending
        self.incoming = {}          # transfer id -> Receiving
        self.next_id = 1
        self.refusing = False       # said that offers beyond MAX_OPEN_OFFERS are refused

    # -- the user's commands ------------------------------------------------

    def offer(self, path, now):
        """/send PATH: hash the file beside the loop; tick() offers it once hashed."""
        path = os.path.expanduser(path)     # '~/x': the shell would have done it
        try:
            sending = Sending(self.send, self.next_id, path, now, self.over_stream)
        except OSError as error:
            self.say(f'cannot send {path!r}: {error.strerror}')
            return
        except TransferError as error:
            self.say(f'cannot send {path!r}: {error}')
            return
        self.outgoing[self.next_id] = sending
        self.next_id += 1
        sending.number = self.sends.add(self, sending)
        if sending.size >= HASH_NOTICE:
            self.say(f'hashing {sending.name} ({human(sending.size)})...')

    def offering(self, sending):
        """Say that the OFFER goes out, with its number when another file goes out too."""
        number = f' as #{sending.number}' if sending.number > 1 else ''
        self.say(f'offering {sending.name} ({human(sending.size)}) to {self.peer}{number}; '
                 f'waiting for an answer')

    def cancel(self, sending):
        """/cancel: stop sending a file; the receiver hears so and keeps nothing of it."""
        sending.close()
        self.send(wire.CANCEL, transfer=sending.transfer, text=CANCELLED)
        self.say(f'cancelled {sending.name} to {self.peer}')

    def waiting_for_answer(self):
        """The oldest offer we have not answered yet, or None."""
        return next(self.open_offers(), None)

    def open_offers(self):
        """The offers still waiting for the user's answer, oldest first."""
        return (r for r in self.incoming.values() if r.state == 'asked')

    def answer(self, receiving, accept, now):
        """/accept or /reject the offer."""
        if accept:
            try:
                receiving.accept(now)
            except OSError as error:
                self.say(f'cannot write into {self.downloads}: {error.strerror}; rejected')
                accept = False
        if not accept:
            receiving.state = 'rejected'
        self.send(wire.ANSWER, transfer=receiving.transfer, accept=int(accept))
        self.say(f'{"accepted" if accept else "rejected"} {receiving.name} from {self.peer}')

    # -- messages from the peer ---------------------------------------------

    def handle(self, message, now):
        """Act on one transfer message from the peer."""
        to_receiver = message.type in self.TO_RECEIVER
        try:
            if to_receiver:
                self.to_receiver(message, now)
            else:
                self.to_sender(message, now)
        except TransferError as error:
            self.fail(self.incoming if to_receiver else self.outgoing, message.transfer,
                      str(error))

    def to_receiver(self, message, now):
        """OFFER, CHUNK and END: we are the receiving side."""
        receiving = self.incoming.get(message.transfer)
        if message.type == wire.OFFER:
            if receiving is None:
                self.offered(message, now)
            elif receiving.state != 'asked':     # our ANSWER was lost: again
                self.send(wire.ANSWER, transfer=message.transfer,
                          accept=int(receiving.state != 'rejected'))
        elif receiving is None:
            return
        elif message.type == wire.CANCEL and message.text == CANCELLED:
            self.cancelled(receiving)
        elif message.type == wire.CANCEL:
            self.fail(self.incoming, message.transfer,
                      f'{self.peer} stopped sending: {wire.safe(message.text)}', tell=False)
        elif message.type == wire.CHUNK:
            if receiving.chunk(message.seq, message.oldest, message.data) is not None:
                line = receiving.progress.line(receiving.received, now)
                if line:
                    self.say(f'receiving {receiving.name} from {self.peer}: {line}')
        elif message.type == wire.END and receiving.state in ('accepted', 'done'):
            first = receiving.verdict is None
            ok, text = receiving.finish()
            self.send(wire.FINISH, transfer=message.transfer, ok=int(ok), text=text)
            if first and ok:
                self.say(f'received {receiving.name} from {self.peer}: {receiving.size} bytes, '
                         f'SHA-256 ok, saved as {receiving.saved_as}'
                         f'{took(receiving.size, now - receiving.progress.started)}')
            elif first:
                self.say(f'{receiving.name} from {self.peer} failed: {text}')

    def offered(self, offer, now):
        """A new OFFER: ask the user, unless its name is a trick or too many wait."""
        if sum(1 for _ in self.open_offers()) >= MAX_OPEN_OFFERS:
            self.refuse_beyond_limit(offer)
            return
        self.refusing = False
        try:
            receiving = Receiving(offer, self.downloads, now)
        except TransferError as error:
            self.send(wire.ANSWER, transfer=offer.transfer, accept=0)
            self.say(f'{self.peer} offered a file; {error}')
            return
        self.incoming[offer.transfer] = receiving
        number = self.offers.add(self, receiving)
        how = f' as #{number}: /accept {number} or /reject {number}' if number > 1 else \
            ': /accept or /reject'
        self.say(f'{self.peer} offers {offer.name} ({human(offer.size)}){how}')

    def cancelled(self, receiving):
        """The sender's user cancelled: drop the offer, or what arrived of the file."""
        if receiving.state in ('done', 'rejected'):
            return
        receiving.stop()
        self.say(f'{self.peer} cancelled {receiving.name}')

    def refuse_beyond_limit(self, offer):
        """Refuse an offer while MAX_OPEN_OFFERS wait; say so once, not once per offer."""
        self.send(wire.ANSWER, transfer=offer.transfer, accept=0)
        if not self.refusing:
            self.refusing = True
            self.say(f'{self.peer} offers more files than the {MAX_OPEN_OFFERS} waiting for '
                     f'your answer; refusing the rest until you /accept or /reject')

    def to_sender(self, message, now):
        """ANSWER, CHUNK_ACK and FINISH: we are the sending side."""
        sending = self.outgoing.get(message.transfer)
        if sending is None or sending.state in ('hashing', 'done'):
            return                  # while hashing, no OFFER has gone out to answer
        if message.type == wire.ANSWER:
            if sending.answered(message.accept, now):
                self.say(f'{self.peer} accepted {sending.name}; sending')
            else:
                self.say(f'{self.peer} rejected {sending.name}')
        elif message.type == wire.CHUNK_ACK:
            sending.chunk_acked(message.seq, message.sack, now)
        elif message.type == wire.FINISH and message.ok:
            sending.close()
            self.say(f'{self.peer} received {sending.name}: {wire.safe(message.text)}'
                     f'{took(sending.size, now - sending.progress.started)}')
        elif message.type == wire.FINISH:
            self.fail(self.outgoing, message.transfer,
                      f'{self.peer} refused it: {wire.safe(message.text)}', tell=False)

    # -- time and trouble ---------------------------------------------------

    def tick(self, now):
        """Acknowledge what arrived; drive every outgoing transfer; print progress.

        The client calls this after each batch of datagrams it read, so the
        CHUNK_ACKs go out once per batch: one per datagram when we keep up,
        fewer (and less work for both sides) when a burst has queued up.
        """
        self.expire_offers(now)
        for receiving in self.incoming.values():
            acknowledgement = receiving.acknowledgement()
            if acknowledgement:
                ack, sack = acknowledgement
                self.send(wire.CHUNK_ACK, transfer=receiving.transfer, seq=ack, sack=sack)
        for sending in list(self.outgoing.values()):
            if sending.state == 'done':
                continue
            try:
                if sending.state == 'hashing':
                    if not sending.hashed(now):
                        continue
                    self.offering(sending)
                line = sending.tick(now)
            except TransferError as error:
                self.fail(self.outgoing, sending.transfer, str(error))
                continue
            if line:
                self.say(f'sending {sending.name} to {self.peer}: {line}')

    def expire_offers(self, now):
        """Reject the offers nobody answered in OFFER_TIMEOUT, and tell both sides.

        The sender then stops repeating its OFFER; a late copy of it gets
        the same ANSWER again, as after a /reject.
        """
        for receiving in list(self.open_offers()):
            if now - receiving.asked_at >= OFFER_TIMEOUT:
                receiving.state = 'rejected'
                self.send(wire.ANSWER, transfer=receiving.transfer, accept=0)
                self.say(f'rejected {receiving.name} from {self.peer}: unanswered for '
                         f'{OFFER_TIMEOUT / 60:.0f} minutes')

    def fail(self, table, transfer, why, tell=True):
        """Stop one transfer, leaving no partial file; tell the user, and the peer."""
        item = table.get(transfer)
        if item is None or item.state in ('done', 'rejected'):
            return                  # over already: nothing to stop, nothing to report
        item.stop()
        self.say(f'transfer of {item.name} with {self.peer} stopped: {why}')
        if tell and table is self.outgoing:
            self.send(wire.CANCEL, transfer=transfer, text=clip(why))
        elif tell:
            self.send(wire.FINISH, transfer=transfer, ok=0, text=clip(why))

    def abort(self, why):
        """The peer is gone: stop everything; nothing partial stays behind."""
        for table in (self.outgoing, self.incoming):
            for transfer in list(table):
                self.fail(table, transfer, why)

    @property
    def busy(self):
        """True while a file is on its way out (the loop then wakes more often)."""
        return any(s.state != 'done' for s in self.outgoing.values())


class FilesMixIn:
    """The client's file commands, and a Transfers beside each session's chat.

    ``downloads`` is the folder where received files are saved.
    """

    def __init__(self, *args, downloads='.', **kwargs):
        super().__init__(*args, **kwargs)
        self.downloads = downloads

    def make_session(self, *args):
        """Each session carries files too, on its own numbers."""
        session = super().make_session(*args)
        session.transfers = Transfers(session.name, session.send, self.say, self.downloads,
                                      session.over_stream)
        return session

    def busy(self):
        """A file on its way out needs the loop awake often."""
        return super().busy() or any(s.transfers.busy for s in self.sessions.values())

    def check_session(self, session, now):
        """Offers repeated, chunks resent, progress shown."""
        session.transfers.tick(now)
        super().check_session(session, now)

    def peer_file_message(self, session, message, now):
        """Every file message goes to the session's Transfers."""
        session.transfers.handle(message, now)

    peer_offer = peer_answer = peer_chunk = peer_chunk_ack = peer_file_message
    peer_end = peer_finish = peer_cancel = peer_file_message

    def end_session(self, session, why):
        """The peer is gone: its transfers stop, and nothing partial stays."""
        session.transfers.abort(why)
        super().end_session(session, why)

    def do_quit(self, arg):
        """/quit           say goodbye and exit (so does end of input)"""
        super().do_quit(arg)
        for session in self.sessions.values():
            session.transfers.abort('we left')

    def do_send(self, path):
        """/send PATH      offer a file to the peer you type to"""
        session = self.session_named(self.chosen)
        if session is None:
            self.say('not connected: /connect PEER first')
            return
        session.transfers.offer(path, time.monotonic())

    def do_accept(self, which):
        """/accept [N]     accept a file on offer: the oldest, or number N, or by its file name"""
        self.answer_offer(True, which)

    def do_reject(self, which):
        """/reject [N]     refuse a file on offer the same way; a file on offer called NAME
                        comes before a request to connect from a peer NAME
        """
        self.answer_offer(False, which)

    def answer_offer(self, accept, which):
        """Answer a file offer, the oldest if none is named.

        /reject NAME also says no to a request to connect: a file on offer
        called NAME comes first, then a peer NAME asking to connect.
        """
        try:
            transfers, receiving = OFFERS.pick(which, self.our_transfers())
        except TransferError as error:
            if not accept and which in self.asks:
                super().do_reject(which)
            elif not accept and which:
                self.say(f'{error}, and {wire.safe(which)} has not asked to connect')
            else:
                self.say(str(error))
            return
        transfers.answer(receiving, accept, time.monotonic())

    def do_cancel(self, which):
        """/cancel [N]     stop sending a file: the newest, or number N, or by its file name"""
        try:
            transfers, sending = SENDS.pick(which, self.our_transfers(), newest=True)
        except TransferError as error:
            self.say(str(error))
            return
        transfers.cancel(sending)

    def our_transfers(self):
        """The Transfers of each of our sessions, for the numbers shared by all peers."""
        return [session.transfers for session in self.sessions.values()]
