"""hypemand's nftables rules: NAT out of the uplink, replies back in, nothing else through.

The rules live in a table of hypemand's own (family inet, one per bridge), written and read
through nft's JSON interface (``nft -j``): no rule of anyone else is touched, and none is
built as a command string. Run these functions in the namespace's thread
(:class:`~hypemand.network.namespace.NamespaceWorker`): ``nft`` is started there and so
works on that namespace.

Every rule carries a comment that names its purpose and the values it was built from. That
set of (chain, comment) is what the table must hold: when it holds exactly that, nothing is
written; otherwise the whole table is replaced in one atomic transaction, so there is never a
moment without rules (established connections keep their conntrack state through it).

Why these rules, in the forward hook (a drop in any table is final, an accept is not):

1. bridge -> bridge: dropped. A VM that routes to another VM's address through the gateway
   would otherwise be forwarded back onto the bridge (layer 2 is already isolated).
2. bridge -> uplink from the subnet: accepted (VMs reach out).
3. uplink -> bridge, established or related: accepted (replies come back).
4. anything else from or to the bridge: dropped (nothing reaches a VM uninvited, and VMs
   reach no other interface of the namespace).

and in postrouting, the subnet leaving by the uplink is masqueraded.

In the output hook, the server's own connections to VMs (health probes: their sockets carry the
socket mark :data:`SERVER_CONNECTION_MARK`, see ``NetworkHost.connect_socket``) get that mark on
their conntrack entry, so the auto-standby policy can tell them from a client's traffic (a probe
every few seconds must not keep an idle VM awake). The ingress proxy's connections are not
marked: they are clients' requests.

In the output hook (the namespace's own connections: the ingress proxy, health probes), TCP to
an address in the set ``sleeping`` is answered at once with a reset. The set holds the addresses
of VMs in standby (they keep their address, but their TAP is gone): without it a connection to
one would wait for ARP to give up (seconds) where the ingress needs a quick, retryable dial
error while it wakes the VM (``hypemand.ingress``: wake on traffic). Its elements are what the
instance manager says is asleep (added when a standby unplugs the TAP, removed whenever a VMM
gets its TAP back), set again from the instances at every server start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hypemand.network.config import NetworkConfig

NFT_TIMEOUT = 30.0
FAMILY = "inet"

Json = dict[str, Any]


class FirewallError(RuntimeError):
    """nft refused or failed; the message carries its error output."""


@dataclass(frozen=True)
class ChainSpec:
    name: str
    type: str
    hook: str
    prio: int


@dataclass(frozen=True)
class RuleSpec:
    chain: str
    comment: str
    expr: tuple[Json, ...]


FORWARD = ChainSpec("forward", "filter", "forward", 0)
OUTPUT = ChainSpec("output", "filter", "output", 0)
POSTROUTING = ChainSpec("postrouting", "nat", "postrouting", 100)  # srcnat
CHAINS = (FORWARD, OUTPUT, POSTROUTING)
SLEEPING = "sleeping"  # the set of addresses of VMs in standby
# The socket mark of the server's own connections to VMs, copied to their conntrack entries.
SERVER_CONNECTION_MARK = 0x686D0001
SETS = (SLEEPING,)


def _iif(name: str) -> Json:
    return {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": name}}


def _oif(name: str) -> Json:
    return {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": name}}


def _saddr_in(subnet: IPv4Network) -> Json:
    return {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                      "right": {"prefix": {"addr": str(subnet.network_address), "len": subnet.prefixlen}}}}


_ACCEPT: Json = {"accept": None}
_DROP: Json = {"drop": None}


def _refuse_sleeping(tag: str) -> RuleSpec:
    """A reset, not a drop: the dialer learns at once, and the ingress proxy retries."""
    return RuleSpec(OUTPUT.name, f"{tag}: TCP to VMs in standby reset at once",
                    ({"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                                "right": f"@{SLEEPING}"}},
                     {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
                     {"reject": {"type": "tcp reset"}}))


def _mark_server_connections(tag: str) -> RuleSpec:
    """The socket mark of the server's own connections copied to the conntrack entry."""
    return RuleSpec(OUTPUT.name, f"{tag}: the server's own connections marked in conntrack",
                    ({"match": {"op": "==", "left": {"meta": {"key": "mark"}},
                                "right": SERVER_CONNECTION_MARK}},
                     {"mangle": {"key": {"ct": {"key": "mark"}}, "value": SERVER_CONNECTION_MARK}}))


