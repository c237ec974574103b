"""Machine addresses as mesh.toml writes them (mesh/addresses.py): pure string functions."""

from __future__ import annotations

import pytest

from mesh.addresses import (
    address_problem,
    count_up,
    dialable,
    host_port,
    is_target,
    listed_replicas,
    listed_target,
)


def test_equal_endpoints_compare_equal_after_host_port() -> None:
    """Two spellings of one endpoint split to the same pair, so a shared port is caught."""
    assert host_port("[0:0:0:0:0:0:0:1]:50052") == host_port("[::1]:50052") == ("[::1]", 50052)
    assert host_port("Server.Example.:50052") == ("server.example", 50052)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("server", "no :port"),
        (":50052", "no host before the :port"),
        ("::1:50052", "an IPv6 host needs brackets, like [::1]:50052"),
        ("1.2.3.999:50052", "'1.2.3.999' is not an IPv4 address"),
        ("server:70000", "port '70000' is not a number in 1-65535"),
        ("dns:", "nothing follows dns:"),
        ("dns:///server:50052", None),
        ("server:50052", None),
    ],
)
def test_address_problem_says_what_is_wrong(address: str, problem: str | None) -> None:
    """A malformed address comes back as the reason a config message quotes."""
    assert address_problem(address) == problem


def test_targets_and_listed_replicas() -> None:
    """ipv4:/ipv6: targets list replicas; other schemes are targets gRPC resolves itself."""
    assert is_target("dns:///server:50052")
    assert not is_target("server:50052")
    assert listed_replicas("ipv4:127.0.0.1:1,127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert listed_replicas("dns:///server:50052") is None
    assert listed_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"


def test_count_up_stops_at_the_last_port() -> None:
    """Replicas counted up from one port; past 65535 is an error, not a wrap-around."""
    assert count_up("127.0.0.1:50052", 3) == [
        "127.0.0.1:50052",
        "127.0.0.1:50053",
        "127.0.0.1:50054",
    ]
    assert count_up("127.0.0.1:50052", None) == ["127.0.0.1:50052"]
    with pytest.raises(ValueError, match="65535"):
        count_up("127.0.0.1:65535", 2)


def test_a_wildcard_bind_is_dialled_on_loopback() -> None:
    """`mesh up` probes a replica bound to every interface on this host's loopback."""
    assert dialable("0.0.0.0:50052") == "127.0.0.1:50052"
    assert dialable("[::]:50052") == "[::1]:50052"
    assert dialable("10.0.0.5:50052") == "10.0.0.5:50052"
