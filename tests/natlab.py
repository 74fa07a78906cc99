#!/usr/bin/env python3
r"""A NAT lab in network namespaces: real Linux NATs for testing hole punching.

The article (see ARTICLE.md) talks about full-cone, restricted,
port-restricted and symmetric NATs, hairpinning, NAT timers and carrier-grade
NAT. This module builds all of those out of Linux network namespaces, veth
pairs and nftables rules, so that the p2pnat programs can be run against them
and the claims of the article checked. It needs root, ``ip`` (iproute2),
``nft``, ``iptables`` (only for link delay) and ``tc`` (only for a rate
limit); runtime is stdlib only.

Topology (addresses are from the documentation/benchmark ranges only)::

          server 203.0.113.10 + .11         stranger 203.0.113.66
                 2001:db8:10::10 (+::11)    2001:db8:66::66
                        |                       |
                        +---------- inet -------+      the "internet" router
                       /   (198.51.100.254)  \
         198.51.100.1 /                       \ 198.51.100.2   WAN links: delay,
                    ra                         rb              jitter, loss here
           198.18.1.1 | (bridge "lan")          | 198.18.2.1
              +-------+------+           +------+-------+
             a1             a2          b1             b2
        198.18.1.2     198.18.1.3   198.18.2.2     198.18.2.3
        2001:db8:a::2  2001:db8:a::3 2001:db8:b::2 2001:db8:b::3

With ``cgn='a'`` (or ``'both'``) a carrier-grade NAT router ``cgn`` (WAN
198.51.100.3) sits between inet and ra (and rb); ra's WAN then is 198.19.0.2
(rb's 198.19.0.3) on the CGN's inside network 198.19.0.0/24.

Every link between inet and a router is point to point (a veth pair, routed
with /32 host routes), so inet's firewall rules can tell the links apart by
interface name; that is where loss and delay are applied, i.e. "on the
wire", outside of any NAT state.

Things to know:

* NAT types are made with nft (see nat_ruleset() for how and why). Besides the
  four classic types there is 'symmetric-sequential' (ports 20000, 20001, ...)
  for testing port prediction; it is not in NAT_TYPES.
* Hairpinned traffic is filtered endpoint-independently, whatever the type.
* Delay and jitter are applied by tests/nfdelay.py (NFQUEUE) in inet, loss by
  nft numgen in inet. ARP is not delayed, but IPv6 neighbour discovery is
  (it is ICMPv6), so the first IPv6 packets over a delayed link take longer.
* Tests drive sockets in the namespaces through Agent (lab.agent('a1')), a
  small JSON-over-stdin robot, instead of starting a process per probe.
* Namespaces are named p2pn-<pid>x<n>-<node>; Lab.close() removes them (also on
  exceptions, Ctrl-C and SIGTERM); cleanup_stale() removes those of SIGKILLed
  runs, and runs automatically once per process at the first Lab start.

Example::

    from natlab import Lab
    with Lab(nat_a='symmetric', nat_b='full-cone') as lab:
        print(lab.run('a1', ['ip', 'addr']).stdout)
        server = lab.agent('server')          # a socket robot in a namespace
        ...

Run ``python3 tests/natlab.py selftest`` to build every NAT type and print what
the probes measure; ``python3 tests/natlab.py cleanup`` removes namespaces a
killed run left behind.
"""

import argparse
import atexit
import itertools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NFDELAY = os.path.join(HERE, 'nfdelay.py')
LABSTUN = os.path.join(HERE, 'labstun.py')

PREFIX = 'p2pn-'                    # every namespace we create starts with this
NAT_TYPES = ('full-cone', 'restricted', 'port-restricted', 'symmetric')
# Extra type, not in the standard matrix: a symmetric NAT that hands out
# external ports one after the other (20000, 20001, ...), the kind whose next
# port can be *predicted* (article point 6).
ALL_NAT_TYPES = NAT_TYPES + ('symmetric-sequential',)
SEQ_PORT_BASE = 20000
SEQ_PORTS = 1000                    # ... up to 20999, then it wraps around
CGN_MODES = (None, 'a', 'both')
REQUIRE_ENV = 'P2PNAT_REQUIRE_LAB'

SERVER_ADDRS = ('203.0.113.10', '203.0.113.11')
SERVER_ADDRS6 = ('2001:db8:10::10', '2001:db8:10::11')
STRANGER_ADDR = '203.0.113.66'
STRANGER_ADDR6 = '2001:db8:66::66'
INET_ROUTER_ADDR = '198.51.100.254'     # inet's address on every router link
INET_HOST_ADDR = '203.0.113.1'          # inet's address on the server/stranger links
CGN_WAN = '198.51.100.3'
MULTIHOMED_ADDR = '198.18.2.9'          # a1's second interface, on LAN B
CGN_INSIDE = '198.19.0'                 # CGN inside net 198.19.0.0/24, CGN is .1
# The STUN server miniupnpd asks from behind the CGN: the CGN's two inside
# addresses (it gets .4 beside .1 for it).  See Lab._stun_for().
CGN_STUN_ADDRS = (CGN_INSIDE + '.1', CGN_INSIDE + '.4')

# Per site ('a' / 'b'): router name, WAN address (when not behind the CGN),
# WAN address behind the CGN, LAN prefix, host names, IPv6 prefixes.
SITES = {
    'a': dict(router='ra', wan='198.51.100.1', cgn_wan='198.19.0.2', lan='198.18.1',
              hosts=('a1', 'a2'), lan6='2001:db8:a::', link6='2001:db8:ff:a::',
              cgn_wan6='2001:db8:c0::2'),
    'b': dict(router='rb', wan='198.51.100.2', cgn_wan='198.19.0.3', lan='198.18.2',
              hosts=('b1', 'b2'), lan6='2001:db8:b::', link6='2001:db8:ff:b::',
              cgn_wan6='2001:db8:c0::3'),
}
CGN_LINK6 = '2001:db8:ff:c::'
CGN_INSIDE6 = '2001:db8:c0::'

# Mapping lifetime used by the full-cone/restricted maps when no udp_timeout is
# given: Linux's default nf_conntrack_udp_timeout_stream.
DEFAULT_MAP_TIMEOUT = 120
TBF_LATENCY_MS = 50                 # rate_mbit: most queueing delay before tbf drops

# miniupnpd (Debian's miniupnpd-nftables) on a NAT router: the port mapping
# daemon that answers NAT-PMP and PCP on the router's LAN address, port 5351.
MINIUPNPD = '/usr/sbin/miniupnpd'
MINIUPNPD_TABLE = 'p2pn_upnp'       # its nft table (inet), beside p2pn_nat
LAB_STUN_PORT = 34780               # and 34781: the STUN server miniupnpd asks (labstun.py)

_lab_counter = itertools.count(1)
_live_labs = set()                  # for the atexit / SIGTERM safety net
_sigterm_installed = [None]         # previous SIGTERM handler while we own it
_stale_swept = []                   # cleanup_stale() runs once per process


class LabError(RuntimeError):
    """Building or using the lab failed (the message says which command)."""


# ----------------------------------------------------------------------------
# Can we build a lab here at all?

_availability = []


def lab_available():
    """Return (True, '') if namespaces + nft can be used here, else (False, why).

    The answer is cached: the real check creates and deletes a namespace.
    """
    if _availability:
        return _availability[0]
    result = (True, '')
    if not sys.platform.startswith('linux'):
        result = (False, 'not Linux')
    elif os.geteuid() != 0:
        result = (False, 'needs root (network namespaces)')
    else:
        missing = [t for t in ('ip', 'nft') if not shutil.which(t)]
        if missing:
            result = (False, 'missing tools: ' + ', '.join(missing))
        else:
            name = '%s%dxprobe' % (PREFIX, os.getpid())
            r = subprocess.run(['ip', 'netns', 'add', name], capture_output=True, text=True)
            if r.returncode:
                result = (False, 'ip netns add failed: ' + r.stderr.strip())
            else:
                r = subprocess.run(['ip', 'netns', 'exec', name, 'nft', 'list', 'ruleset'],
                                   capture_output=True, text=True)
                subprocess.run(['ip', 'netns', 'del', name], capture_output=True)
                if r.returncode:
                    result = (False, 'nft does not work: ' + r.stderr.strip())
    _availability.append(result)
    return result


def require_lab():
    """Skip the calling pytest test if the lab can't run here.

    If the environment variable P2PNAT_REQUIRE_LAB=1 is set (CI on a machine
    that must run the lab), fail instead of skipping, so a broken environment
    can't silently turn the lab tests into skips.
    """
    import pytest      # only needed under pytest; the lab itself is stdlib only
    ok, why = lab_available()
    if ok:
        return
    if os.environ.get(REQUIRE_ENV) == '1':
        pytest.fail('NAT lab required (%s=1) but unavailable: %s' % (REQUIRE_ENV, why))
    pytest.skip('NAT lab unavailable: ' + why)


# ----------------------------------------------------------------------------
# Processes and namespaces


def _ns_inode(path):
    """(st_dev, st_ino) of a namespace file, or None if it is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in_netns(*names):
    """PIDs of all processes whose network namespace is one of /run/netns/<name>.

    Found by comparing /proc/PID/ns/net with the namespace files (one pass over
    /proc), which costs no extra process (unlike ``ip netns pids``).
    """
    targets = {_ns_inode('/run/netns/' + n) for n in names} - {None}
    if not targets:
        return []
    pids = []
    for entry in os.listdir('/proc'):
        if entry.isdigit() and _ns_inode('/proc/%s/ns/net' % entry) in targets:
            pids.append(int(entry))
    return pids


def _kill_pids(pids):
    """SIGKILL every pid in ``pids`` (ignoring ones already gone)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def delete_namespaces(names):
    """Kill every process inside the namespaces, then delete them (one ``ip``)."""
    names = list(names)
    if not names:
        return
    _kill_pids(pids_in_netns(*names))
    batch = ''.join('netns del %s\n' % n for n in names)
    # -force: keep going past a namespace that is already gone.
    subprocess.run(['ip', '-force', '-batch', '-'], input=batch, text=True,
                   capture_output=True)


