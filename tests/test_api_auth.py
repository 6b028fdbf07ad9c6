"""API keys, quotas and receipts on a real daemon, driven by meshctl and the official openai client."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest


CHAT = [{"role": "user", "content": "hi"}]


def meshctl(state_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "meshd.cli.meshctl", "--state-dir", str(state_dir), *args],
                         capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def create_key(state_dir: Path, name: str, *options: str) -> tuple[str, str]:
    """(key id, secret) of a new key, made with `meshctl keys create`."""
    made = json.loads(meshctl(state_dir, "--json", "keys", "create", "--name", name, *options).stdout)
    return made["key"]["key_id"], made["secret"]


def client(daemon, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key=key or "none", max_retries=0, timeout=120)


def receipts(state_dir: Path, minimum: int, timeout: float = 10) -> list[dict]:
    """Receipts as meshctl shows them, once at least ``minimum`` are on disk (they are flushed each second)."""
    deadline = time.monotonic() + timeout
    while True:
        found = json.loads(meshctl(state_dir, "--json", "receipts", "--tail", "1000").stdout)["receipts"]
        if len(found) >= minimum or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, model_path):
    """A daemon, and keys created while it runs (the key file is re-read on every request)."""
    from conftest import start_daemon

    daemon = start_daemon(tmp_path_factory.mktemp("keyed"))
    yield daemon
    daemon.stop()


def test_a_node_beyond_loopback_refuses_to_start_without_a_key(daemon_factory, tmp_path):
    state = tmp_path / "beyond"
    listen = ["--state-dir", str(state), "--no-default-model"]
    refused = daemon_factory(*listen, ready=False, api_host="0.0.0.0")
    assert refused.proc.wait(60) == 1
    assert "meshctl keys create" in refused.log() and "--insecure-no-auth" in refused.log()

    open_node = daemon_factory(*listen, "--insecure-no-auth", api_host="0.0.0.0")
    assert "API keys are off" in open_node.log()
    assert open_node.get("/v1/models")[0] == 200
    open_node.stop()

    create_key(state, "ops")
    meshctl(state, "keys", "revoke", "ops")
    still_refused = daemon_factory(*listen, ready=False, api_host="0.0.0.0")
    assert still_refused.proc.wait(60) == 1  # a revoked key is no usable key

    _, secret = create_key(state, "ops2")
    keyed_node = daemon_factory(*listen, api_host="0.0.0.0")
    status, body = keyed_node.get("/v1/models")
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    assert client(keyed_node, secret).models.list().data == []  # no model on this node, but the key works


def test_missing_wrong_revoked_and_expired_keys(keyed):
    state = keyed.state_dir
    assert client(keyed, None).models.list().data  # loopback with no key yet: open
    _, secret = create_key(state, "alice")
    with pytest.raises(openai.AuthenticationError) as info:
        client(keyed, None).models.list()
    assert info.value.body["code"] == "invalid_api_key"  # 'none' is no key of ours
    status, body = keyed.get("/v1/models")
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    wrong = secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")
    with pytest.raises(openai.AuthenticationError) as info:
        client(keyed, wrong).models.list()
    assert info.value.body["code"] == "invalid_api_key" and wrong not in info.value.body["message"]
    assert client(keyed, secret).models.list().data

    meshctl(state, "keys", "revoke", "alice")
    with pytest.raises(openai.AuthenticationError) as info:
        client(keyed, secret).models.list()
    assert info.value.body["code"] == "api_key_revoked"

    soon = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)).isoformat()
    _, short_lived = create_key(state, "brief", "--expires", soon)
    assert client(keyed, short_lived).models.list().data
    time.sleep(2.5)
    with pytest.raises(openai.AuthenticationError) as info:
        client(keyed, short_lived).models.list()
    assert info.value.body["code"] == "api_key_expired"
    health_status, _ = keyed.get("/health")
    assert health_status == 200  # /health and /metrics stay open for probes


def test_model_allow_list_and_data_class_ceiling(keyed):
    _, other_only = create_key(keyed.state_dir, "other-only", "--models", "llama-3*")
    assert client(keyed, other_only).models.list().data == []
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(keyed, other_only).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1)
    assert info.value.body["code"] == "model_not_allowed"

    _, internal = create_key(keyed.state_dir, "internal", "--models", "smollm2", "--max-data-class", "internal")
    assert [m.id for m in client(keyed, internal).models.list().data] == ["SmolLM2-135M-Instruct.Q4_1"]
    with pytest.raises(openai.PermissionDeniedError) as info:
        client(keyed, internal).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1,
                                                       extra_headers={"X-Meshd-Data-Class": "secret"})
    assert info.value.body["code"] == "data_class_not_allowed"
    ok = client(keyed, internal).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1)
    assert ok.choices[0].finish_reason == "length"


def _parallel(daemon, secret: str, n: int, max_tokens: int) -> list[object]:
    """n chat requests released together; each result is the raw response or the exception."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = client(daemon, secret).chat.completions.with_raw_response.create(
                model="smollm2", messages=CHAT, max_tokens=max_tokens, temperature=0)
        except openai.APIStatusError as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def test_requests_per_minute_are_exact_under_concurrency(keyed):
    _, secret = create_key(keyed.state_dir, "rpm3", "--rpm", "3")
    results = _parallel(keyed, secret, 7, max_tokens=1)
    passed = [r for r in results if not isinstance(r, openai.APIStatusError)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(passed) == 3 and len(refused) == 4, results
    headers = passed[0].headers
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert int(headers["x-ratelimit-remaining-requests"]) in (0, 1, 2)
    error = refused[0]
    assert error.body["code"] == "rate_limit_exceeded"
    assert 1 <= int(error.response.headers["retry-after"]) <= 60
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_tenant_limit_binds_all_its_keys_together(keyed):
    meshctl(keyed.state_dir, "tenants", "set", "team", "--rpm", "3")
    _, first = create_key(keyed.state_dir, "team-a", "--tenant", "team")
    _, second = create_key(keyed.state_dir, "team-b", "--tenant", "team", "--rpm", "10")
    results = _parallel(keyed, first, 2, max_tokens=1) + _parallel(keyed, second, 3, max_tokens=1)
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(refused) == 2 and len(results) - len(refused) == 3, results
    assert "Rate limit reached for tenant team" in refused[0].body["message"]
    listed = json.loads(meshctl(keyed.state_dir, "--json", "tenants", "list").stdout)["tenants"]
    assert {"name": "team", "rpm": 3} == {"name": listed[-1]["name"], "rpm": listed[-1]["limits"]["rpm"]}


def test_tokens_per_minute_reserve_max_tokens_then_settle(keyed):
    # "hi" estimates to 1 prompt token: each request reserves 1 + 40; a limit of 100 admits exactly 2 at once.
    _, secret = create_key(keyed.state_dir, "tpm100", "--tpm", "100")
    results = _parallel(keyed, secret, 5, max_tokens=40)
    passed = [r for r in results if not isinstance(r, openai.APIStatusError)]
    assert len(passed) == 2, results
    assert all(isinstance(r, openai.RateLimitError) for r in results if r not in passed)
    usage = [p.parse().usage for p in passed]
    spent = sum(u.prompt_tokens + u.completion_tokens for u in usage)
    # Settled from real usage: the next response reports what is really left of the minute.
    assert spent > 40  # the chat template alone makes each prompt longer than its 1-token estimate
    with pytest.raises(openai.RateLimitError) as info:
        client(keyed, secret).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=60)
    assert info.value.response.headers["x-ratelimit-remaining-tokens"] == str(max(0, 100 - spent))
    too_big = _parallel(keyed, secret, 1, max_tokens=500)[0]
    assert isinstance(too_big, openai.RateLimitError)


