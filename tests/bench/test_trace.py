"""The trace benchmark (`bench.trace`): deterministic traces, stall/OOM/thrash accounting on hand-written traces, the
oracle as a lower bound, Mai without OOMs, and the CLI's JSON. Virtual time only: no timed assertions."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bench.trace.__main__ import main
from bench.trace.baselines import AlwaysUnload, Strict
from bench.trace.mai_policy import MaiPolicy
from bench.trace.params import GPU_SIZES_GIB, default_params
from bench.trace.report import ORACLE, ORACLE_MODES, policies, run, run_policy, table
from bench.trace.runner import Job, Runner
from bench.trace.trace import DayShape, Request, agent_day, make_trace
from mai.sim.world import GIB

PARAMS = default_params(12)
T = PARAMS.timings


def mode(at_s: float, name: str) -> Request:
    return Request(at_s, "agent", "mode", mode=name)


def vlm(at_s: float, service_s: float = 2.0) -> Request:
    return Request(at_s, "agent", "vlm", service_s)


def clip(at_s: float) -> Request:
    return Request(at_s, "agent", "clip", PARAMS.clip_embed_gpu_s)


def chat(at_s: float, reply_s: float = 5.0) -> Request:
    return Request(at_s, "user", "chat", reply_s)


def replay(factory, requests, params=PARAMS, duration_s=None):
    trace = make_trace(requests, duration_s)
    metrics = run_policy(factory, params, trace)
    return metrics, trace


def jobs_of(policy, requests, params=PARAMS):
    trace = make_trace(requests)
    return [j for j in Runner(trace, policy(params, trace), params).run() if j.request.kind != "mode"]


# --- traces ---------------------------------------------------------------------------------------------------------


def test_a_seed_gives_the_same_day_and_another_seed_another():
    assert agent_day(1.0, 7) == agent_day(1.0, 7)
    assert agent_day(1.0, 7).requests != agent_day(1.0, 8).requests


def test_a_day_has_every_kind_of_request_in_time_order_within_its_length():
    day = agent_day(2.0, 3)
    counts = day.counts()
    assert all(counts[k] > 0 for k in ("mode", "clip", "vlm", "chat"))
    times = [r.at_s for r in day.requests]
    assert times == sorted(times) and times[-1] < day.duration_s == 7200.0
    assert {r.mode for r in day.requests if r.kind == "mode"} <= {"autopilot", "recording", "idle"}


def test_a_whole_run_is_deterministic():
    day = agent_day(0.2, 5)
    first = [run_policy(f, PARAMS, day) for _, f in policies()]
    assert first == [run_policy(f, PARAMS, day) for _, f in policies()]


def test_bad_requests_and_hours_are_refused_with_what_is_accepted():
    with pytest.raises(ValueError, match="accepted: mode, clip, vlm, chat"):
        Request(0.0, "agent", "embed", 1.0)
    with pytest.raises(ValueError, match="accepted: a number > 0"):
        agent_day(0, 1)


# --- accounting on hand-written traces ------------------------------------------------------------------------------


def test_one_vlm_call_on_a_cold_gpu_stalls_exactly_the_load_under_always_unload():
    m, _ = replay(AlwaysUnload, [vlm(10.0)])
    assert m.stall_s == pytest.approx(T.vlm_load_s)
    assert (m.loads, m.thrash, m.ooms, m.stalls_over_1s) == (1, 0, 0, 1)
    assert m.peak_bytes == PARAMS.external_bytes + PARAMS.vlm_true_bytes


def test_a_reload_within_a_minute_of_the_unload_is_thrash():
    close, _ = replay(AlwaysUnload, [vlm(10.0), vlm(40.0)])
    far, _ = replay(AlwaysUnload, [vlm(10.0), vlm(100.0)])
    assert (close.loads, close.thrash) == (2, 1) and (far.loads, far.thrash) == (2, 0)
    assert close.stall_s == pytest.approx(2 * T.vlm_load_s)


def test_an_embedding_on_the_cpu_stalls_the_difference_with_the_gpu():
    m, _ = replay(Strict, [clip(5.0)])  # IDLE: CLIP stays where it is, on the CPU
    assert m.stall_s == pytest.approx(PARAMS.clip_embed_cpu_s - PARAMS.clip_embed_gpu_s)
    moved, _ = replay(AlwaysUnload, [clip(5.0)])  # moved to the GPU first: the move is the stall
    assert moved.stall_s == pytest.approx(T.clip_move_s) and moved.clip_moves == 1


def test_a_partially_offloaded_model_stalls_its_slowdown():
    tight = replace(default_params(8), external_bytes=2 * GIB)  # the VLM no longer fits: llama.cpp offloads part
    (job,) = jobs_of(AlwaysUnload, [vlm(10.0, 2.0)], tight)
    on_gpu = tight.gpu_total_bytes - tight.external_bytes
    slowdown = tight.offload_slowdown(on_gpu, tight.vlm_true_bytes)
    assert slowdown > 1 and job.stall_s == pytest.approx(T.vlm_load_s + 2.0 * (slowdown - 1))


def test_a_request_waits_for_its_own_client_without_stalling_for_it():
    jobs = jobs_of(AlwaysUnload, [vlm(10.0, 2.0), clip(10.5)])
    assert jobs[1].sent_s == pytest.approx(10.0 + T.vlm_load_s + 2.0)  # sent once the VLM call was done
    assert jobs[1].stall_s == pytest.approx(T.vlm_unload_s + T.clip_move_s)  # the VLM's unload goes first


def test_a_request_never_served_counts_all_its_waiting_and_gives_up():
    job = Job(vlm(0.0), "j", sent_s=10.0, gave_up_s=310.0)
    assert job.stall_s == 300.0 and job.finished


def test_mai_serves_a_vlm_call_on_a_cold_gpu_after_one_load():
    m, _ = replay(MaiPolicy, [vlm(10.0)])
    assert T.vlm_load_s <= m.stall_s < T.vlm_load_s + 1.0  # a reading and the gate's bookkeeping, not a second load
    assert (m.loads, m.ooms) == (1, 0)


def test_mai_answers_a_chat_turn_after_one_chat_load():
    m, _ = replay(MaiPolicy, [chat(10.0)])
    assert T.chat_load_s <= m.stall_s < T.chat_load_s + 1.0
    assert m.loads == 1 and m.chat_best_share is not None


def test_mai_keeps_a_vlm_that_fits_beside_clip_across_an_autopilot_run():
    calls = [vlm(20.0 + 15.0 * i) for i in range(10)]
    m, _ = replay(MaiPolicy, [mode(0.0, "autopilot"), *calls])
    assert m.loads == 1 and m.stall_s < T.vlm_load_s + 1.0


# --- the oracle and Mai on random small days ------------------------------------------------------------------------

SMALL_DAY = DayShape(autopilot_run_s=(60, 240), recording_s=(60, 180), idle_s=(10, 300))
small_days = st.builds(
    lambda seed, hours, gib, chat_gap: (agent_day(hours, seed, replace(SMALL_DAY, chat_gap_s=chat_gap)), gib),
    seed=st.integers(0, 10_000), hours=st.sampled_from([0.05, 0.1]), gib=st.sampled_from(GPU_SIZES_GIB),
    chat_gap=st.sampled_from([60.0, 600.0]),
)


# Fresh random days on every run (hypothesis prints the seed of a failing one: `--hypothesis-seed=N` replays it).
# The offline oracle is a clairvoyant heuristic, not a proven optimum: on about 1 % of these days a policy stalls
# less than it (measured over 5000 draws: "strict modes" and, more rarely, Mai itself, all at 8 GB; see the strict
# xfails below). So what is checked on every day is what always holds: no policy that keeps Mai's rules runs out
# of memory, Mai as shipped gives no request up, the rules-keeping oracle is never below the free one, and whoever beats the
# oracle is named in the result and in the printed table, never hidden.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_days)
def test_on_any_day_mai_never_runs_out_of_memory_and_a_beaten_oracle_is_reported(day_and_gpu):
    day, gib = day_and_gpu
    (result,) = run(day, [gib])
    total = default_params(gib).gpu_total_bytes
    for m in result.rows:
        if m.policy.startswith(("mai", "strict")):  # the policies that keep Mai's invariants
            assert m.ooms == 0 and m.peak_bytes <= total, f"{m.policy}: {m.ooms} OOMs, peak {m.peak_bytes}"
            # Mai as shipped never gives a request up (its earlier variants v0 and v1 did, on ~5 % of these days).
            assert m.gave_up == 0 or m.policy.startswith(("mai v0", "mai v1")), f"{m.policy} gave {m.gave_up} up"
    floor, held = result.row(ORACLE).stall_s, result.row(ORACLE_MODES).stall_s
    assert floor <= held + 1e-9  # a schedule that keeps Mai's rules is one the free oracle may follow
    beaten = [m.policy for m in result.rows if m.stall_s < floor - 1e-9]
    assert result.oracle_beaten_by == beaten
    event("oracle beaten" if beaten else "oracle is the floor")
    text = table(result)
    assert ("WARNING: the oracle is not a lower bound here" in text) == bool(beaten)
    assert all(name in text for name in beaten)


@pytest.mark.parametrize("gib", GPU_SIZES_GIB)
def test_mai_never_runs_out_of_memory(gib):
    params = default_params(gib)
    for seed in (1, 2):
        m = run_policy(lambda p, t: MaiPolicy(p, t), params, agent_day(0.25, seed, DayShape(chat_gap_s=120.0)))
        assert m.ooms == 0 and m.peak_bytes <= params.gpu_total_bytes and m.gave_up == 0


# --- the CLI --------------------------------------------------------------------------------------------------------


def test_quick_json_has_a_row_per_policy_and_the_targets_per_gpu(capsys):
    assert main(["--quick", "--json", "--gpus", "8,24"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"]["hours"] == 0.5 and out["trace"]["requests"]["vlm"] > 0
    assert [g["gpu_gib"] for g in out["gpus"]] == [8.0, 24.0]
    names = [name for name, _ in policies()]
    for gpu in out["gpus"]:
        assert [r["policy"] for r in gpu["rows"]] == names
        for row in gpu["rows"]:
            assert {"stall_s_per_h", "stalls_over_1s_per_h", "peak_gib", "ooms", "loads_per_h",
                    "thrash_per_h"} <= set(row)
        assert [t["name"] for t in gpu["targets"]][:4] == [
            "OOMs", "always-unload / mai", "strict / mai", "mai / oracle (modes)"]
        assert all(t["passed"] in (True, False) for t in gpu["targets"][:4])


def test_the_cli_refuses_bad_gpu_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["--gpus", "eight"])
    assert "accepted: numbers of GiB" in capsys.readouterr().err


@pytest.mark.xfail(strict=True, reason="known: on this short 8 GB day the offline oracle's chat schedule stalls 46.0 s "
                   "where strict modes stalls 38.4 s; the oracle is a heuristic lower bound (bench/README.md §3)")
def test_the_offline_oracle_is_beaten_on_a_known_short_day():
    (result,) = run(agent_day(0.05, 1, replace(SMALL_DAY, chat_gap_s=60.0)), [8])
    floor = result.row(ORACLE).stall_s
    assert all(floor <= m.stall_s + 1e-9 for m in result.rows)


@pytest.mark.xfail(strict=True, reason="known: on this short 8 GB day (seed 1109, found by the random search above) "
                   "Mai stalls less than the offline oracle; the oracle is a heuristic lower bound (bench/README.md §3)")
def test_the_offline_oracle_is_beaten_by_mai_on_a_known_short_day():
    (result,) = run(agent_day(0.05, 1109, replace(SMALL_DAY, chat_gap_s=60.0)), [8])
    assert "mai" not in result.oracle_beaten_by
