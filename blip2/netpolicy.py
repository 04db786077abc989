"""The SSRF address policy: which addresses and host names an image URL may reach. Pure functions."""

from __future__ import annotations

import ipaddress

# Never public, whatever the running Python's ipaddress tables say (they changed across 3.x).
_BLOCKED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "3fff::/20", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    # Azure's platform address (WireServer, host agent, platform DNS): public space, but reachable
    # only from inside Azure, where it serves the VM's own configuration
    "168.63.129.16/32"))
# IPv6 prefixes whose last 32 bits are an IPv4 address: compatible, translated, NAT64.
_V4_IN_LOW_BITS = tuple(ipaddress.ip_network(n) for n in ("::/96", "::ffff:0:0:0/96", "64:ff9b::/96"))



def _embedded_ipv4(addr: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...] | None:
    """The IPv4 address(es) an IPv6 transition form carries, or None for plain IPv6."""
    if addr.ipv4_mapped is not None:
        return (addr.ipv4_mapped,)
    if addr.sixtofour is not None:
        return (addr.sixtofour,)
    if addr.teredo is not None:
        return addr.teredo  # (server, client)
    if any(addr in net for net in _V4_IN_LOW_BITS):
        return (ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF),)
    return None


def is_public_address(ip: str) -> bool:
    """True only for a globally routable unicast address (pure; the SSRF policy).

    ``ip`` is a textual address as ``getaddrinfo`` returns it (an IPv6 ``%scope``
    suffix is allowed). IPv6 forms that embed an IPv4 address (mapped, compatible,
    6to4, Teredo, NAT64) are judged on the embedded address. Anything unparsable
    is not public.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if addr.version == 6:
        embedded = _embedded_ipv4(addr)
        if embedded is not None:
            return all(is_public_address(str(v4)) for v4 in embedded)
    if any(addr in net for net in _BLOCKED if net.version == addr.version):
        return False
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_link_local)


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``host`` passes the allowlist: empty allows all; ``.example.com`` allows its subdomains."""
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith(".") and len(host) > len(entry) and host.endswith(entry):
            return True
        if host == entry:
            return True
    return False
