"""Our addresses, for the peer to try: the article's "listen on all interfaces".

A peer behind the same NAT reaches us only at a private address (article
point 10), and the article's future work is to offer every interface,
virtual and real.  ``private_addresses`` gathers what REGISTER reports;
``our_networks`` and ``reachable`` say which private addresses of a peer
can be the peer's at all, and so are worth punching (anything else may be
a stranger's, or someone we would only be aimed at).
"""

import ipaddress
import os
import socket
import struct

try:
    import fcntl
except ImportError:         # not on Windows: interface_addresses falls back
    fcntl = None

import p2pcommon as wire

SIOCGIFADDR = 0x8915     # Linux: get an interface's IPv4 address
SIOCGIFNETMASK = 0x891b  # and its netmask


def private_addresses(route):
    """Our addresses for the peer to try (point 10, and "every interface").

    ``route`` is the local address our control connection uses: first,
    since it is the one the server's side of the network reaches.  Then
    the address of every other interface, IPv6 and IPv4, so that a peer on
    any network we share can find us.  A client that reaches its server
    over loopback is on the server's own host and offers loopback only.
    """
    if ipaddress.ip_address(route).is_loopback:
        return [route]
    found = [route]
    for address in interface_addresses():
        if address not in found and len(found) < wire.MAX_ENDPOINTS:
            found.append(address)
    return found


def interface_addresses():
    """Every global address of this host's interfaces, IPv6 first.

    Standard library only: Linux lists IPv6 addresses in /proc/net/if_inet6
    (link-local ones are left out: they need an interface index to use),
    and gives an interface's IPv4 address to the SIOCGIFADDR ioctl.
    Elsewhere, the addresses the host name resolves to.
    """
    if fcntl is not None and os.path.exists('/proc/net/if_inet6'):
        found = _ipv6_addresses() + _ipv4_addresses()
    else:
        found = [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
    return [a for a in dict.fromkeys(found) if not ipaddress.ip_address(a).is_loopback]


def _ipv6_addresses():
    """Global IPv6 addresses, from Linux's /proc/net/if_inet6."""
    found = []
    with open('/proc/net/if_inet6') as table:
        for line in table:
            hex_address, _, _, scope = line.split()[:4]
            if scope == '00':       # global scope
                found.append(str(ipaddress.IPv6Address(bytes.fromhex(hex_address))))
    return found


def _ipv4_addresses():
    """Each interface's IPv4 address, by the SIOCGIFADDR ioctl."""
    return [address for address, _ in _ipv4_interfaces()]


def _ipv4_interfaces():
    """(address, netmask) of each interface with IPv4, by SIOCGIFADDR and SIOCGIFNETMASK."""
    found = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack('256s', name.encode()[:15])
            try:
                address = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)[20:24]
                mask = fcntl.ioctl(sock.fileno(), SIOCGIFNETMASK, request)[20:24]
            except OSError:
                continue            # no IPv4 address on this one
            found.append((socket.inet_ntoa(address), socket.inet_ntoa(mask)))
    return found


def reachable(host, networks):
    """True when host is inside one of networks (ip_network objects), or routed IPv6 is ours."""
    address = ipaddress.ip_address(host)
    if address.version == 6 and not (address.is_link_local or address.is_loopback
                                     or address.is_multicast or address.is_unspecified):
        return any(network.version == 6 and not network.is_loopback for network in networks)
    return any(address in network for network in networks)


def our_networks():
    """The networks our interfaces are on, loopback included (point 10's "same LAN").

    Linux only, like interface_addresses: IPv6 prefixes from
    /proc/net/if_inet6, IPv4 netmasks from the SIOCGIFNETMASK ioctl.
    Elsewhere, loopback alone.
    """
    networks = [ipaddress.ip_network('127.0.0.0/8'), ipaddress.ip_network('::1/128')]
    if fcntl is None or not os.path.exists('/proc/net/if_inet6'):
        return networks
    with open('/proc/net/if_inet6') as table:
        for line in table:
            hex_address, _, prefix, scope = line.split()[:4]
            if scope == '00':
                address = ipaddress.IPv6Address(bytes.fromhex(hex_address))
                networks.append(ipaddress.ip_network(f'{address}/{int(prefix, 16)}',
                                                     strict=False))
    for address, mask in _ipv4_interfaces():
        networks.append(ipaddress.ip_network(f'{address}/{mask}', strict=False))
    return networks