def list_lab_namespaces():
    """Names of all existing namespaces created by any lab (prefix ``p2pn-``)."""
    try:
        return sorted(n for n in os.listdir('/run/netns') if n.startswith(PREFIX))
    except FileNotFoundError:
        return []


def cleanup_stale(everything=False):
    """Remove namespaces left behind by a killed lab run; return their names.

    A lab's namespaces are called ``p2pn-<pid>x<n>-<node>``; a namespace is
    stale when process <pid> no longer exists. With ``everything=True``, all
    ``p2pn-`` namespaces are removed, also those of running labs.
    """
    stale = []
    for name in list_lab_namespaces():
        owner = name[len(PREFIX):].split('x', 1)[0]
        alive = False
        if owner.isdigit() and not everything:
            try:
                os.kill(int(owner), 0)
                alive = True
            except ProcessLookupError:
                alive = False
            except PermissionError:
                alive = True
        if not alive:
            stale.append(name)
    delete_namespaces(stale)
    return stale


def _sigterm_handler(signum, frame):
    """Turn SIGTERM into SystemExit so the ``finally`` clauses tear labs down."""
    raise SystemExit(128 + signum)


def _close_all_labs():
    """atexit: tear down labs whose ``with`` never finished (e.g. sys.exit)."""
    for lab in list(_live_labs):
        lab.close()


atexit.register(_close_all_labs)


# ----------------------------------------------------------------------------
# nftables rule sets


def nat_ruleset(nat_type, wan_addr, lan_net, hairpin, map_timeout):
    """nft script (table ``ip p2pn_nat``) that makes a namespace a NAT router.

    The router has interfaces ``wan`` (outside) and ``lan`` (inside bridge).
    ``nat_type`` is one of NAT_TYPES, ``wan_addr`` the WAN IPv4 address,
    ``lan_net`` the inside prefix (for hairpin detection), ``map_timeout`` the
    lifetime in seconds of the mapping records (refreshed by outbound packets).

    How the types are made:

    * Mapping. Plain ``masquerade`` keeps the inside source port whenever the
      resulting connection tuple is unique: that is endpoint-independent
      mapping in practice ("port-restricted" = what Linux does by default).
      ``masquerade fully-random`` picks a fresh random port for every new connection,
      i.e. for every destination: a symmetric NAT. "symmetric-sequential"
      instead takes the next port of a counter (``numgen inc``) for every
      new UDP connection, from any inside host, so the port delta is +1.
      For full-cone and restricted the mapping is made strictly endpoint
      independent with the map ``in2ext`` (inside addr . port -> external
      port): a known inside endpoint is always SNATed to its recorded port,
      and a port recorded for one inside endpoint is never given to another.
    * Filtering. Conntrack itself only lets in replies from exactly the address
      and port that was sent to (address-and-port-dependent filtering). To be
      more open, the chain ``record`` remembers, after NAT, every external port
      and its inside endpoint (map ``ext2in``) and, for "restricted", every
      (external port, remote address) pair that was sent to (set ``perm``).
      New inbound connections that match are DNATed to the inside endpoint.
    * Everything else that arrives new from the WAN is dropped in the input /
      forward filter chains. Dropping matters: it happens before conntrack
      confirms the connection, so an unsolicited packet (e.g. the peer's
      first punch) leaves no conntrack entry that could later clash with,
      and so change, the port of the outbound mapping we are about to create.
    * Hairpin: a LAN host sending to the router's own WAN address and a mapped
      port is DNATed to the inside endpoint and SNATed to the WAN address (to
      its own mapping if it has one), exactly like a packet from outside.
      Hairpinned traffic is filtered endpoint-independently (simplification).
    * TCP, ICMP and other protocols are plain masquerade (random on a
      symmetric NAT), so TCP control connections work behind every NAT type
      and TCP hole punching meets the same mapping behaviour as UDP.
    """
    t = '%ds' % max(1, int(round(map_timeout)))
    cone = not nat_type.startswith('symmetric')
    lines = [
        'table ip p2pn_nat {',
        # ext2in: external UDP port -> inside address . port
        '  map ext2in { type inet_service : ipv4_addr . inet_service; '
        'flags dynamic,timeout; timeout %s; }' % t,
        # in2ext: inside address . port -> external UDP port
        '  map in2ext { type ipv4_addr . inet_service : inet_service; '
        'flags dynamic,timeout; timeout %s; }' % t,
        # perm: external port . remote address that the mapping has sent to
        '  set perm { type inet_service . ipv4_addr; flags dynamic,timeout; timeout %s; }' % t,
        '',
        '  chain dstnat {',
        '    type nat hook prerouting priority dstnat; policy accept;',
    ]
    # Only the first packet of a connection traverses nat chains; replies are
    # handled by conntrack alone. So these rules only see *new* inbound flows.
    if nat_type == 'full-cone':
        lines.append('    iifname "wan" meta l4proto udp udp dport @ext2in '
                     'dnat ip to udp dport map @ext2in')
    elif nat_type == 'restricted':
        lines.append('    iifname "wan" meta l4proto udp udp dport . ip saddr @perm '
                     'dnat ip to udp dport map @ext2in')
    if hairpin:
        lines.append('    iifname "lan" ip daddr %s meta l4proto udp udp dport @ext2in '
                     'dnat ip to udp dport map @ext2in' % wan_addr)
    lines += [
        '  }',
        '',
        '  chain srcnat {',
        '    type nat hook postrouting priority srcnat; policy accept;',
    ]
    if hairpin:
        # Hairpinned packets leave through "lan" again; give them the WAN
        # address as source so that the receiver's reply comes back through
        # us (and sees the sender's public endpoint, as from outside).
        if cone:
            lines.append('    oifname "lan" ip saddr %s.0/24 ct status dnat meta l4proto udp '
                         'ip saddr . udp sport @in2ext '
                         'snat ip to %s : ip saddr . udp sport map @in2ext'
                         % (lan_net, wan_addr))
            lines.append('    oifname "lan" ip saddr %s.0/24 ct status dnat snat ip to %s'
                         % (lan_net, wan_addr))
        else:
            lines.append('    oifname "lan" ip saddr %s.0/24 ct status dnat '
                         'snat ip to %s random' % (lan_net, wan_addr))
    # TCP (for the control connections) is masqueraded as UDP would be:
    # port-preserving, or random ports on a symmetric NAT.
    lines.append('    oifname "wan" meta l4proto != udp masquerade%s'
                 % (' fully-random' if nat_type == 'symmetric' else ''))
    if nat_type == 'port-restricted':
        lines.append('    oifname "wan" masquerade')
    elif nat_type == 'symmetric':
        # fully-random: every new mapping a port drawn at random from
        # 1024-65535.  Recent kernels do the same for plain "random", but
        # older ones take its port from a hash of the addresses and the
        # destination port, so sockets toward one destination get ports in
        # a row from one secret start: guessable, which a symmetric NAT in
        # the field need not be (birthday.py must work without that).
        lines.append('    oifname "wan" masquerade fully-random')
    elif nat_type == 'symmetric-sequential':
        # "numgen inc" counts new connections. Its value can't be used as the
        # port directly (nft 1.0.6 leaves it in host byte order, so the ports
        # would step by 256), hence a lookup table counter -> port.
        table = ', '.join('%d : %d' % (i, SEQ_PORT_BASE + i) for i in range(SEQ_PORTS))
        lines.append('    oifname "wan" meta l4proto udp snat ip to %s : '
                     'numgen inc mod %d map { %s }' % (wan_addr, SEQ_PORTS, table))
    else:
        # Strict endpoint-independent mapping: reuse the recorded port; else
        # keep the inside port if no one else owns it; else pick a random one.
        lines += [
            '    oifname "wan" meta l4proto udp ip saddr . udp sport @in2ext '
            'snat ip to %s : ip saddr . udp sport map @in2ext' % wan_addr,
            '    oifname "wan" udp sport != @ext2in masquerade',
            '    oifname "wan" masquerade random',
        ]
    lines += [
        '  }',
        '',
        # After srcnat (priority 100) the packet carries its external port;
        # ct original/reply tell us the inside endpoint.
        '  chain record {',
        '    type filter hook postrouting priority 200; policy accept;',
        '    oifname "wan" meta l4proto udp ct direction original '
        'update @ext2in { udp sport : ct original ip saddr . ct original proto-src }',
        '    oifname "wan" meta l4proto udp ct direction original '
        'update @in2ext { ct original ip saddr . ct original proto-src : udp sport }',
        # a reply to an inbound (DNATed) flow: the inside endpoint is the reply source
        '    oifname "wan" meta l4proto udp ct direction reply '
        'update @ext2in { udp sport : ct reply ip saddr . ct reply proto-src }',
        '    oifname "wan" meta l4proto udp ct direction reply '
        'update @in2ext { ct reply ip saddr . ct reply proto-src : udp sport }',
    ]
    if nat_type == 'restricted':
        lines.append('    oifname "wan" meta l4proto udp update @perm { udp sport . ip daddr }')
    lines += [
        '  }',
        '',
        '  chain input {',
        '    type filter hook input priority filter; policy accept;',
        '    iifname "wan" ct state new drop',
        '  }',
        '',
        '  chain forward {',
        '    type filter hook forward priority filter; policy accept;',
        '    iifname "wan" ct state new ct status dnat accept',
        '    iifname "wan" ct state new drop',
        '  }',
        '}',
    ]
    return '\n'.join(lines) + '\n'


FIREWALL6_RULESET = '''\
table ip6 p2pn_fw6 {
  # IPv6 has no NAT here, but a home router is still a stateful firewall:
  # replies (and related ICMPv6 errors) come in, unsolicited packets don't.
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }
}
'''


