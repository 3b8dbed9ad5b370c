"""Draining versus dead nodes: whose sessions are cut, and when (core/health.sessions_to_cut)."""

from __future__ import annotations

from lbappliance.core.health import DrainState, sessions_to_cut

FOLLOW = {("hc_10256_v4", "node1"): (("be_a", "node1"), ("be_b", "node1")),
          ("hc_10256_v4", "node2"): (("be_a", "node2"),)}


def test_a_node_that_stopped_answering_has_its_sessions_cut_at_once_and_only_once() -> None:
    checks = {("hc_10256_v4", "node1"): ("DOWN", "L4TOUT"), ("hc_10256_v4", "node2"): ("UP", "L7OK")}
    cuts, state = sessions_to_cut(checks, FOLLOW, DrainState(), now=100.0, drain_timeout=300)
    assert cuts == (("be_a", "node1"), ("be_b", "node1"))
    again, _ = sessions_to_cut(checks, FOLLOW, state, now=101.0, drain_timeout=300)
    assert again == ()


def test_a_node_that_says_it_drains_keeps_its_sessions_until_the_drain_timeout() -> None:
    checks = {("hc_10256_v4", "node2"): ("DOWN", "L7STS")}  # kube-proxy's /healthz answered 503
    cuts, state = sessions_to_cut(checks, FOLLOW, DrainState(), now=100.0, drain_timeout=300)
    assert cuts == ()
    cuts, state = sessions_to_cut(checks, FOLLOW, state, now=399.0, drain_timeout=300)
    assert cuts == ()
    cuts, state = sessions_to_cut(checks, FOLLOW, state, now=400.0, drain_timeout=300)
    assert cuts == (("be_a", "node2"),)


def test_a_node_back_up_forgets_its_drain_and_a_self_checking_server_is_cut_itself() -> None:
    draining = {("hc_10256_v4", "node2"): ("DOWN", "L7STS")}
    _, state = sessions_to_cut(draining, FOLLOW, DrainState(), now=100.0, drain_timeout=300)
    _, state = sessions_to_cut({("hc_10256_v4", "node2"): ("UP", "L7OK")}, FOLLOW, state, now=200.0,
                               drain_timeout=300)
    cuts, state = sessions_to_cut(draining, FOLLOW, state, now=450.0, drain_timeout=300)
    assert cuts == (), "the drain restarted when the node came back"
    cuts, _ = sessions_to_cut({("be_c", "node3"): ("DOWN", "L4CON")}, FOLLOW, state, now=450.0, drain_timeout=300)
    assert cuts == (("be_c", "node3"),)
