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
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from ipaddress import IPv4Network
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
POSTROUTING = ChainSpec("postrouting", "nat", "postrouting", 100)  # srcnat
CHAINS = (FORWARD, POSTROUTING)


def _iif(name: str) -> Json:
    return {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": name}}


def _oif(name: str) -> Json:
    return {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": name}}


def _saddr_in(subnet: IPv4Network) -> Json:
    return {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                      "right": {"prefix": {"addr": str(subnet.network_address), "len": subnet.prefixlen}}}}


_ACCEPT: Json = {"accept": None}
_DROP: Json = {"drop": None}


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
        return isolation
    return [
        isolation[0],
        RuleSpec(FORWARD.name, f"{tag}: VMs of {net} out via {uplink}",
                 (_iif(br), _oif(uplink), _saddr_in(net), _ACCEPT)),
        RuleSpec(FORWARD.name, f"{tag}: replies from {uplink}",
                 (_iif(uplink), _oif(br),
                  {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                             "right": ["established", "related"]}}, _ACCEPT)),
        *isolation[1:],
        RuleSpec(POSTROUTING.name, f"{tag}: masquerade {net} out {uplink}",
                 (_oif(uplink), _saddr_in(net), {"masquerade": None})),
    ]


def replace_table_commands(table: str, rules: list[RuleSpec]) -> Json:
    """One nft JSON transaction that leaves the table holding exactly these chains and rules.
    ``add`` before ``delete`` makes the delete valid whether or not the table exists."""
    ref = {"family": FAMILY, "name": table}
    commands: list[Json] = [{"add": {"table": ref}}, {"delete": {"table": ref}}, {"add": {"table": ref}}]
    for chain in CHAINS:
        commands.append({"add": {"chain": {"family": FAMILY, "table": table, "name": chain.name,
                                           "type": chain.type, "hook": chain.hook,
                                           "prio": chain.prio, "policy": "accept"}}})
    for rule in rules:
        commands.append({"add": {"rule": {"family": FAMILY, "table": table, "chain": rule.chain,
                                          "comment": rule.comment, "expr": list(rule.expr)}}})
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


def current_rules(table: str) -> tuple[list[str], list[tuple[str, str]]] | None:
    """Blocking: the table's chain names and (chain, comment) pairs, sorted (a duplicated rule
    shows twice), or None without the table."""
    try:
        listing = run_nft(None, "list", "table", FAMILY, table)
    except FirewallError as err:
        if "No such file or directory" in str(err):
            return None
        raise
    chains: list[str] = []
    rules: list[tuple[str, str]] = []
    for item in listing.get("nftables", []):
        if "chain" in item:
            chains.append(item["chain"]["name"])
        elif "rule" in item:
            rules.append((item["rule"]["chain"], item["rule"].get("comment", "")))
    return sorted(chains), sorted(rules)


def ensure_rules(config: NetworkConfig, uplink: str | None) -> bool:
    """Blocking: make hypemand's table exactly the desired rules. True when it wrote."""
    rules = desired_rules(config, uplink)
    wanted = (sorted(c.name for c in CHAINS), sorted((r.chain, r.comment) for r in rules))
    if current_rules(config.nft_table) == wanted:
        return False
    run_nft(replace_table_commands(config.nft_table, rules))
    return True


def remove_rules(config: NetworkConfig) -> None:
    """Blocking: drop hypemand's table for this bridge, if present."""
    run_nft(delete_table_commands(config.nft_table))