def test_receipts_cover_every_outcome_and_verify(keyed, tmp_path):
    state = keyed.state_dir
    # Receipts name the model file's sha256 once the daemon has hashed it (in the background after start).
    deadline = time.monotonic() + 30
    while not json.loads(meshctl(state, "--json", "models").stdout)["models"][0]["identity"]:
        assert time.monotonic() < deadline, "the model identity was never computed"
        time.sleep(0.2)
    key_id, secret = create_key(state, "audited", "--tenant", "acme", "--models", "smollm2,Smol*")
    good = client(keyed, secret)
    good.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=3, temperature=0)
    stream = good.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=3, temperature=0, stream=True,
                                          stream_options={"include_usage": True})
    streamed_usage = [c.usage for c in stream if c.usage][-1]
    good.embeddings.create(model="smollm2", input="hello")
    with pytest.raises(openai.BadRequestError):
        good.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1,
                                     extra_headers={"X-Meshd-Data-Class": "nonsense"})
    with pytest.raises(openai.PermissionDeniedError):
        good.chat.completions.create(model="no-such-model", messages=CHAT)  # not on its allow-list
    with pytest.raises(openai.AuthenticationError):
        client(keyed, None).chat.completions.create(model="smollm2", messages=CHAT)

    mine = [r for r in receipts(state, 0) if r["tenant"] == "acme"]
    deadline = time.monotonic() + 10
    while len(mine) < 5 and time.monotonic() < deadline:
        mine = [r for r in receipts(state, 0) if r["tenant"] == "acme"]
    kinds = [(r["request_type"], r["outcome"], r["status"], r["error_code"]) for r in mine]
    assert kinds[:3] == [("chat.completions", "success", 200, None)] * 2 + [("embeddings", "success", 200, None)]
    assert [(k[1], k[2], k[3]) for k in kinds[3:]] == [("error", 400, "invalid_request"),
                                                        ("error", 403, "model_not_allowed")]
    assert all(r["key_id"] == key_id for r in mine)
    streamed = mine[1]
    assert streamed["stream"] and streamed["completion_tokens"] == streamed_usage.completion_tokens
    assert streamed["route"]["serving_node"] == streamed["route"]["entry_node"] and streamed["tier"] == "local"
    assert streamed["ttft_ms"] is not None and streamed["model_identity"]["sha256"]
    anonymous = [r for r in receipts(state, 0) if r["status"] == 401]
    assert anonymous and all(r["key_id"] is None for r in anonymous)

    usage = json.loads(meshctl(state, "--json", "usage", "--tenant", "acme").stdout)["usage"]
    assert sum(row["requests"] for row in usage) == len(mine)
    assert "acme" in meshctl(state, "usage").stdout

    verified = meshctl(state, "receipts", "verify")
    assert verified.stdout.startswith("OK:")
    # Tamper with copies: an edited, a deleted and a swapped line are each caught and named.
    for tamper in ("edit", "delete", "swap"):
        copy = tmp_path / tamper
        (copy / "receipts").mkdir(parents=True)
        for file in (state / "receipts").iterdir():
            (copy / "receipts" / file.name).write_bytes(file.read_bytes())
        log = sorted((copy / "receipts").glob("*.jsonl"))[0]
        lines = log.read_text().splitlines(keepends=True)
        if tamper == "edit":
            lines[1] = lines[1].replace('"completion_tokens":', '"completion_tokens":1', 1)
        elif tamper == "delete":
            del lines[1]
        else:
            lines[1], lines[2] = lines[2], lines[1]
        log.write_text("".join(lines))
        broken = meshctl(copy, "receipts", "verify", check=False)
        assert broken.returncode == 1 and broken.stdout.startswith("FAILED"), (tamper, broken.stdout)
        assert f"{log.name} line 2" in broken.stdout, (tamper, broken.stdout)


