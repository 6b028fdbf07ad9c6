"""Cache-aware placement decisions (pure functions)."""

from __future__ import annotations

from meshd.kvcache.descriptor import prefix_sha256
from meshd.kvcache.planner import find_holders, plan_cache
from meshd.kvcache.prefix import PrefixAnnouncement

SHA = "ab" * 32
PROMPT = list(range(1000, 1600))  # 600 tokens


def ann(count: int, *, sha: str = SHA, tokens: list[int] | None = None, per_token: int = 23040) -> PrefixAnnouncement:
    ids = (tokens or PROMPT)[:count]
    return PrefixAnnouncement("smollm2", sha, prefix_sha256(ids), count, count * per_token)


def test_holders_longest_first_and_only_true_prefixes() -> None:
    announced = {
        "A": [ann(200), ann(50, tokens=[7] * 50)],  # the second is another conversation
        "B": [ann(500)],
        "C": [ann(500, sha="cd" * 32)],  # other weights
        "D": [ann(600)],  # covers the whole prompt: nothing left to decode
    }
    holders = find_holders(PROMPT, SHA, announced)
    assert [(h.node_id, h.announcement.token_count) for h in holders] == [("B", 500), ("A", 200)]


def test_plan_prefers_local_then_pull_when_faster() -> None:
    announced = {"A": [ann(500)], "B": [ann(200)]}
    plan = plan_cache(PROMPT, SHA, "A", announced, prefill_tokens_per_s=150, link_bytes_per_s={})
    assert plan.action == "local" and plan.cached_tokens == 500 and plan.header() == "local;node=A;tokens=500"
    # B is the target; A holds 500 tokens (11.5 MB): at 100 MB/s ~0.17 s vs 300 tokens / 150 tok/s = 2 s.
    plan = plan_cache(PROMPT, SHA, "B", announced, prefill_tokens_per_s=150, link_bytes_per_s={"A": 100e6})
    assert plan.action == "pull" and plan.holder == "A" and plan.transfer_s < plan.prefill_s
    # On a slow link re-prefilling the 300 extra tokens wins; B keeps its own 200.
    plan = plan_cache(PROMPT, SHA, "B", announced, prefill_tokens_per_s=5000, link_bytes_per_s={"A": 1e6})
    assert plan.action == "local" and plan.cached_tokens == 200 and "pulling" in plan.reason


def test_plan_prefill_without_measurements_or_holders() -> None:
    assert plan_cache(PROMPT, SHA, "B", {}, prefill_tokens_per_s=100, link_bytes_per_s={}).action == "prefill"
    plan = plan_cache(PROMPT, SHA, "B", {"A": [ann(500)]}, prefill_tokens_per_s=None, link_bytes_per_s={"A": 1e8})
    assert plan.action == "prefill" and "no measured" in plan.reason
    plan = plan_cache(PROMPT, SHA, "B", {"A": [ann(500)]}, prefill_tokens_per_s=1e6, link_bytes_per_s={"A": 1e6})
    assert plan.action == "prefill" and plan.header() == "prefill"