def link_ruleset(links, loss, udp_only=False):
    """nft script for inet: drop ``loss`` (fraction) of packets on each WAN link.

    Both directions of each link in ``links`` (inet's interface names) are
    affected: packets arriving from the link (prerouting) and leaving into it
    (postrouting). numgen gives a uniform random number per packet. With
    ``udp_only`` other protocols (the TCP control connections) are spared.
    """
    permille = int(round(loss * 1000))
    ifs = ', '.join('"%s"' % i for i in links)
    proto = 'meta l4proto udp ' if udp_only else ''
    return (
        'table inet p2pn_link {\n'
        '  chain pre { type filter hook prerouting priority -400; policy accept;\n'
        '    iifname { %s } %snumgen random mod 1000 < %d drop\n  }\n'
        '  chain post { type filter hook postrouting priority -400; policy accept;\n'
        '    oifname { %s } %snumgen random mod 1000 < %d drop\n  }\n'
        '}\n' % (ifs, proto, permille, ifs, proto, permille))


def duplicate_ruleset(links, fraction):
    """nft script for inet: send ``fraction`` of UDP packets twice into each WAN link.

    ``links`` maps inet's interface name to the router at its other end;
    nft's ``dup`` statement sends a copy straight to that next hop.  Every
    packet between two sites leaves inet through a router link, so peer
    traffic is duplicated in both directions.
    """
    permille = int(round(fraction * 1000))
    rules = ''.join('    oifname "%s" meta l4proto udp numgen random mod 1000 < %d '
                    'dup to %s device "%s"\n' % (link, permille, nexthop, link)
                    for link, nexthop in links.items())
    return ('table ip p2pn_dup {\n'
            '  chain post { type filter hook postrouting priority 0; policy accept;\n'
            '%s  }\n}\n' % rules)


def miniupnpd_ruleset(stun_addrs=SERVER_ADDRS):
    """nft script: the table and chains miniupnpd-nftables fills (it makes none itself).

    miniupnpd 2.3.1 adds each mapping as a DNAT rule to the chain
    ``prerouting_miniupnpd`` and an accept rule to ``miniupnpd``, both in the
    inet table named by ``upnp_table_name``; the base chains that jump to
    them are ours to make (Debian ships nft_init.sh for it, which needs a
    file from another package).  Its prerouting chain runs before
    p2pn_nat's (priority dstnat - 10): the first nat chain that translates a
    packet wins, so a mapping beats the lab NAT's own inbound rules.  The
    lab's forward chain already accepts what was DNATed, and ``policy
    accept`` here leaves every other verdict to p2pn_nat.
    """
    t = MINIUPNPD_TABLE
    return (
        'table inet %s {\n'
        '  chain forward { type filter hook forward priority filter - 10; policy accept;\n'
        '    jump miniupnpd\n  }\n'
        '  chain miniupnpd {\n  }\n'
        '  chain prerouting { type nat hook prerouting priority dstnat - 10; policy accept;\n'
        '    jump prerouting_miniupnpd\n  }\n'
        '  chain prerouting_miniupnpd {\n  }\n'
        '  chain postrouting { type nat hook postrouting priority srcnat - 10; policy accept;\n'
        '    jump postrouting_miniupnpd\n  }\n'
        '  chain postrouting_miniupnpd {\n  }\n'
        # miniupnpd's STUN check (labstun.py) wants its own ports unchanged
        # (a symmetric lab NAT would randomise them) and answers from an
        # address and port it did not send to (the lab NAT drops those):
        # its packets, and only those, bypass conntrack, so no NAT rule
        # sees them and none counts as "new".
        '  chain stun_out { type filter hook output priority raw; policy accept;\n'
        '    ip daddr { %s } udp dport { %d, %d } notrack\n  }\n'
        '  chain stun_in { type filter hook prerouting priority raw; policy accept;\n'
        '    ip saddr { %s } udp sport { %d, %d } notrack\n  }\n'
        '}\n' % ((t,) + (', '.join(stun_addrs), LAB_STUN_PORT, LAB_STUN_PORT + 1) * 2))


# nft script for a router that answers neither NAT-PMP nor PCP, nor with an
# ICMP error (as most routers do): the client's ask costs its whole timeout.
SILENT_PORTMAP_RULESET = """\
table inet p2pn_silent {
  chain input { type filter hook input priority filter - 20; policy accept;
    iifname "lan" udp dport 5351 counter drop
  }
}
"""


def miniupnpd_config(lan, lease_file, stun_host=SERVER_ADDRS[0]):
    """miniupnpd.conf for a lab router whose LAN is ``lan`` (e.g. '198.18.1').

    NAT-PMP and PCP only (``enable_natpmp`` turns on both in 2.3.1, which
    rejects the later ``enable_pcp_pmp``), IPv4 only, secure mode (a host
    maps ports to itself only), mappings for the lab LAN's unprivileged
    ports.  The WAN address is an RFC 5737 one, which miniupnpd calls
    reserved and will not map ports on; ``ext_perform_stun`` makes it ask
    the lab's STUN server, which shows that nothing filters in front of the
    router, and so enables port forwarding.
    """
    return '\n'.join([
        'ext_ifname=wan',
        'listening_ip=lan',
        'enable_natpmp=yes',
        'enable_upnp=no',
        'ipv6_disable=yes',
        'secure_mode=yes',
        'ext_perform_stun=yes',
        'ext_stun_host=%s' % stun_host,
        'ext_stun_port=%d' % LAB_STUN_PORT,
        'lease_file=%s' % lease_file,
        'upnp_table_name=%s' % MINIUPNPD_TABLE,
        'upnp_nat_table_name=%s' % MINIUPNPD_TABLE,
        'allow 1024-65535 %s.0/24 1024-65535' % lan,
        'deny 0-65535 0.0.0.0/0 0-65535',
    ]) + '\n'