def test_no_secret_reaches_logs_or_receipts(keyed):
    _, secret = create_key(keyed.state_dir, "quiet")
    client(keyed, secret).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        client(keyed, secret + "x").models.list()
    receipts(keyed.state_dir, 1)
    listed = meshctl(keyed.state_dir, "keys", "list").stdout
    on_disk = (keyed.state_dir / "keys.toml").read_text()
    everything = keyed.log() + listed + on_disk + "".join(
        p.read_text() for p in (keyed.state_dir / "receipts").glob("*.jsonl"))
    body = secret.rsplit("-", 1)[1]
    assert body not in everything
    assert oct((keyed.state_dir / "keys.toml").stat().st_mode & 0o777) == "0o600"


def test_meshctl_keys_bad_input(tmp_path):
    state = tmp_path / "state"
    create_key(state, "dup")
    again = meshctl(state, "keys", "create", "--name", "dup", check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = meshctl(state, "keys", "create", "--name", "x", "--rpm", "0", check=False)
    assert bad.returncode == 2 and "rpm" in bad.stderr
    past = meshctl(state, "keys", "create", "--name", "y", "--expires", "2001-01-01", check=False)
    assert past.returncode == 2 and "future" in past.stderr
    missing = meshctl(state, "keys", "revoke", "nobody", check=False)
    assert missing.returncode == 2 and "nobody" in missing.stderr
    listed = json.loads(meshctl(state, "--json", "keys", "list").stdout)["keys"]
    assert [k["name"] for k in listed] == ["dup"] and "secret_hash" not in listed[0]