def desired_rules(config: NetworkConfig, uplink: str | None) -> list[RuleSpec]:
    """The rules for this bridge, subnet and uplink, in order. Without an uplink nothing is
    forwarded at all (VMs still reach the namespace itself: the gateway, the ingress proxy)."""
    br, net, tag = config.bridge, config.subnet, f"hypemand {config.bridge}"
    isolation = [
        RuleSpec(FORWARD.name, f"{tag}: no routing between VMs", (_iif(br), _oif(br), _DROP)),
        RuleSpec(FORWARD.name, f"{tag}: nothing else from VMs", (_iif(br), _DROP)),
        RuleSpec(FORWARD.name, f"{tag}: nothing else to VMs", (_oif(br), _DROP)),
    ]
    if uplink is None:
        return [*isolation, _mark_server_connections(tag), _refuse_sleeping(tag)]
    return [
        isolation[0],
        RuleSpec(FORWARD.name, f"{tag}: VMs of {net} out via {uplink}",
                 (_iif(br), _oif(uplink), _saddr_in(net), _ACCEPT)),
        RuleSpec(FORWARD.name, f"{tag}: replies from {uplink}",
                 (_iif(uplink), _oif(br),
                  {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                             "right": ["established", "related"]}}, _ACCEPT)),
        *isolation[1:],
        _mark_server_connections(tag),
        _refuse_sleeping(tag),
        RuleSpec(POSTROUTING.name, f"{tag}: masquerade {net} out {uplink}",
                 (_oif(uplink), _saddr_in(net), {"masquerade": None})),
    ]


def replace_table_commands(table: str, rules: list[RuleSpec],
                           sleeping: Collection[IPv4Address] = ()) -> Json:
    """One nft JSON transaction that leaves the table holding exactly these chains and rules,
    and ``sleeping`` in its set. ``add`` before ``delete`` makes the delete valid whether or not
    the table exists."""
    ref = {"family": FAMILY, "name": table}
    commands: list[Json] = [{"add": {"table": ref}}, {"delete": {"table": ref}}, {"add": {"table": ref}},
                            {"add": {"set": {"family": FAMILY, "table": table, "name": SLEEPING,
                                             "type": "ipv4_addr"}}}]
    if sleeping:
        commands.append({"add": {"element": _elements(table, sleeping)}})
    for chain in CHAINS:
        commands.append({"add": {"chain": {"family": FAMILY, "table": table, "name": chain.name,
                                           "type": chain.type, "hook": chain.hook,
                                           "prio": chain.prio, "policy": "accept"}}})
    for rule in rules:
        commands.append({"add": {"rule": {"family": FAMILY, "table": table, "chain": rule.chain,
                                          "comment": rule.comment, "expr": list(rule.expr)}}})
    return {"nftables": commands}


def _elements(table: str, addresses: Collection[IPv4Address]) -> Json:
    return {"family": FAMILY, "table": table, "name": SLEEPING, "elem": sorted(str(a) for a in addresses)}


def sleeping_commands(table: str, address: IPv4Address, asleep: bool) -> Json:
    """Add the address to the set, or remove it (``add`` first: valid whether or not present)."""
    change: list[Json] = [{"add": {"element": _elements(table, [address])}}]
    if not asleep:
        change.append({"delete": {"element": _elements(table, [address])}})
    return {"nftables": change}


def sync_sleeping_commands(table: str, sleeping: Collection[IPv4Address]) -> Json:
    """One transaction that leaves exactly ``sleeping`` in the set."""
    commands: list[Json] = [{"flush": {"set": {"family": FAMILY, "table": table, "name": SLEEPING}}}]
    if sleeping:
        commands.append({"add": {"element": _elements(table, sleeping)}})
    return {"nftables": commands}


