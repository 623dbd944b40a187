"""End-to-end check of Proxi's MCP server with the official MCP Python SDK (PyPI `mcp`, pinned).

Run by tests/mcp_python.rs, with the venv that scripts/mcp-harness.sh installs:

    python tests/python/mcp_e2e.py --transport stdio --proxi BIN --policy FILE --data-dir DIR
    python tests/python/mcp_e2e.py --transport http --data-dir DIR

Tokens come from PROXI_AGENT_TOKEN and PROXI_OPERATOR_TOKEN. `--mode legacy` uses the
`initialize` handshake (2025 protocol versions, `resources/subscribe`); `--mode auto`
lets the SDK probe `server/discover` and use the stateless 2026-07-28 protocol
(`subscriptions/listen`).

The scenario: initialize; list tools; get_service_status succeeds; restart_service is
refused in NORMAL (isError, blocked_in_mode); with a subscription to the policy
resource open, an operator declares EMERGENCY over REST and the client is notified;
restart_service succeeds; delete_database is refused (always_blocked); then the audit
trail shows every call under the client's principal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

POLICY_URI = "proxi://policy/status"
INFRA_URI = "proxi://infrastructure/status"
CLIENT_NAME = "proxi-e2e"
TOOLS = {
    "list_services": "read_only",
    "get_service_status": "read_only",
    "read_logs": "read_only",
    "restart_service": "active",
    "scale_fleet": "active",
    "delete_database": "destructive",
}
# Waits for the server, never for timing: each is a deadline on an expected event.
DEADLINE_SECONDS = 30


def step(text: str) -> None:
    print(f"[mcp-e2e] {text}", flush=True)


def check(condition: bool, what: str, detail: Any = None) -> None:
    if not condition:
        raise AssertionError(f"{what}" + (f": {detail!r}" if detail is not None else ""))


def server_url(data_dir: Path) -> str:
    """The URL the server recorded in <data-dir>/server.json (polled with a deadline)."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    path = data_dir / "server.json"
    while True:
        try:
            return json.loads(path.read_text())["url"]
        except (OSError, ValueError, KeyError):
            if time.monotonic() > deadline:
                raise AssertionError(f"no server URL in {path}")
            time.sleep(0.05)


def rest(url: str, token: str, method: str, path: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=DEADLINE_SECONDS) as response:
        return json.loads(response.read())


def text_of(result: Any) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


def check_tools(tools: list[Any]) -> None:
    names = {tool.name: tool for tool in tools}
    check(set(names) == set(TOOLS), "tools/list names the six tools", sorted(names))
    for name, category in TOOLS.items():
        tool = names[name]
        schema = tool.input_schema
        check(schema.get("type") == "object", f"{name} has an object input schema", schema)
        hints = tool.annotations
        check(hints is not None, f"{name} has annotations")
        if category == "read_only":
            check(hints.read_only_hint is True, f"{name} is readOnly", hints)
        elif category == "active":
            check(
                (hints.read_only_hint, hints.destructive_hint, hints.idempotent_hint) == (False, False, True),
                f"{name} is active and idempotent",
                hints,
            )
        else:
            check(hints.destructive_hint is True, f"{name} is destructive", hints)
    check(
        "Allowed in modes: EMERGENCY, NORMAL." in (names["get_service_status"].description or ""),
        "read-only tools say they are allowed in every mode",
        names["get_service_status"].description,
    )
    check(
        "Allowed in modes: EMERGENCY." in (names["restart_service"].description or ""),
        "restart_service says it is allowed in EMERGENCY",
        names["restart_service"].description,
    )
    check(
        "Blocked in every mode by policy." in (names["delete_database"].description or ""),
        "delete_database says it is always blocked",
        names["delete_database"].description,
    )
    check(
        names["get_service_status"].input_schema.get("required") == ["service_name"],
        "get_service_status requires service_name",
        names["get_service_status"].input_schema,
    )


