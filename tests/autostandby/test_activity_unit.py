"""The pure parts of auto-standby: which tracked flows are inbound activity for a VM, and the
idle countdown fed by successive reads of the table (no clock, no kernel)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address

from hypemand.network.conntrack import (
    TCP_STATE_CLOSE,
    TCP_STATE_ESTABLISHED,
    TCP_STATE_SYN_SENT,
    TCP_STATE_TIME_WAIT,
    TcpFlow,
)
from hypemand.network.firewall import SERVER_CONNECTION_MARK
from hypemand.policies.activity import IdleCountdown, InboundFilter, is_live
from hypemand.policies.models import AutoStandbyMemory, AutoStandbyPolicy
from hypemand.units import format_duration, parse_duration

VM = "10.100.0.7"
GATEWAY = "10.100.0.1"
T0 = datetime(2026, 12, 7, 12, 0, 0, tzinfo=UTC)
TIMEOUT = timedelta(seconds=30)


def flow(state: int = TCP_STATE_ESTABLISHED, *, flow_id: int = 1, client: str = GATEWAY, port: int = 80,
         server: str = VM, dialled: str | None = None, client_port: int = 40000) -> TcpFlow:
    return TcpFlow(flow_id, IPv4Address(client), client_port, IPv4Address(dialled or server), port,
                   IPv4Address(server), port, state)


def policy(**extra: object) -> AutoStandbyPolicy:
    return AutoStandbyPolicy.model_validate({"enabled": True, "idle_timeout": "30s", **extra})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_live_states_are_all_but_none_time_wait_and_close() -> None:
    assert is_live(TCP_STATE_SYN_SENT) and is_live(TCP_STATE_ESTABLISHED)
    assert is_live(9) and is_live(42)  # SYN_SENT2 and a state nobody named yet: live
    assert not any(is_live(state) for state in (0, TCP_STATE_TIME_WAIT, TCP_STATE_CLOSE))


def test_the_filter_takes_flows_the_vm_answers_minus_the_ignore_lists() -> None:
    chosen = InboundFilter.of(VM, policy(ignore_source_cidrs=["192.0.2.0/24"], ignore_destination_ports=[22]))
    assert chosen.matches(flow())
    # The VM dialled out: the reply comes from elsewhere, so it is not the server side.
    assert not chosen.matches(flow(client=VM, server="198.51.100.1", dialled="198.51.100.1"))
    # Another VM's flow.
    assert not chosen.matches(flow(server="10.100.0.8"))
    # Through a destination NAT: dialled another address, answered by the VM.
    assert chosen.matches(flow(dialled="198.51.100.2", client="198.51.100.1"))
    assert not chosen.matches(flow(client="192.0.2.9"))
    assert not chosen.matches(flow(port=22))
    assert chosen.matches(flow(port=2222))


def test_the_server_s_own_connections_are_not_activity() -> None:
    """A health probe's flow carries the firewall's mark: it never keeps a VM awake."""
    chosen = InboundFilter.of(VM, policy())
    probe = flow()
    marked = TcpFlow(probe.flow_id, probe.client, probe.client_port, probe.dialled, probe.dialled_port,
                     probe.server, probe.server_port, probe.state, mark=SERVER_CONNECTION_MARK)
    assert chosen.matches(probe) and not chosen.matches(marked)


def test_a_first_read_without_connections_starts_the_countdown_and_it_ends_after_the_timeout() -> None:
    countdown = IdleCountdown()
    assert countdown.observe([], at(0)) is True  # the record learns idle_since
    assert countdown.idle_since == at(0) and countdown.active == 0
    assert countdown.next_standby_at(TIMEOUT) == at(30)
    assert countdown.observe([], at(10)) is False  # nothing new to write
    assert not countdown.due(TIMEOUT, at(29.9))
    assert countdown.due(TIMEOUT, at(30))


def test_an_open_connection_stops_the_countdown_and_its_end_starts_it_again() -> None:
    countdown = IdleCountdown()
    countdown.observe([], at(0))
    assert countdown.observe([flow()], at(5)) is True
    assert countdown.idle_since is None and countdown.last_activity == at(5) and countdown.active == 1
    assert countdown.next_standby_at(TIMEOUT) is None and not countdown.due(TIMEOUT, at(100))
    # Still open: the record is not written on every read.
    assert countdown.observe([flow()], at(6)) is False
    assert countdown.last_activity == at(6)
    # Closed: TIME_WAIT is not activity.
    assert countdown.observe([flow(TCP_STATE_TIME_WAIT)], at(7)) is True
    assert countdown.idle_since == at(7) and countdown.last_activity == at(6)
    assert countdown.next_standby_at(TIMEOUT) == at(37)


def test_a_connection_being_opened_counts() -> None:
    countdown = IdleCountdown()
    countdown.observe([], at(0))
    countdown.observe([flow(TCP_STATE_SYN_SENT)], at(1))
    assert countdown.active == 1 and countdown.idle_since is None


def test_a_flow_that_came_and_went_between_two_reads_restarts_the_countdown() -> None:
    countdown = IdleCountdown()
    countdown.observe([], at(0))
    # Seen only in TIME_WAIT, but it was not there at the last read: someone was served.
    assert countdown.observe([flow(TCP_STATE_TIME_WAIT, flow_id=5)], at(20)) is True
    assert countdown.idle_since == at(20) and countdown.last_activity == at(20)
    # The same finished flow at the next read is old news.
    assert countdown.observe([flow(TCP_STATE_TIME_WAIT, flow_id=5)], at(21)) is False
    assert countdown.next_standby_at(TIMEOUT) == at(50)


def test_the_first_read_seeds_known_flows_and_resumes_a_remembered_countdown() -> None:
    remembered = AutoStandbyMemory(idle_since=at(-100), last_inbound_activity_at=at(-200))
    countdown = IdleCountdown.resumed(remembered)
    # Finished flows already in the table when the server started are not new activity.
    assert countdown.observe([flow(TCP_STATE_TIME_WAIT)], at(0)) is False
    assert countdown.idle_since == at(-100) and countdown.due(TIMEOUT, at(0))
    assert countdown.memory() == remembered


def test_a_remembered_countdown_is_cleared_by_connections_open_at_start() -> None:
    countdown = IdleCountdown.resumed(AutoStandbyMemory(idle_since=at(-100)))
    assert countdown.observe([flow()], at(0)) is True
    assert countdown.idle_since is None and countdown.active == 1


def test_a_hold_defers_the_end_of_the_countdown_and_a_past_hold_does_not() -> None:
    countdown = IdleCountdown()
    countdown.observe([], at(0))
    countdown.hold_until = at(100)
    assert countdown.next_standby_at(TIMEOUT) == at(100) and not countdown.due(TIMEOUT, at(99))
    countdown.hold_until = at(10)
    assert countdown.next_standby_at(TIMEOUT) == at(30)


def test_countdown_remaining_is_a_go_duration() -> None:
    for seconds, text in ((0, "0s"), (0.25, "250ms"), (1.5, "1.5s"), (150, "2m30s"), (3723, "1h2m3s")):
        assert format_duration(seconds) == text
        assert parse_duration(text) == seconds