def delete_table_commands(table: str) -> Json:
    ref = {"family": FAMILY, "name": table}
    return {"nftables": [{"add": {"table": ref}}, {"delete": {"table": ref}}]}


def _nft_binary() -> str:
    # /usr/sbin may be missing from PATH when the server is started by a service manager
    found = shutil.which("nft") or next(
        (path for path in ("/usr/sbin/nft", "/sbin/nft") if os.path.exists(path)), None)
    if found is None:
        raise FirewallError("nft is not installed (Debian package nftables)")
    return found


def run_nft(document: Json | None, *args: str) -> Json:
    """Blocking: ``nft -j`` with a JSON document on stdin (``-f -``) or with ``args``."""
    argv = [_nft_binary(), "-j", *(("-f", "-") if document is not None else args)]
    try:
        done = subprocess.run(argv, input=json.dumps(document) if document is not None else None,
                              capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise FirewallError(f"nft did not answer within {NFT_TIMEOUT:.0f}s") from None
    if done.returncode != 0:
        raise FirewallError(f"nft {' '.join(args) or '-f -'} failed: {done.stderr.strip()}")
    return json.loads(done.stdout) if done.stdout.strip() else {}


@dataclass(frozen=True)
class TableState:
    """What the kernel's table holds, as far as hypemand compares it."""

    chains: list[str]
    rules: list[tuple[str, str]]  # (chain, comment), sorted; a duplicated rule shows twice
    sets: list[str]
    sleeping: frozenset[IPv4Address]


def current_table(table: str) -> TableState | None:
    """Blocking: the table's chains, rules, sets and sleeping addresses, or None without it."""
    try:
        listing = run_nft(None, "list", "table", FAMILY, table)
    except FirewallError as err:
        if "No such file or directory" in str(err):
            return None
        raise
    chains: list[str] = []
    rules: list[tuple[str, str]] = []
    sets: list[str] = []
    sleeping: set[IPv4Address] = set()
    for item in listing.get("nftables", []):
        if "chain" in item:
            chains.append(item["chain"]["name"])
        elif "rule" in item:
            rules.append((item["rule"]["chain"], item["rule"].get("comment", "")))
        elif "set" in item:
            sets.append(item["set"]["name"])
            if item["set"]["name"] == SLEEPING:
                sleeping.update(IPv4Address(e) for e in item["set"].get("elem", []) if isinstance(e, str))
    return TableState(sorted(chains), sorted(rules), sorted(sets), frozenset(sleeping))


def current_rules(table: str) -> tuple[list[str], list[tuple[str, str]]] | None:
    """Blocking: the table's chain names and (chain, comment) pairs, or None without it."""
    state = current_table(table)
    return None if state is None else (state.chains, state.rules)


def ensure_rules(config: NetworkConfig, uplink: str | None,
                 sleeping: Collection[IPv4Address] | None = None) -> bool:
    """Blocking: make hypemand's table exactly the desired rules, and (unless ``sleeping`` is
    None: keep what it holds) exactly ``sleeping`` in its set. True when it rewrote the rules."""
    rules = desired_rules(config, uplink)
    wanted = (sorted(c.name for c in CHAINS), sorted((r.chain, r.comment) for r in rules), sorted(SETS))
    state = current_table(config.nft_table)
    if state is not None and (state.chains, state.rules, state.sets) == wanted:
        if sleeping is not None and state.sleeping != frozenset(sleeping):
            run_nft(sync_sleeping_commands(config.nft_table, sleeping))
        return False
    keep = sleeping if sleeping is not None else (state.sleeping if state is not None else ())
    run_nft(replace_table_commands(config.nft_table, rules, keep))
    return True


def set_sleeping(config: NetworkConfig, address: IPv4Address, asleep: bool) -> None:
    """Blocking: TCP to ``address`` reset at once (``asleep``) or let through again."""
    run_nft(sleeping_commands(config.nft_table, address, asleep))


def remove_rules(config: NetworkConfig) -> None:
    """Blocking: drop hypemand's table for this bridge, if present."""
    run_nft(delete_table_commands(config.nft_table))
