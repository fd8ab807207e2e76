"""``ToolDesk``: where the instance runs its calls' requests to the operator's HTTP tools.

Each request runs in the instance's background nursery (``CallServices.spawn``), not in the
call's: a barge-in, a hang-up or the call's own end must not cut a request that may already
have changed the operator's data (docs/tools.md). It ends by itself within its tool's
timeout, and a drain waits for it. When it ends it is counted in ``/metrics`` and kept in
the store with the call, whether or not the caller is still on the line.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from voice_trio.calls.services import Spawn
from voice_trio.conversation.tool_use import PendingTool, ToolCaller
from voice_trio.observability import Metrics, call_id_var
from voice_trio.providers.tool_http import ToolClient, ToolOutcome
from voice_trio.store import CallStore, ToolCallEntry
from voice_trio.store.outage import keep
from voice_trio.tools_file import HttpToolSpec

log = logging.getLogger("voice_trio.calls")

STOPPED = '{"error": "the request was stopped"}'


class ToolDesk:
    def __init__(
        self, client: ToolClient, spawn: Spawn, metrics: Metrics, store: CallStore | None
    ) -> None:
        self.client = client
        self.spawn = spawn
        self.metrics = metrics
        self.store = store

    def start(
        self, caller: ToolCaller, tool: HttpToolSpec, tool_use_id: str, tool_input: dict[str, Any]
    ) -> PendingTool:
        pending = PendingTool(tool_use_id, tool.name, tool_input)
        self.spawn(self._run, caller, tool, pending)
        return pending

    async def _run(self, caller: ToolCaller, tool: HttpToolSpec, pending: PendingTool) -> None:
        token = call_id_var.set(caller.call_control_id)
        try:
            started_at = time.time()
            outcome: ToolOutcome | None = None
            log.info("🛠️ Tool %s requested", tool.name)
            try:
                outcome = await self.client.call(
                    tool, caller.body(tool.name, pending.input), pending.tool_use_id
                )
            finally:
                if outcome is None:  # cancelled (a hard stop) or a bug: the turn still hears
                    outcome = ToolOutcome("error", STOPPED, None, (time.time() - started_at) * 1000)
                pending.finish(outcome)
            on_line = caller.on_line()
            log.info(
                "🛠️ Tool %s: %s%s in %.0f ms%s",
                tool.name,
                outcome.status,
                f" (HTTP {outcome.http_status})" if outcome.http_status else "",
                outcome.latency_ms,
                "" if on_line else ", after the caller hung up",
            )
            self.metrics.tool_calls.labels(tool.name, outcome.status).inc()
            self.metrics.tool_latency.labels(tool.name).observe(outcome.latency_ms / 1000)
            if self.store is not None:
                entry = ToolCallEntry(
                    call_control_id=caller.call_control_id,
                    tool_use_id=pending.tool_use_id,
                    tool=tool.name,
                    input=pending.input,
                    status=outcome.status,
                    http_status=outcome.http_status,
                    result=outcome.content,
                    latency_ms=outcome.latency_ms,
                    started_at=started_at,
                    caller_on_line=on_line,
                )
                await keep(self.store.save_tool_call, entry, on_failure=self._store_failed)
        finally:
            call_id_var.reset(token)

    def _store_failed(self, operation: str) -> None:
        self.metrics.store_errors.labels(operation).inc()