def check_refusal(result: Any, reason: str, mode: str, tool: str) -> dict:
    check(result.is_error is True, f"{tool} is refused with isError", result)
    structured = result.structured_content or {}
    for field in ("policy_violation", "reason_code", "mode", "tool", "how_to_proceed"):
        check(field in structured, f"the refusal's structuredContent has {field}", structured)
    check(structured["reason_code"] == reason, f"{tool} is refused for {reason}", structured)
    check(structured["mode"] == mode, f"{tool} was decided in {mode}", structured)
    check(structured["tool"] == tool, "the refusal names the tool", structured)
    check(structured["how_to_proceed"] in text_of(result), "the text for the model says how to proceed")
    return structured


async def read_json(client: Client, uri: str) -> dict:
    contents = (await client.read_resource(uri)).contents
    check(len(contents) == 1, f"{uri} has one content", contents)
    check(contents[0].mime_type == "application/json", f"{uri} is JSON", contents[0])
    return json.loads(contents[0].text)


class PolicyUpdates:
    """Counts notifications/resources/updated for the policy resource (handshake-era sessions)."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.count = 0

    async def __call__(self, message: Any) -> None:
        message = getattr(message, "root", message)
        if getattr(message, "method", None) != "notifications/resources/updated":
            return
        if str(message.params.uri) == POLICY_URI:
            self.count += 1
            self.event.set()


async def declare_emergency(url: str, operator_token: str) -> None:
    status = await asyncio.to_thread(
        rest,
        url,
        operator_token,
        "POST",
        "/policy/set-mode",
        {"mode": "EMERGENCY", "reason": "mcp e2e: web-server is degraded", "ttl_seconds": 600},
    )
    check(status["mode"] == "EMERGENCY", "the operator declared EMERGENCY over REST", status)


async def run(args: argparse.Namespace) -> None:
    agent_token = os.environ["PROXI_AGENT_TOKEN"]
    operator_token = os.environ["PROXI_OPERATOR_TOKEN"]
    data_dir = Path(args.data_dir)
    updates = PolicyUpdates()
    http_client = None
    if args.transport == "stdio":
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PROXI_AGENT_TOKEN": agent_token,
            "PROXI_OPERATOR_TOKEN": operator_token,
            "RUST_LOG": "warn",
        }
        server: Any = StdioServerParameters(
            command=args.proxi,
            args=["mcp", "--policy", args.policy, "--data-dir", str(data_dir), "--durability", "process"],
            env=env,
        )
        # stdio carries the same form as HTTP: the agent, labelled with its client name.
        principal = f"agent (mcp:{CLIENT_NAME})"
    else:
        http_client = httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {agent_token}"},
            timeout=httpx2.Timeout(DEADLINE_SECONDS, read=300),
        )
        server = streamable_http_client(server_url(data_dir) + "/mcp", http_client=http_client)
        principal = f"agent (mcp:{CLIENT_NAME})"

    from mcp_types import Implementation

    client = Client(
        server,
        mode=args.mode,
        read_timeout_seconds=DEADLINE_SECONDS,
        client_info=Implementation(name=CLIENT_NAME, version="1.0"),
        message_handler=updates,
    )
    async with client:
        # 1. initialize (or discover, for --mode auto)
        info = client.server_info
        check(info is not None and info.name == "proxi", "serverInfo.name is proxi", info)
        step(f"1. connected over {args.transport} ({args.mode}), protocol {client.protocol_version}")
        if args.mode == "legacy":
            check(client.protocol_version < "2026", "the legacy handshake negotiated a 2025 version")
        url = server_url(data_dir)

        # 2. list tools
        check_tools((await client.list_tools()).tools)
        step("2. tools/list: six tools with schemas, annotations and allowed modes")

        # 3. a read-only call succeeds
        result = await client.call_tool("get_service_status", {"service_name": "web-server"})
        check(result.is_error is not True, "get_service_status succeeds", result)
        check(result.structured_content.get("service") == "web-server", "the result is structured", result)
        check(json.loads(text_of(result)) == result.structured_content, "the text carries the same JSON")
        step("3. get_service_status succeeded")

        invalid = await client.call_tool("get_service_status", {"service": "web-server"})
        check_refusal(invalid, "invalid_arguments", "NORMAL", "get_service_status")
        check(invalid.structured_content["policy_violation"] is False, "bad arguments are not a policy violation")
        step("   invalid arguments: isError, invalid_arguments")

        # 4. an active tool is refused in NORMAL
        denied = await client.call_tool("restart_service", {"service_name": "web-server"})
        structured = check_refusal(denied, "blocked_in_mode", "NORMAL", "restart_service")
        check(structured["policy_violation"] is True, "the refusal is a policy violation", structured)
        check("EMERGENCY" in structured["how_to_proceed"], "how_to_proceed names EMERGENCY", structured)
        step("4. restart_service in NORMAL: isError, blocked_in_mode")

        policy = await read_json(client, POLICY_URI)
        check(policy["mode"] == "NORMAL", "the policy resource says NORMAL", policy)
        infra = await read_json(client, INFRA_URI)
        check("services" in infra, "the infrastructure resource lists services", infra)

        # 5. an operator declares EMERGENCY over REST; the subscribed client hears of it
        if args.mode == "legacy":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # resources/subscribe is legacy by design here
                await client.subscribe_resource(POLICY_URI)
            await declare_emergency(url, operator_token)
            with anyio.fail_after(DEADLINE_SECONDS):
                await updates.event.wait()
        else:
            async with client.listen(resource_subscriptions=[POLICY_URI]) as subscription:
                honored = subscription.honored.resource_subscriptions or []
                check(POLICY_URI in honored, "the policy subscription is acknowledged", honored)
                await declare_emergency(url, operator_token)
                with anyio.fail_after(DEADLINE_SECONDS):
                    event = await subscription.__anext__()
                check(getattr(event, "uri", None) == POLICY_URI, "the update names the policy", event)
        policy = await read_json(client, POLICY_URI)
        check(policy["mode"] == "EMERGENCY", "the policy resource now says EMERGENCY", policy)
        step("5. operator declared EMERGENCY over REST; notifications/resources/updated received")

        # 6. the same call now succeeds
        restarted = await client.call_tool("restart_service", {"service_name": "web-server"})
        check(restarted.is_error is not True, "restart_service succeeds in EMERGENCY", restarted)
        check(restarted.structured_content.get("status") == "healthy", "the service is healthy", restarted)
        step("6. restart_service in EMERGENCY succeeded")

        # 7. destructive tools stay blocked
        deleted = await client.call_tool("delete_database", {"db_name": "database"})
        check_refusal(deleted, "always_blocked", "EMERGENCY", "delete_database")
        step("7. delete_database: isError, always_blocked")

        unknown = await client.call_tool("drop_everything", {})
        unknown_refusal = check_refusal(unknown, "unknown_tool", "EMERGENCY", "drop_everything")
        check(len(unknown_refusal.get("known_tools", [])) == 6, "an unknown tool lists the known ones")

        # While the server still runs (a stdio server exits with its client), the
        # audit trail must show every call under the client's principal, in order.
        audit = await asyncio.to_thread(rest, url, operator_token, "GET", "/audit?limit=100")
        calls = [
            (record["tool"], record["reason_code"])
            for record in sorted(audit["records"], key=lambda record: record["seq"])
            if record["kind"] == "tool_call" and record["principal"] == principal
        ]
        expected = [
            ("get_service_status", None),
            ("get_service_status", "invalid_arguments"),
            ("restart_service", "blocked_in_mode"),
            ("restart_service", None),
            ("delete_database", "always_blocked"),
            ("drop_everything", "unknown_tool"),
        ]
        check(calls == expected, f"the audit trail shows the calls as {principal}", audit["records"][:8])
        step(f"audit: {len(calls)} tool calls recorded for {principal}")

    if http_client is not None:
        await http_client.aclose()
    step("PASSED")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["stdio", "http"], required=True)
    parser.add_argument("--mode", choices=["legacy", "auto"], default="legacy")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--proxi", help="the proxi binary (stdio)")
    parser.add_argument("--policy", help="the policy file (stdio)")
    args = parser.parse_args()
    if args.transport == "stdio" and not (args.proxi and args.policy):
        parser.error("--transport stdio needs --proxi and --policy")
    try:
        asyncio.run(run(args))
    except AssertionError as error:
        print(f"[mcp-e2e] FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