class Daemon:
    """A lab daemon's stderr, read by a thread: every line, and a wait for one."""

    def __init__(self, proc):
        self.proc = proc
        self.lines = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        """Collect lines until the daemon closes stderr (it exited, or was killed)."""
        with self.proc.stderr:
            for line in self.proc.stderr:
                with self._changed:
                    self.lines.append(line.rstrip('\n'))
                    self._changed.notify_all()
        with self._changed:
            self.lines.append(None)         # end of the log
            self._changed.notify_all()

    def wait_for(self, text, timeout):
        """True once a line containing ``text`` was logged; False on exit or timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                if any(line is not None and text in line for line in self.lines):
                    return True
                left = deadline - time.monotonic()
                if (self.lines and self.lines[-1] is None) or left <= 0:
                    return False
                self._changed.wait(left)

    def log(self):
        """Everything logged so far, one string."""
        with self._changed:
            return '\n'.join(line for line in self.lines if line is not None)


def rate_commands(device, rate_mbit):
    """``tc -batch`` lines: a tbf qdisc that limits ``device``'s egress to rate_mbit.

    The bucket holds 4 ms of traffic (at least 15,000 bytes, ten full
    frames) and the queue up to TBF_LATENCY_MS of it; beyond that tbf drops,
    as a router's full buffer does.
    """
    burst = max(15000, int(rate_mbit * 1e6 / 8 * 0.004))
    return ['qdisc add dev %s root tbf rate %gmbit burst %d latency %dms'
            % (device, rate_mbit, burst, TBF_LATENCY_MS)]


def queue_rules(links, queue=0):
    """iptables-restore input that hands each WAN link's packets to NFQUEUE.

    This kernel lacks the native nft ``queue`` expression (nft_queue), but the
    xtables NFQUEUE target works through iptables-nft. ``--queue-bypass``
    lets packets pass if no delay program is listening.
    """
    rules = ['*mangle']
    for link in links:
        rules.append('-A PREROUTING -i %s -j NFQUEUE --queue-num %d --queue-bypass'
                     % (link, queue))
        rules.append('-A POSTROUTING -o %s -j NFQUEUE --queue-num %d --queue-bypass'
                     % (link, queue))
    rules.append('COMMIT')
    return '\n'.join(rules) + '\n'


# ----------------------------------------------------------------------------
# The lab


class _Node:
    """One namespace: its sysctls, ``ip`` commands and nft script."""

    def __init__(self, name, ns, router=False):
        self.name = name
        self.ns = ns
        self.router = router
        self.sysctl = []        # (path under /proc/sys, value)
        self.ip = []            # lines for ip -batch
        self.nft = ''
        self.iptables = ''      # iptables-restore input (IPv4 and IPv6)
        self.ip6tables = ''
        self.tc = []            # lines for tc -batch

    def script(self):
        """Shell script run inside the namespace to configure it in one go."""
        out = ['set -e']
        for path, value in self.sysctl:
            if '*' in path:     # a glob, e.g. every interface's accept_dad
                out.append('for f in /proc/sys/%s; do echo %s > "$f"; done' % (path, value))
            else:
                out.append('echo %s > /proc/sys/%s' % (value, path))
        # Quoted here-documents: the shell does no expansion inside them.
        # Routes last: a route needs its device up and its gateway reachable.
        ip = ([c for c in self.ip if not c.startswith('route')]
              + [c for c in self.ip if c.startswith('route')])
        out.append("ip -batch - <<'P2PN_EOF'\n%sP2PN_EOF" % ''.join(c + '\n' for c in ip))
        if self.tc:
            out.append("tc -batch - <<'P2PN_EOF'\n%sP2PN_EOF"
                       % ''.join(c + '\n' for c in self.tc))
        if self.nft:
            out.append("nft -f - <<'P2PN_EOF'\n%sP2PN_EOF" % self.nft)
        if self.iptables:
            out.append("iptables-restore --noflush <<'P2PN_EOF'\n%sP2PN_EOF" % self.iptables)
        if self.ip6tables:
            out.append("ip6tables-restore --noflush <<'P2PN_EOF'\n%sP2PN_EOF"
                       % self.ip6tables)
        return '\n'.join(out) + '\n'


class Lab:
    """A complete NAT topology in network namespaces; use as a context manager.

    Arguments (all optional):

    nat_a, nat_b       NAT type of router ra / rb: one of NAT_TYPES (or
                       'symmetric-sequential', see ALL_NAT_TYPES).
    hairpin_a, _b      whether ra / rb hairpin (LAN -> own public addr:port).
    cgn                None, 'a' (ra behind a carrier-grade NAT) or 'both'.
    cgn_type           NAT type of the CGN; cgn_hairpin: whether it hairpins.
    delay_ms           one-way delay added on each WAN link, each direction.
    jitter_ms          +- uniform jitter on top of delay_ms (may reorder).
    loss               fraction (0..1) of packets dropped on each WAN link,
                       each direction.
    loss_udp_only      apply ``loss`` to UDP only, sparing TCP (so the TCP
                       control connections don't stall in retransmissions).
    udp_timeout        seconds; sets nf_conntrack_udp_timeout and
                       nf_conntrack_udp_timeout_stream on every NAT router
                       (and the lifetime of the full-cone/restricted maps).
                       None keeps the kernel defaults (30 s / 120 s).
    tcp_timeout        seconds; sets nf_conntrack_tcp_timeout_established on
                       every NAT router: an established TCP connection idle
                       that long is forgotten, as a home router forgets one,
                       and the outside's next segment is dropped (it is
                       "new" from the WAN).  None keeps the kernel default
                       (5 days).
    ipv6               also give every host an IPv6 address (no NAT; ra and
                       rb are stateful firewalls).
    duplicate          fraction (0..1) of UDP packets sent twice into each
                       WAN link (IPv4).
    multihomed         give a1 a second interface, eth1, on LAN B as well
                       (address MULTIHOMED_ADDR, no default route through it).
    rate_mbit          limit each WAN link to this many Mbit/s, each
                       direction: a tbf qdisc on inet's end of the link
                       (traffic toward the router) and on the router's
                       ``wan`` (traffic toward inet); see rate_commands().
                       Needs ``tc``.  None: no limit.
    miniupnpd          a site ('a', 'b') or several: run miniupnpd (NAT-PMP
                       and PCP) on that site's router, started and stopped
                       with the lab.  Needs miniupnpd-nftables installed;
                       a STUN server (labstun.py) runs on the server host
                       (behind the CGN: on the CGN's inside, see _stun_for).
                       lab.miniupnpd_log(site) shows what it logged,
                       lab.leases(site) its lease file.

    Hosts: server, stranger, a1, a2, b1, b2; routers: inet, ra, rb, cgn.
    """

    SERVER_ADDRS = SERVER_ADDRS
    SERVER_ADDRS6 = SERVER_ADDRS6

    def __init__(self, nat_a='port-restricted', nat_b='port-restricted',
                 hairpin_a=False, hairpin_b=False,
                 cgn=None, cgn_type='port-restricted', cgn_hairpin=False,
                 delay_ms=0, jitter_ms=0, loss=0.0, udp_timeout=None, ipv6=False,
                 loss_udp_only=False, multihomed=False, duplicate=0.0, rate_mbit=None,
                 tcp_timeout=None, miniupnpd=()):
        for t in (nat_a, nat_b, cgn_type):
            if t not in ALL_NAT_TYPES:
                raise ValueError('unknown NAT type %r (want one of %s)' % (t, ALL_NAT_TYPES))
        if cgn not in CGN_MODES:
            raise ValueError('cgn must be one of %s' % (CGN_MODES,))
        if not 0 <= loss <= 1:
            raise ValueError('loss is a fraction between 0 and 1')
        self.nat = {'a': nat_a, 'b': nat_b, 'cgn': cgn_type}
        self.hairpin = {'a': bool(hairpin_a), 'b': bool(hairpin_b), 'cgn': bool(cgn_hairpin)}
        self.cgn = cgn
        self.delay_ms = float(delay_ms)
        self.jitter_ms = float(jitter_ms)
        self.loss = float(loss)
        self.loss_udp_only = bool(loss_udp_only)
        self.udp_timeout = udp_timeout
        if tcp_timeout is not None and not tcp_timeout > 0:
            raise ValueError('tcp_timeout must be positive (or None)')
        self.tcp_timeout = tcp_timeout
        self.ipv6 = bool(ipv6)
        self.multihomed = bool(multihomed)
        self.duplicate = float(duplicate)
        if rate_mbit is not None and not rate_mbit > 0:
            raise ValueError('rate_mbit must be positive (or None)')
        self.rate_mbit = rate_mbit
        self.miniupnpd = (miniupnpd,) if isinstance(miniupnpd, str) else tuple(miniupnpd or ())
        if set(self.miniupnpd) - set(SITES):
            raise ValueError('miniupnpd runs on sites %s only' % ', '.join(SITES))
        self._daemons = {}          # site -> Daemon (miniupnpd)
        self._tmpdirs = []
        # pid + counter: unique among parallel labs; the pid lets
        # cleanup_stale() tell a dead run's namespaces from a live one's.
        self.id = '%dx%d' % (os.getpid(), next(_lab_counter))
        self.nodes = {}
        self._addr = {}
        self._addr6 = {}
        self._procs = []
        self._own_procs = []        # agents, nfdelay: we also close their pipes
        self._agents = {}
        self._created = []
        self._lock = threading.RLock()
        self._closed = False
        self.setup_seconds = None
        self.teardown_seconds = None
        self._plan()

    # -- public API ----------------------------------------------------------

    def ns(self, node):
        """Name of the network namespace of ``node`` (e.g. 'a1', 'ra', 'inet')."""
        try:
            return self.nodes[node].ns
        except KeyError:
            raise KeyError('no node %r in this lab (have %s)'
                           % (node, ', '.join(self.nodes))) from None

    def addr(self, node):
        """IPv4 address of a host (server: its first address; router: its WAN)."""
        return self._addr[node]

    def addr6(self, node):
        """IPv6 address of a host (only with ipv6=True)."""
        if not self.ipv6:
            raise LabError('lab built without ipv6=True')
        return self._addr6[node]

    def public_addr(self, site):
        """Public IPv4 address of site 'a' or 'b' as seen from the internet.

        That is the router's WAN address, or the CGN's if the site is behind
        the CGN. ``public_addr('cgn')`` is the CGN's WAN address.
        """
        if site == 'cgn' or self.behind_cgn(site):
            return CGN_WAN
        return SITES[site]['wan']

    def wan_addr(self, site):
        """WAN address of router ra/rb ('a'/'b'): inside the CGN when behind one."""
        return self._addr[SITES[site]['router']]

    def behind_cgn(self, site):
        """True if site 'a'/'b' sits behind the carrier-grade NAT."""
        return self.cgn == 'both' or (self.cgn == 'a' and site == 'a')

    def popen(self, node, argv, **kwargs):
        """subprocess.Popen of ``argv`` inside ``node``'s namespace.

        ``ip netns exec`` execs the program in place, so the Popen's pid is the
        program itself. The environment is inherited (or pass ``env=``). The
        process is killed at teardown if it is still running.
        """
        if self._closed:
            raise LabError('lab already torn down')
        if isinstance(argv, str):
            argv = ['sh', '-c', argv]
        proc = subprocess.Popen(['ip', 'netns', 'exec', self.ns(node)] + list(argv), **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def run(self, node, argv, timeout=10, **kwargs):
        """subprocess.run of ``argv`` inside ``node``'s namespace.

        Output is captured as text unless stdout/stderr are given; returns the
        CompletedProcess (no exception on a nonzero exit unless check=True).
        """
        if isinstance(argv, str):
            argv = ['sh', '-c', argv]
        if 'stdout' not in kwargs and 'stderr' not in kwargs:
            kwargs.setdefault('capture_output', True)
        kwargs.setdefault('text', True)
        return subprocess.run(['ip', 'netns', 'exec', self.ns(node)] + list(argv),
                              timeout=timeout, **kwargs)

    def agent(self, node):
        """The (cached) socket agent running in ``node``; see class Agent."""
        with self._lock:
            if node not in self._agents:
                self._agents[node] = Agent(self, node)
                self._own_procs.append(self._agents[node].proc)
            return self._agents[node]

    def conntrack(self, node):
        """Text listing of ``node``'s conntrack table (debugging aid).

        Uses the conntrack program if installed, else /proc/net/nf_conntrack.
        """
        if shutil.which('conntrack'):
            return self.run(node, ['conntrack', '-L']).stdout
        return self.run(node, ['cat', '/proc/net/nf_conntrack']).stdout

    def miniupnpd_log(self, site):
        """What miniupnpd on ``site``'s router logged so far (it runs with -d)."""
        return self._daemons[site].log()

    def leases(self, site):
        """miniupnpd's lease file on ``site``: one line per live mapping ('' when none)."""
        try:
            with open(self._lease_file(site)) as f:
                return f.read()
        except FileNotFoundError:
            return ''

    def ruleset(self, node):
        """``nft list ruleset`` of ``node`` (debugging aid: shows the maps' contents)."""
        return self.run(node, ['nft', 'list', 'ruleset']).stdout

    def describe(self):
        """Human readable summary: every node, its namespace and addresses."""
        lines = ['NAT a: %s%s  NAT b: %s%s  cgn: %s%s'
                 % (self.nat['a'], ' +hairpin' if self.hairpin['a'] else '',
                    self.nat['b'], ' +hairpin' if self.hairpin['b'] else '',
                    self.cgn, (' (%s%s)' % (self.nat['cgn'], ' +hairpin'
                                            if self.hairpin['cgn'] else '')) if self.cgn else ''),
                 'WAN links %s: delay %g ms, jitter %g ms, loss %g%s%s; udp timeout %s; '
                 'tcp timeout %s'
                 % (', '.join(self.wan_links), self.delay_ms, self.jitter_ms, self.loss,
                    ' (UDP only)' if self.loss_udp_only else '',
                    ', rate %g Mbit/s' % self.rate_mbit if self.rate_mbit else '',
                    '%ss' % self.udp_timeout if self.udp_timeout else 'default',
                    '%ss' % self.tcp_timeout if self.tcp_timeout else 'default')]
        for name, node in self.nodes.items():
            addrs = [self._addr.get(name, '')]
            if name == 'server':
                addrs = list(SERVER_ADDRS)
            if self.ipv6 and name in self._addr6:
                addrs.append(self._addr6[name])
            lines.append('  %-9s %-24s %s' % (name, node.ns, ' '.join(a for a in addrs if a)))
        return '\n'.join(lines)

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self):
        """Create all namespaces, links, addresses, rules; raise LabError on failure."""
        t0 = time.monotonic()
        if not _stale_swept:
            # Namespaces of runs that were SIGKILLed would pile up otherwise.
            _stale_swept.append(cleanup_stale())
        _live_labs.add(self)
        self._install_sigterm()
        try:
            self._build()
            self._start_miniupnpd()
        except BaseException:
            self.close()
            raise
        self.setup_seconds = time.monotonic() - t0
        return self

    def close(self):
        """Kill our processes and delete every namespace we created (idempotent)."""
        if self._closed:
            return
        self._closed = True
        t0 = time.monotonic()
        try:
            for agent in list(self._agents.values()):
                agent.close(wait=False)
            procs = list(self._procs)
            for p in procs:
                if p.poll() is None:
                    try:
                        p.terminate()
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 1.0
            for p in procs:
                try:
                    p.wait(max(0.01, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    try:
                        p.wait(1)
                    except subprocess.TimeoutExpired:
                        pass
            # Our own helpers' pipes (not the caller's: a reader thread may own them).
            for p in self._own_procs:
                for f in (p.stdin, p.stdout, p.stderr):
                    if f is not None:
                        try:
                            f.close()
                        except OSError:
                            pass
            # Anything still inside (grandchildren...) dies with the namespace.
            delete_namespaces(self._created)
            for path in self._tmpdirs:
                shutil.rmtree(path, ignore_errors=True)
        finally:
            _live_labs.discard(self)
            self._restore_sigterm()
            self.teardown_seconds = time.monotonic() - t0

    def _lease_file(self, site):
        return os.path.join(self._tmpdirs[0], '%s.leases' % SITES[site]['router'])

    def _start_miniupnpd(self):
        """Start the STUN server, then miniupnpd on each router asked for; wait until ready.

        Ready is miniupnpd's "Listening for NAT-PMP/PCP traffic" line; before
        it, its STUN check must have said "Port forwarding is now enabled".
        """
        if not self.miniupnpd:
            return
        if not os.access(MINIUPNPD, os.X_OK):
            raise LabError('%s missing: apt-get install miniupnpd-nftables' % MINIUPNPD)
        self._tmpdirs.append(tempfile.mkdtemp(prefix='p2pn-upnp-'))
        for node, addrs in sorted({self._stun_for(site) for site in self.miniupnpd}):
            self._start_labstun(node, addrs)
        for site in self.miniupnpd:
            router, lan = SITES[site]['router'], SITES[site]['lan']
            stun_addrs = self._stun_for(site)[1]
            r = self.run(router, ['nft', '-f', '-'], input=miniupnpd_ruleset(stun_addrs))
            if r.returncode:
                raise LabError('miniupnpd tables on %s: %s' % (router, r.stderr.strip()))
            conf = os.path.join(self._tmpdirs[0], '%s.conf' % router)
            with open(conf, 'w') as f:
                f.write(miniupnpd_config(lan, self._lease_file(site), stun_addrs[0]))
            # -d: stay in the foreground and log to stderr.  It logs to
            # syslog too, with LOG_CONS: where no syslog daemon listens
            # (/dev/log), glibc would write every line to /dev/console, so
            # that is /dev/null in the mount namespace ip netns exec made.
            proc = self.popen(router, [
                'sh', '-c', 'mount --bind /dev/null /dev/console; exec "$@"', 'miniupnpd',
                MINIUPNPD, '-d', '-f', conf,
                '-P', os.path.join(self._tmpdirs[0], '%s.pid' % router)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True)
            daemon = self._daemons[site] = Daemon(proc)
            if not daemon.wait_for('Listening for NAT-PMP/PCP traffic', 10):
                raise LabError('miniupnpd on %s did not start:\n%s' % (router, daemon.log()))
            if 'Port forwarding is now enabled' not in daemon.log():
                raise LabError('miniupnpd on %s will not map ports:\n%s'
                               % (router, daemon.log()))

    def _stun_for(self, site):
        """(node, its two addresses): where the STUN server that site's miniupnpd asks runs.

        Usually the server host: it sees the router's WAN address, as any
        host on the internet would.  Behind the CGN, the CGN's own inside:
        seen from the internet the router would be the CGN's address, and
        miniupnpd 2.3.1 then refuses to map (its STUN check finds a
        "restrictive NAT"; it has no option to map on a private WAN address,
        and ext_ip= refuses reserved ones).  A router on an ISP's inside
        network still maps for the hosts on that network, which is all a
        peer behind the same CGN needs; so its STUN check asks there, where
        its WAN address is the one everybody sees.
        """
        if self.behind_cgn(site):
            return 'cgn', CGN_STUN_ADDRS
        return 'server', SERVER_ADDRS

    def _start_labstun(self, node, addrs):
        """The STUN server miniupnpd asks at start-up, on ``node``'s two addresses ``addrs``."""
        stun = self.popen(node, [sys.executable, LABSTUN, addrs[0], addrs[1],
                                 str(LAB_STUN_PORT)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        self._own_procs.append(stun)
        ready, _, _ = select.select([stun.stdout], [], [], 5)
        if not ready or stun.stdout.readline().strip() != b'ready':
            stun.kill()
            raise LabError('labstun did not start: %s'
                           % stun.stderr.read().decode(errors='replace').strip())

    def _install_sigterm(self):
        # A plain SIGTERM would kill Python without running finally clauses and
        # leave namespaces behind; while a lab lives, make it raise SystemExit.
        if threading.current_thread() is not threading.main_thread():
            return
        if _sigterm_installed[0] is None and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            _sigterm_installed[0] = signal.SIG_DFL
            signal.signal(signal.SIGTERM, _sigterm_handler)

    def _restore_sigterm(self):
        if (_live_labs or _sigterm_installed[0] is None
                or threading.current_thread() is not threading.main_thread()):
            return
        if signal.getsignal(signal.SIGTERM) is _sigterm_handler:
            signal.signal(signal.SIGTERM, _sigterm_installed[0])
        _sigterm_installed[0] = None

    # -- planning: what goes where -------------------------------------------

    def _node(self, name, router=False):
        node = _Node(name, '%s%s-%s' % (PREFIX, self.id, name), router)
        self.nodes[name] = node
        node.ip.append('link set lo up')
        if self.ipv6:
            # No duplicate address detection: addresses are usable at once.
            # Must be set before the links go up (DAD starts at link up).
            node.sysctl.append(('net/ipv6/conf/*/accept_dad', 0))
            if router:
                node.sysctl.append(('net/ipv6/conf/all/forwarding', 1))
        else:
            # No IPv6 at all: no stray link-local traffic, no accidental v6 path.
            node.sysctl.append(('net/ipv6/conf/all/disable_ipv6', 1))
            node.sysctl.append(('net/ipv6/conf/default/disable_ipv6', 1))
        if router:
            node.sysctl.append(('net/ipv4/ip_forward', 1))
        return node

    def _plan(self):
        """Decide every namespace, veth pair, address, route and rule set."""
        self.links = []         # (node1, if1, node2, if2)
        nodes = self.nodes
        inet = self._node('inet', router=True)
        for name, ifname in (('server', 'server'), ('stranger', 'strngr')):
            self._node(name)
            self.links.append(('inet', ifname, name, 'eth0'))
        # server / stranger: /32 addresses, inet is their gateway.
        srv, strg = nodes['server'], nodes['stranger']
        for a in SERVER_ADDRS:
            srv.ip.append('addr add %s/32 dev eth0' % a)
            inet.ip.append('route add %s/32 dev server' % a)
        strg.ip.append('addr add %s/32 dev eth0' % STRANGER_ADDR)
        inet.ip.append('route add %s/32 dev strngr' % STRANGER_ADDR)
        for n, ifname in ((srv, 'server'), (strg, 'strngr')):
            n.ip += ['link set eth0 up',
                     'route add %s/32 dev eth0' % INET_HOST_ADDR,
                     'route add default via %s dev eth0' % INET_HOST_ADDR]
            inet.ip += ['addr add %s/32 dev %s' % (INET_HOST_ADDR, ifname),
                        'link set %s up' % ifname]
        self._addr.update(server=SERVER_ADDRS[0], stranger=STRANGER_ADDR)
        if self.ipv6:
            for n, ifname, prefix, addrs in (
                    (srv, 'server', '2001:db8:10::', SERVER_ADDRS6),
                    (strg, 'strngr', '2001:db8:66::', (STRANGER_ADDR6,))):
                inet.ip.append('addr add %s1/64 dev %s nodad' % (prefix, ifname))
                for a in addrs:
                    n.ip.append('addr add %s/64 dev eth0 nodad' % a)
                n.ip.append('route add default via %s1 dev eth0' % prefix)
            self._addr6.update(server=SERVER_ADDRS6[0], stranger=STRANGER_ADDR6)

        wan_links = []          # inet's interfaces that are WAN links
        timeout = self.udp_timeout if self.udp_timeout else DEFAULT_MAP_TIMEOUT
        if self.cgn:
            cgn = self._node('cgn', router=True)
            self._nat_sysctls(cgn)
            self.links.append(('inet', 'cgn', 'cgn', 'wan'))
            wan_links.append('cgn')
            self._wire_wan(inet, cgn, 'cgn', CGN_WAN, CGN_LINK6)
            cgn.ip += ['link add lan type bridge forward_delay 0',
                       'addr add %s.1/24 dev lan' % CGN_INSIDE,
                       'link set lan up']
            if any(self.behind_cgn(site) for site in self.miniupnpd):
                cgn.ip.append('addr add %s/24 dev lan' % CGN_STUN_ADDRS[1])
            if self.ipv6:
                cgn.ip.append('addr add %s1/64 dev lan nodad' % CGN_INSIDE6)
            cgn.nft = nat_ruleset(self.nat['cgn'], CGN_WAN, CGN_INSIDE, self.hairpin['cgn'],
                                  timeout)
            self._addr['cgn'] = CGN_WAN

        for site, s in SITES.items():
            r = self._node(s['router'], router=True)
            self._nat_sysctls(r)
            if self.behind_cgn(site):
                # The router's WAN is a port of the CGN's inside bridge.
                cgn = nodes['cgn']
                self.links.append(('cgn', s['router'], s['router'], 'wan'))
                cgn.ip += ['link set %s master lan' % s['router'],
                           'link set %s up' % s['router']]
                wan = s['cgn_wan']
                r.ip += ['addr add %s/24 dev wan' % wan, 'link set wan up',
                         'route add default via %s.1 dev wan' % CGN_INSIDE]
                if self.ipv6:
                    r.ip += ['addr add %s/64 dev wan nodad' % s['cgn_wan6'],
                             'route add default via %s1 dev wan' % CGN_INSIDE6]
                    cgn.ip.append('route add %s/64 via %s dev lan' % (s['lan6'], s['cgn_wan6']))
                    inet.ip.append('route add %s/64 via %s2 dev cgn' % (s['lan6'], CGN_LINK6))
            else:
                self.links.append(('inet', s['router'], s['router'], 'wan'))
                wan_links.append(s['router'])
                wan = s['wan']
                self._wire_wan(inet, r, s['router'], wan, s['link6'])
                if self.ipv6:
                    inet.ip.append('route add %s/64 via %s2 dev %s'
                                   % (s['lan6'], s['link6'], s['router']))
            self._addr[s['router']] = wan
            r.ip += ['link add lan type bridge forward_delay 0',
                     'addr add %s.1/24 dev lan' % s['lan'], 'link set lan up']
            if self.ipv6:
                r.ip.append('addr add %s1/64 dev lan nodad' % s['lan6'])
            r.nft = nat_ruleset(self.nat[site], wan, s['lan'], self.hairpin[site], timeout)
            if self.ipv6:
                r.nft += FIREWALL6_RULESET
            for i, host in enumerate(s['hosts']):
                h = self._node(host)
                self.links.append((s['router'], host, host, 'eth0'))
                r.ip += ['link set %s master lan' % host, 'link set %s up' % host]
                a = '%s.%d' % (s['lan'], i + 2)
                h.ip += ['addr add %s/24 dev eth0' % a, 'link set eth0 up',
                         'route add default via %s.1 dev eth0' % s['lan']]
                self._addr[host] = a
                if self.ipv6:
                    a6 = '%s%d' % (s['lan6'], i + 2)
                    h.ip += ['addr add %s/64 dev eth0 nodad' % a6,
                             'route add default via %s1 dev eth0' % s['lan6']]
                    self._addr6[host] = a6

        if self.multihomed:
            # a1 also sits on LAN B, as a laptop on two networks does.
            self.links.append(('rb', 'a1x', 'a1', 'eth1'))
            self.nodes['rb'].ip += ['link set a1x master lan', 'link set a1x up']
            self.nodes['a1'].ip += ['addr add %s/24 dev eth1' % MULTIHOMED_ADDR,
                                    'link set eth1 up']

        # Link impairments live in inet, on the wire side of every NAT.
        self.wan_links = wan_links
        if self.loss > 0:
            inet.nft += link_ruleset(wan_links, self.loss, self.loss_udp_only)
        if self.duplicate > 0:
            inet.nft += duplicate_ruleset({link: self._addr[link] for link in wan_links},
                                          self.duplicate)
        if self.rate_mbit:
            for link in wan_links:      # inet's interface is named after the router
                inet.tc += rate_commands(link, self.rate_mbit)
                nodes[link].tc += rate_commands('wan', self.rate_mbit)
        if self.delay_ms > 0 or self.jitter_ms > 0:
            inet.iptables = queue_rules(wan_links)
            if self.ipv6:
                inet.ip6tables = inet.iptables

    def _nat_sysctls(self, node):
        """Conntrack UDP and TCP timeouts of a NAT router (per namespace sysctls)."""
        if self.udp_timeout is not None:
            t = max(1, int(round(self.udp_timeout)))
            node.sysctl += [('net/netfilter/nf_conntrack_udp_timeout', t),
                            ('net/netfilter/nf_conntrack_udp_timeout_stream', t)]
        if self.tcp_timeout is not None:
            t = max(1, int(round(self.tcp_timeout)))
            node.sysctl.append(('net/netfilter/nf_conntrack_tcp_timeout_established', t))

    def _wire_wan(self, inet, router, ifname, wan, link6):
        """Point-to-point link between inet (interface ``ifname``) and a router."""
        inet.ip += ['addr add %s/32 dev %s' % (INET_ROUTER_ADDR, ifname),
                    'link set %s up' % ifname,
                    'route add %s/32 dev %s' % (wan, ifname)]
        router.ip += ['addr add %s/32 dev wan' % wan, 'link set wan up',
                      'route add %s/32 dev wan' % INET_ROUTER_ADDR,
                      'route add default via %s dev wan' % INET_ROUTER_ADDR]
        if self.ipv6:
            inet.ip.append('addr add %s1/64 dev %s nodad' % (link6, ifname))
            router.ip += ['addr add %s2/64 dev wan nodad' % link6,
                          'route add default via %s1 dev wan' % link6]

    # -- building ------------------------------------------------------------

    def _build(self):
        # 1. All namespaces and veth pairs with one ip process. Each veth end
        #    is created directly inside its namespace, so the host's own
        #    namespace never sees (or could leak) an interface.
        batch = []
        for node in self.nodes.values():
            batch.append('netns add %s' % node.ns)
            self._created.append(node.ns)
        for n1, if1, n2, if2 in self.links:
            batch.append('link add %s netns %s type veth peer name %s netns %s'
                         % (if1, self.nodes[n1].ns, if2, self.nodes[n2].ns))
        r = subprocess.run(['ip', '-batch', '-'], input='\n'.join(batch) + '\n', text=True,
                           capture_output=True)
        if r.returncode:
            raise LabError('creating namespaces/links failed: ' + r.stderr.strip())
        # 2. Start the delay program early (it runs while we configure).
        delay = None
        if self.delay_ms > 0 or self.jitter_ms > 0:
            delay = self.popen('inet', [sys.executable, NFDELAY, '--queue', '0',
                                        '--delay', str(self.delay_ms),
                                        '--jitter', str(self.jitter_ms)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
            self._own_procs.append(delay)
        # 3. Configure every namespace in parallel: one shell each, which runs
        #    the sysctls, one "ip -batch" and one "nft -f".
        procs = []
        for node in self.nodes.values():
            procs.append((node, subprocess.Popen(
                ['ip', 'netns', 'exec', node.ns, 'sh', '-c', node.script()],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        errors = []
        for node, p in procs:
            out, err = p.communicate()
            if p.returncode:
                errors.append('%s: %s' % (node.name, (err or out).strip()))
        if errors:
            raise LabError('configuring namespaces failed:\n' + '\n'.join(errors))
        if delay is not None:
            ready, _, _ = select.select([delay.stdout], [], [], 5)
            line = delay.stdout.readline() if ready else b''
            if line.strip() != b'ready':
                delay.kill()
                raise LabError('nfdelay did not start: %s'
                               % delay.stderr.read().decode(errors='replace').strip())


# ----------------------------------------------------------------------------
# The agent: a socket robot running inside a namespace


class Agent:
    """Remote control for UDP sockets inside one node's namespace.

    Tests need many small socket actions on several hosts (bind, send,
    receive with a timeout, echo...). Starting a Python process for each would
    cost ~30 ms; instead each node gets one long-lived agent process
    (``natlab.py agent``) that takes JSON commands on stdin and answers one
    JSON line each. Sockets are referred to by small integer ids.

    Addresses are (host, port) pairs; the address family follows the host
    string (':' in it means IPv6).
    """

    def __init__(self, lab, node):
        self.node = node
        self.proc = lab.popen(node, [sys.executable, '-u', os.path.abspath(__file__), 'agent'],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def call(self, reply_timeout=30, **request):
        """Send one request, return the decoded reply; raise LabError on error."""
        self.proc.stdin.write(json.dumps(request) + '\n')
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], reply_timeout)
        line = self.proc.stdout.readline() if ready else ''
        if not line:
            raise LabError('agent on %s: no reply to %r' % (self.node, request))
        reply = json.loads(line)
        if 'error' in reply:
            raise LabError('agent on %s: %s' % (self.node, reply['error']))
        return reply

    def bind(self, port=0, addr=None, v6=False):
        """Open a UDP socket bound to addr:port; return (id, bound port)."""
        r = self.call(op='bind', port=port, addr=addr, v6=v6)
        return r['id'], r['port']

    def send(self, sock, to, data='x'):
        """Send one datagram ``data`` (str) from socket ``sock`` to (host, port)."""
        self.call(op='send', id=sock, to=list(to), data=data)

    def recv(self, sock, timeout=1.0):
        """Wait up to ``timeout`` s for a datagram: (data, (host, port)) or None."""
        r = self.call(op='recv', id=sock, wait=timeout, reply_timeout=timeout + 10)
        if r.get('data') is None:
            return None
        return r['data'], tuple(r['from'])

    def recv_all(self, sock, wait=0.5):
        """Every datagram that arrives within ``wait`` s: list of (data, (host, port))."""
        r = self.call(op='recv_all', id=sock, wait=wait, reply_timeout=wait + 10)
        return [(d, tuple(f)) for d, f in r['got']]

    def echo(self, sock):
        """Start echoing every datagram on ``sock`` back to its sender (background)."""
        self.call(op='echo', id=sock)

    def count(self, sock, idle=0.5, max_wait=30):
        """Count datagrams on ``sock`` until none arrived for ``idle`` s."""
        return self.call(op='count', id=sock, idle=idle, max_wait=max_wait,
                         reply_timeout=max_wait + 10)['count']

    def burst(self, sock, to, count, interval=0.0):
        """Send ``count`` numbered datagrams to ``to``, ``interval`` s apart."""
        self.call(op='burst', id=sock, to=list(to), count=count, interval=interval,
                  reply_timeout=count * interval + 30)

    def rtt(self, sock, to, count=5, interval=0.05, timeout=2.0):
        """Round-trip times in ms to an echoing peer; None for a lost probe."""
        return self.call(op='rtt', id=sock, to=list(to), count=count, interval=interval,
                         wait=timeout, reply_timeout=count * interval + timeout + 10)['rtts']

    def tcp_listen(self, addr, port):
        """Start a TCP service on addr:port that tells each client its source."""
        return self.call(op='tcp_listen', addr=addr, port=port)['id']

    def tcp_connect(self, to, timeout=5.0):
        """Connect to a tcp_listen service; return the (host, port) it saw."""
        line = self.call(op='tcp_connect', to=list(to), wait=timeout,
                         reply_timeout=timeout + 10)['line']
        host, port = line.split()
        return host, int(port)

    def close_socket(self, sock):
        """Close one socket of this agent."""
        self.call(op='close', id=sock)

    def close(self, wait=True):
        """Stop the agent process."""
        try:
            self.proc.stdin.close()
        except (OSError, ValueError):
            pass
        if wait:
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _agent_main():
    """The agent process: executes JSON requests from stdin (see Agent)."""
    socks = {}
    ids = itertools.count(1)
    out_lock = threading.Lock()

    def family(host):
        return socket.AF_INET6 if ':' in host else socket.AF_INET

    def echo_loop(s):
        while True:
            try:
                data, src = s.recvfrom(65535)
                s.sendto(data, src)
            except OSError:
                return

    def tcp_loop(ls):
        while True:
            try:
                c, src = ls.accept()
            except OSError:
                return
            with c:
                c.sendall(('%s %d\n' % src[:2]).encode())

    def handle(req):
        op = req['op']
        if op == 'bind':
            fam = socket.AF_INET6 if req.get('v6') else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((req.get('addr') or ('::' if req.get('v6') else '0.0.0.0'), req['port']))
            n = next(ids)
            socks[n] = s
            return {'id': n, 'port': s.getsockname()[1]}
        s = socks[req['id']] if 'id' in req else None
        if op == 'send':
            s.sendto(req['data'].encode(), tuple(req['to']))
            return {}
        if op == 'recv':
            s.settimeout(req['wait'])
            try:
                data, src = s.recvfrom(65535)
            except socket.timeout:
                return {'data': None}
            return {'data': data.decode(errors='replace'), 'from': list(src[:2])}
        if op == 'recv_all':
            got = []
            deadline = time.monotonic() + req['wait']
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                s.settimeout(left)
                try:
                    data, src = s.recvfrom(65535)
                except socket.timeout:
                    break
                got.append([data.decode(errors='replace'), list(src[:2])])
            return {'got': got}
        if op == 'echo':
            threading.Thread(target=echo_loop, args=(s,), daemon=True).start()
            return {}
        if op == 'count':
            n = 0
            deadline = time.monotonic() + req['max_wait']
            s.settimeout(req['idle'])
            while time.monotonic() < deadline:
                try:
                    s.recvfrom(65535)
                except socket.timeout:
                    break
                n += 1
            return {'count': n}
        if op == 'burst':
            for i in range(req['count']):
                s.sendto(b'%d' % i, tuple(req['to']))
                if req['interval']:
                    time.sleep(req['interval'])
            return {}
        if op == 'rtt':
            to = tuple(req['to'])
            sent = {}
            rtts = [None] * req['count']
            s.setblocking(False)
            next_send = time.monotonic()
            i = 0
            deadline = None
            while True:
                now = time.monotonic()
                if i < req['count'] and now >= next_send:
                    sent[i] = now
                    s.sendto(b'rtt %d' % i, to)
                    i += 1
                    next_send = now + req['interval']
                    if i == req['count']:
                        deadline = now + req['wait']
                if deadline is not None and (now >= deadline or None not in rtts):
                    break
                wait = (next_send if i < req['count'] else deadline) - now
                ready, _, _ = select.select([s], [], [], max(0.0, wait))
                if ready:
                    try:
                        data, _src = s.recvfrom(65535)
                    except BlockingIOError:
                        continue
                    parts = data.split()
                    if len(parts) == 2 and parts[0] == b'rtt' and parts[1].isdigit():
                        k = int(parts[1])
                        if k in sent and rtts[k] is None:
                            rtts[k] = (time.monotonic() - sent[k]) * 1000.0
            s.setblocking(True)
            return {'rtts': rtts}
        if op == 'tcp_listen':
            # A tiny TCP "what is my address" service: tells each client the
            # source address:port it connected from, then hangs up.
            fam = socket.AF_INET6 if ':' in req['addr'] else socket.AF_INET
            ls = socket.socket(fam, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind((req['addr'], req['port']))
            ls.listen(16)
            n = next(ids)
            socks[n] = ls
            threading.Thread(target=tcp_loop, args=(ls,), daemon=True).start()
            return {'id': n}
        if op == 'tcp_connect':
            to = tuple(req['to'])
            with socket.create_connection(to, timeout=req['wait']) as c:
                line = c.makefile().readline()
            return {'line': line.strip()}
        if op == 'close':
            socks.pop(req['id']).close()
            return {}
        raise ValueError('unknown op %r' % op)

    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = handle(json.loads(line))
        except Exception as e:      # report, don't die: the test shows the message
            reply = {'error': '%s: %s' % (type(e).__name__, e)}
        with out_lock:
            sys.stdout.write(json.dumps(reply) + '\n')
            sys.stdout.flush()


# ----------------------------------------------------------------------------
# Probes: measure what a NAT does, from the outside


def probe_nat(lab, host='a1', port=40000, server_port=3478, wait=0.4):
    """Classify the NAT in front of ``host`` the way the article's point 6 does.

    One UDP socket on ``host`` (bound to ``port``) sends to both server
    addresses; the server reports the source address:port it saw each time.
    Then packets are sent to that mapping from (a) the first server address but
    another port, (b) the stranger. Returns a dict with the ports seen, the
    public address, whether (a) and (b) got in, and the resulting
    classification ('full-cone', 'restricted', 'port-restricted',
    'symmetric', or 'blocked' if nothing got through).
    """
    srv, strg, h = lab.agent('server'), lab.agent('stranger'), lab.agent(host)
    s1, _ = srv.bind(server_port, SERVER_ADDRS[0])
    s2, _ = srv.bind(server_port, SERVER_ADDRS[1])
    s3, _ = srv.bind(server_port + 1, SERVER_ADDRS[0])
    x, _ = strg.bind(server_port)
    a, _ = h.bind(port)
    try:
        h.send(a, (SERVER_ADDRS[0], server_port), 'to-1')
        r1 = srv.recv(s1, 2)
        h.send(a, (SERVER_ADDRS[1], server_port), 'to-2')
        r2 = srv.recv(s2, 2)
        if r1 is None or r2 is None:
            return {'type': 'blocked', 'seen': (r1 and r1[1], r2 and r2[1])}
        m1, m2 = r1[1], r2[1]
        # the reply from exactly where we sent to must always work
        srv.send(s1, m1, 'reply')
        reply = h.recv(a, 2)
        srv.send(s3, m1, 'other-port')
        strg.send(x, m1, 'stranger')
        got = {d for d, _src in h.recv_all(a, wait)}
        result = {
            'public': m1[0], 'port1': m1[1], 'port2': m2[1],
            'same_mapping': m1 == m2,
            'delta': m2[1] - m1[1],         # port step between two destinations
            'reply_ok': reply is not None and reply[0] == 'reply',
            'same_addr_other_port': 'other-port' in got,
            'other_addr': 'stranger' in got,
        }
        if not result['same_mapping']:
            result['type'] = 'symmetric'
        elif result['other_addr'] and result['same_addr_other_port']:
            result['type'] = 'full-cone'
        elif result['same_addr_other_port']:
            result['type'] = 'restricted'
        else:
            result['type'] = 'port-restricted'
        return result
    finally:
        for agent, sock in ((srv, s1), (srv, s2), (srv, s3), (strg, x), (h, a)):
            agent.call(op='close', id=sock)


# ----------------------------------------------------------------------------
# Command line


def add_lab_arguments(parser):
    """Add the Lab() options to an argparse parser (for reuse by subcommands)."""
    parser.add_argument('--nat-a', default='port-restricted', choices=ALL_NAT_TYPES)
    parser.add_argument('--nat-b', default='port-restricted', choices=ALL_NAT_TYPES)
    parser.add_argument('--hairpin-a', action='store_true')
    parser.add_argument('--hairpin-b', action='store_true')
    parser.add_argument('--cgn', choices=('a', 'both'), default=None)
    parser.add_argument('--cgn-type', default='port-restricted', choices=ALL_NAT_TYPES)
    parser.add_argument('--cgn-hairpin', action='store_true')
    parser.add_argument('--delay-ms', type=float, default=0)
    parser.add_argument('--jitter-ms', type=float, default=0)
    parser.add_argument('--loss', type=float, default=0.0)
    parser.add_argument('--loss-udp-only', action='store_true')
    parser.add_argument('--udp-timeout', type=float, default=None)
    parser.add_argument('--tcp-timeout', type=float, default=None)
    parser.add_argument('--ipv6', action='store_true')
    parser.add_argument('--rate-mbit', type=float, default=None)
    parser.add_argument('--miniupnpd', action='append', choices=tuple(SITES), default=[],
                        help="run miniupnpd (NAT-PMP, PCP) on this site's router")


def lab_from_args(args):
    """Build (not start) a Lab from options added by add_lab_arguments()."""
    return Lab(nat_a=args.nat_a, nat_b=args.nat_b, hairpin_a=args.hairpin_a,
               hairpin_b=args.hairpin_b, cgn=args.cgn, cgn_type=args.cgn_type,
               cgn_hairpin=args.cgn_hairpin, delay_ms=args.delay_ms,
               jitter_ms=args.jitter_ms, loss=args.loss, udp_timeout=args.udp_timeout,
               tcp_timeout=args.tcp_timeout, ipv6=args.ipv6, loss_udp_only=args.loss_udp_only,
               rate_mbit=args.rate_mbit, miniupnpd=args.miniupnpd)


def measure_hairpin(lab, site='a', port=40100):
    """True if the second host of ``site`` reaches the first via its public mapping."""
    h1, h2 = SITES[site]['hosts']
    srv = lab.agent('server')
    s, _ = srv.bind(port, SERVER_ADDRS[0])
    a, _ = lab.agent(h1).bind(port)
    b, _ = lab.agent(h2).bind(port + 1)
    try:
        lab.agent(h1).send(a, (SERVER_ADDRS[0], port), 'map me')
        got = srv.recv(s, 2)
        if got is None:
            return False
        lab.agent(h2).send(b, got[1], 'hairpin')
        return lab.agent(h1).recv(a, 0.5) is not None
    finally:
        srv.close_socket(s)
        lab.agent(h1).close_socket(a)
        lab.agent(h2).close_socket(b)


def measure_rtt(lab, host='a1', count=5, port=40200):
    """Median UDP round trip time in ms from ``host`` to the server (None: all lost)."""
    srv = lab.agent('server')
    s, _ = srv.bind(port, SERVER_ADDRS[0])
    srv.echo(s)
    a, _ = lab.agent(host).bind(port)
    rtts = [r for r in lab.agent(host).rtt(a, (SERVER_ADDRS[0], port), count=count,
                                           interval=0.02) if r is not None]
    lab.agent(host).close_socket(a)
    return sorted(rtts)[len(rtts) // 2] if rtts else None


def measure_loss(lab, host='a1', count=200, port=40300):
    """Fraction of ``count`` datagrams from ``host`` that never reach the server."""
    srv = lab.agent('server')
    s, _ = srv.bind(port, SERVER_ADDRS[0])
    a, _ = lab.agent(host).bind(port)
    counted = []
    counter = threading.Thread(target=lambda: counted.append(srv.count(s, idle=1.0)))
    counter.start()
    lab.agent(host).burst(a, (SERVER_ADDRS[0], port), count, interval=0.0005)
    counter.join()
    srv.close_socket(s)
    lab.agent(host).close_socket(a)
    return (count - counted[0]) / count if counted else None


def cmd_selftest(args):
    """Build each NAT type, probe it, print what was measured; exit 1 on mismatch."""
    ok, why = lab_available()
    if not ok:
        print('lab unavailable:', why)
        return 2
    bad = [t for t in args.types if t not in ALL_NAT_TYPES]
    if bad:
        print('unknown NAT type(s): %s (want %s)' % (', '.join(bad), ', '.join(ALL_NAT_TYPES)))
        return 2
    failures = 0
    for nat in args.types or ALL_NAT_TYPES:
        t0 = time.monotonic()
        lab = Lab(nat_a=nat, nat_b=nat)
        with lab:
            res = probe_nat(lab, 'a1')
        # From outside, a sequential symmetric NAT is a symmetric NAT (with delta 1).
        want = 'symmetric' if nat.startswith('symmetric') else nat
        good = res['type'] == want
        if nat == 'symmetric-sequential':
            good = good and res.get('delta') == 1
        verdict = 'ok' if good else 'MISMATCH'
        failures += verdict != 'ok'
        print('%-20s measured %-16s ports %s/%s reply=%s other-port=%s stranger=%s  '
              'setup %.0f ms teardown %.0f ms total %.0f ms  %s'
              % (nat, res['type'], res.get('port1'), res.get('port2'), res.get('reply_ok'),
                 res.get('same_addr_other_port'), res.get('other_addr'),
                 lab.setup_seconds * 1000, lab.teardown_seconds * 1000,
                 (time.monotonic() - t0) * 1000, verdict))
    if args.quick:
        return 1 if failures else 0

    def check(label, value, good):
        nonlocal failures
        failures += not good
        print('%-44s %-28s %s' % (label, value, 'ok' if good else 'MISMATCH'))

    with Lab(hairpin_a=True) as lab:
        check('hairpin on (ra): a2 -> a1 via public', measure_hairpin(lab, 'a'), True)
        on = measure_hairpin(lab, 'b')
        check('hairpin off (rb): b2 -> b1 via public', on, not on)
    with Lab('full-cone', 'full-cone', cgn='both', cgn_type='symmetric') as lab:
        res = probe_nat(lab, 'a1')
        check('full-cone behind symmetric CGN', '%s from %s' % (res['type'], res['public']),
              res['type'] == 'symmetric' and res['public'] == CGN_WAN)
    with Lab(delay_ms=50) as lab:
        rtt = measure_rtt(lab)
        check('delay 50 ms/link: RTT a1 <-> server', '%.1f ms' % rtt, 100 <= rtt < 180)
    with Lab(delay_ms=30, jitter_ms=20) as lab:
        rtt = measure_rtt(lab, count=10)
        check('delay 30+-20 ms/link: median RTT', '%.1f ms' % rtt, 20 <= rtt < 140)
    with Lab(loss=0.2) as lab:
        lost = measure_loss(lab)
        check('loss 0.2/link: a1 -> server lost', '%.1f %%' % (lost * 100), 0.08 < lost < 0.34)
    with Lab(ipv6=True) as lab:
        a, b = lab.agent('a1'), lab.agent('b1')
        sa, _ = a.bind(5000, v6=True)
        sb, _ = b.bind(5000, v6=True)
        b.send(sb, (lab.addr6('a1'), 5000), 'unsolicited')
        unsolicited = a.recv(sa, 0.4) is not None
        a.send(sa, (lab.addr6('b1'), 5000), 'out')
        b.send(sb, (lab.addr6('a1'), 5000), 'reply')
        reply = a.recv(sa, 2) is not None
        check('IPv6 firewall: unsolicited in / reply in', '%s / %s' % (unsolicited, reply),
              not unsolicited and reply)
    with Lab(udp_timeout=2) as lab:
        srv = lab.agent('server')
        s, _ = srv.bind(3478, SERVER_ADDRS[0])
        a, _ = lab.agent('a1').bind(40000)
        lab.agent('a1').send(a, (SERVER_ADDRS[0], 3478), 'hi')
        m = srv.recv(s, 2)[1]
        time.sleep(3)           # let the 2 s NAT timer run out
        srv.send(s, m, 'late')
        late = lab.agent('a1').recv(a, 0.4) is not None
        check('udp timeout 2 s: packet after 3 s idle gets in', late, not late)
    return 1 if failures else 0


def cmd_describe(args):
    """Print nodes, namespaces and addresses (builds nothing)."""
    print(lab_from_args(args).describe())
    return 0


def cmd_cleanup(args):
    """Delete leftover p2pn- namespaces (of dead runs, or all with --all)."""
    for name in cleanup_stale(everything=args.all):
        print('removed', name)
    return 0


def cmd_shell(args):
    """Build a lab and keep it until Ctrl-C (or run a command in one node)."""
    with lab_from_args(args) as lab:
        for name in lab.nodes:
            print('%-9s %s' % (name, lab.ns(name)))
        print('setup took %.0f ms' % (lab.setup_seconds * 1000))
        if args.command:
            return lab.run(args.node, args.command, timeout=None,
                           stdout=None, stderr=None).returncode
        print('lab is up; e.g.  ip netns exec %s sh   (Ctrl-C tears it down)' % lab.ns('a1'))
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def build_parser():
    """The argparse parser with all subcommands (extend it by adding parsers)."""
    parser = argparse.ArgumentParser(description='p2pnat NAT lab')
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('selftest', help='build each NAT type and print what it does')
    p.add_argument('types', nargs='*', help='NAT types (default: all of %s)'
                   % ', '.join(NAT_TYPES))
    p.add_argument('--quick', action='store_true', help='only the four NAT types')
    p.set_defaults(func=cmd_selftest)
    # Placeholder so that "make lab" works today; the program matrix replaces it.
    p = sub.add_parser('report', help='(placeholder for the program matrix) = selftest')
    p.add_argument('types', nargs='*', default=[])
    p.add_argument('--quick', action='store_true', help='only the four NAT types')
    p.set_defaults(func=cmd_selftest)
    p = sub.add_parser('describe', help='print the topology of a lab with these options')
    add_lab_arguments(p)
    p.set_defaults(func=cmd_describe)
    p = sub.add_parser('cleanup', help='remove namespaces left by killed runs')
    p.add_argument('--all', action='store_true', help='also those of running labs')
    p.set_defaults(func=cmd_cleanup)
    p = sub.add_parser('shell', help='build a lab and keep it up (or run a command)')
    add_lab_arguments(p)
    p.add_argument('--node', default='a1')
    p.add_argument('command', nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_shell)
    p = sub.add_parser('agent', help='(internal) socket agent, JSON on stdin')
    p.set_defaults(func=lambda args: _agent_main())
    return parser


def main(argv=None):
    """Command line entry point: ``natlab.py {selftest,cleanup,shell,...}``."""
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == '__main__':
    sys.exit(main())
