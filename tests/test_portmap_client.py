"""The client asks its router for a port (portmap.PortMapMixIn), across the NAT lab.

Two real p2pclient.py processes and the real rendezvous server, as in
test_nat.py, with Debian's miniupnpd on router A (natlab.Lab(miniupnpd=)).
Both NATs are symmetric: without a mapping, hole punching between them
cannot work (each NAT gives the other peer a fresh random port, and
filters by port), and they relay; with one, bob reaches alice at the
port her router forwards, whatever his own NAT, and they connect
directly.  Needs root.
"""

import re
import signal
import time

import pytest

import natlab
import portmap
from labpeers import LabRun, chat_both_ways, connect, on_tcp

REGISTERED = r'^\* registered as {} with \S+; public endpoint (\S+) \((.*)\)$'


@pytest.fixture(scope='module')
def lab():
    """NAT A and NAT B symmetric; A runs miniupnpd (NAT-PMP and PCP), B none."""
    natlab.require_lab()
    with natlab.Lab(nat_a='symmetric', nat_b='symmetric', miniupnpd='a') as lab:
        yield lab


def registered(proc):
    """(endpoint, how we know it) from a client's registration line."""
    line = next(line for line in proc.lines if line.startswith('* registered as '))
    return re.match(REGISTERED.format(proc.label), line).groups()


def leased_ports(lab, site='a'):
    """The (protocol, external port) pairs miniupnpd's lease file holds."""
    return {tuple(line.split(':')[:2]) for line in lab.leases(site).splitlines()}


def test_a_pcp_mapping_connects_two_symmetric_nats_directly(lab):
    with LabRun(lab) as run:
        alice = run.client('a1', 'alice', '--punch-timeout', '3')
        endpoint, how = registered(alice)
        assert how == 'mapped by the router via PCP', alice.transcript()
        host, port = endpoint.rsplit(':', 1)
        assert host == lab.public_addr('a')
        assert ('UDP', port) in leased_ports(lab)
        assert len(leased_ports(lab)) == 2              # and the control connection's TCP port
        bob = run.client('b1', 'bob', '--punch-timeout', '3')
        assert registered(bob)[1].startswith('symmetric NAT'), bob.transcript()
        (mode_a, _, _), (mode_b, seen_by_bob, _) = connect(alice, bob)
        assert (mode_a, mode_b) == ('direct', 'direct'), (alice.transcript(), bob.transcript())
        assert seen_by_bob == endpoint                  # through the router's mapping
        chat_both_ways(alice, bob)
        alice.send('/quit')
        assert alice.wait() == 0
        assert lab.leases('a') == '', lab.miniupnpd_log('a')[-2000:]


def test_without_the_mapping_the_same_pair_relays(lab):
    with LabRun(lab) as run:
        alice = run.client('a1', 'alice', '--punch-timeout', '1', '--no-portmap')
        assert registered(alice)[1].startswith('symmetric NAT')
        assert lab.leases('a') == ''                    # nobody asked the router
        bob = run.client('b1', 'bob', '--punch-timeout', '1')
        assert connect(alice, bob) == (('relayed', None, None), ('relayed', None, None))


@pytest.mark.parametrize('ending', ['end of input', 'Ctrl-C'])
def test_the_mapping_is_deleted_however_the_client_ends(lab, ending):
    with LabRun(lab) as run:
        alice = run.client('a1', 'alice')
        assert registered(alice)[1] == 'mapped by the router via PCP'
        assert len(leased_ports(lab)) == 2
        if ending == 'end of input':
            alice.close_stdin()
        else:
            alice.popen.send_signal(signal.SIGINT)
        assert alice.wait() == 0
        assert lab.leases('a') == ''


def test_tcp_punching_finds_the_control_connections_mapped_port(lab):
    """UDP and TCP raced (the default): bob's SYN to alice's mapped TCP port reaches her.

    Without the mapping two symmetric NATs give TCP no path either
    (test_nat.py); with it, the TCP connection stands and takes the
    session over from UDP.
    """
    with LabRun(lab) as run:
        alice = run.client('a1', 'alice', transport=None)
        bob = run.client('b1', 'bob', transport=None)
        first_a, first_b = connect(alice, bob)
        on_tcp(alice, 'bob', first_a)
        seen_by_bob = on_tcp(bob, 'alice', first_b)
        assert seen_by_bob.startswith(lab.public_addr('a') + ':')
        assert ('TCP', seen_by_bob.rsplit(':', 1)[1]) in leased_ports(lab)
        chat_both_ways(alice, bob)


def test_a_router_that_answers_nothing_costs_its_timeout_and_no_more(lab):
    """Router B drops NAT-PMP and PCP without a word: start-up waits START_TIMEOUT, once."""
    assert lab.run('rb', ['nft', '-f', '-'], input=natlab.SILENT_PORTMAP_RULESET).returncode == 0
    try:
        with LabRun(lab) as run:
            took = {}
            for option in ('--no-portmap', None):
                started = time.monotonic()
                bob = run.client('b1', 'bob', *([option] if option else []))
                took[option] = time.monotonic() - started
                assert registered(bob)[1].startswith('symmetric NAT')
                bob.send('/quit')
                assert bob.wait() == 0
        dropped = lab.run('rb', ['nft', 'list', 'table', 'inet', 'p2pn_silent']).stdout
        assert re.search(r'counter packets [1-9]', dropped), dropped   # it was asked
    finally:
        lab.run('rb', ['nft', 'delete', 'table', 'inet', 'p2pn_silent'])
    assert took[None] >= portmap.START_TIMEOUT, took
    assert took[None] - took['--no-portmap'] < portmap.START_TIMEOUT + 0.5, took


def test_two_peers_behind_one_cgn_meet_at_their_routers_mappings():
    """Each router's external address is on the CGN's inside, which the other peer reaches.

    Without the routers' mappings this pair relays (test_nat.py: both
    behind one CGN, no hairpin): nobody knows the routers' addresses
    behind the CGN.  With them, each peer offers its mapping there, and
    the other, behind the same public address, punches it.
    """
    natlab.require_lab()
    with natlab.Lab(cgn='both', miniupnpd=('a', 'b')) as lab, LabRun(lab) as run:
        alice = run.client('a1', 'alice', '--punch-timeout', '3')
        bob = run.client('b1', 'bob', '--punch-timeout', '3')
        for peer, site in ((alice, 'a'), (bob, 'b')):
            endpoint, how = registered(peer)
            assert endpoint.startswith(natlab.CGN_WAN + ':')
            assert re.search(rf'; mapped by the router via PCP at {lab.wan_addr(site)}:\d+, '
                             rf'inside another NAT$', how), peer.transcript()
        (mode_a, seen_by_alice, _), (mode_b, seen_by_bob, _) = connect(alice, bob)
        assert (mode_a, mode_b) == ('direct', 'direct'), (alice.transcript(), bob.transcript())
        assert seen_by_alice.startswith(lab.wan_addr('b') + ':')
        assert seen_by_bob.startswith(lab.wan_addr('a') + ':')
        chat_both_ways(alice, bob)
