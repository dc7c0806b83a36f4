"""
Who may connect at all: C{[waf] deny} and C{allow} as CIDR lists (IPv4 and
IPv6; an IPv4-mapped IPv6 peer is judged as its IPv4 address).  A deny
entry wins over an allow entry; a non-empty allow list refuses everyone
it does not name.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Sequence

import attrs

__all__ = ["IPPolicy"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@attrs.frozen
class IPPolicy:
    deny: tuple[Network, ...] = ()
    allow: tuple[Network, ...] = ()
    _seen: dict[str, str | None] = attrs.field(factory=dict, eq=False, repr=False)
    """Verdicts already reached, by address (bounded): most traffic repeats a few addresses."""

    def __bool__(self) -> bool:
        return bool(self.deny or self.allow)

    def refusal(self, ip: str) -> str | None:
        """
        Why C{ip} is refused (C{"deny 10.0.0.0/8"}, C{"not in allow"}), or
        None when it may pass.  An address that is not one (a unix socket
        peer: C{"unknown"}) passes a deny list and fails an allow list.
        """
        seen = self._seen
        if ip in seen:
            return seen[ip]
        verdict = self._judge(ip)
        if len(seen) >= 4096:
            seen.clear()
        seen[ip] = verdict
        return verdict

    def _judge(self, ip: str) -> str | None:
        addr = _address(ip)
        if addr is None:
            return "not in allow" if self.allow else None
        for net in self.deny:
            if addr.version == net.version and addr in net:
                return f"deny {net}"
        if self.allow and not any(addr.version == net.version and addr in net for net in self.allow):
            return "not in allow"
        return None

    @classmethod
    def of(cls, deny: Sequence[Any], allow: Sequence[Any]) -> IPPolicy:
        return cls(tuple(deny), tuple(allow))
