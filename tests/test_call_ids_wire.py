"""Any text is a call id: recorded through a real pipeline, delivered to the dev server over
127.0.0.1 with the id intact in every JSON body, and no other call in the WAL disturbed.

Lone surrogates are left out of this strategy: SQLite cannot store them, so the observer
refuses such an id with one log line; tests/test_call_ids.py's property test covers that
outcome, over all of ``st.text()``, through the same pipeline and dev server.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devserver_fixture import RunningDevServer, running_dev_server
from pipecat_roark import RoarkObserver
from pipecat_roark.drain import Drainer
from pipecat_roark.lifecycle import close_all_writers
from pipecat_roark.testing import Bot, ScriptedCall, User, run_pipeline
from pipecat_roark.wire import HEADER_KEY_MAX, header_key
from test_cli import sql
from test_drain import KEY, QUICK, assert_arrived_whole

EVENT_PATH = "/v1/integrations/pipecat"

no_surrogates = st.characters(exclude_categories=("Cs",))
call_ids = st.one_of(
    st.text(no_surrogates, min_size=1, max_size=40),
    st.text(st.characters(max_codepoint=0x7F), min_size=1, max_size=40),  # controls, / . % ? #
    st.text(no_surrogates, min_size=HEADER_KEY_MAX, max_size=2000),  # past the header bound
    st.sampled_from(["..", ".", "/", "a/../b", "%2F", "?x=1#y", "\x00", "\r\n", " ", "é" * 300]),
)


async def record_call(directory: Path, call_id: str, n: int) -> None:
    """A short call with two chunks of audio, recorded through a real pipeline."""
    roark = RoarkObserver(
        agent_id="ids-bot",
        api_key=KEY,
        pipecat_call_id=call_id,
        data_dir=directory,
        deliver=False,
        chunk_bytes=8000,
    )
    script = [Bot([f"Hello {n}."]), User(f"Question {n}?", ms=600)]
    await run_pipeline([ScriptedCall(script), roark.audio_processor], observers=[roark])  # type: ignore[arg-type]


def check_delivered_once(server: RunningDevServer, directory: Path, call_id: str) -> None:
    call = assert_arrived_whole(server, directory, call_id)
    assert call["callStarted"]["pipecatCallId"] == call_id
    assert call["callEnded"]["pipecatCallId"] == call_id
    keys = {r["idempotencyKey"] for r in server.requests() if r["path"] == EVENT_PATH}
    assert {header_key(f"{call_id}:call-started"), header_key(f"{call_id}:call-ended")} <= keys


def test_any_text_is_a_call_id_delivered_intact_without_disturbing_other_calls(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "roark"
    delivered: list[str] = []
    with running_dev_server(tmp_path) as server:

        def deliver(call_id: str, n: int) -> None:
            asyncio.run(record_call(directory, call_id, n))
            close_all_writers()
            report = asyncio.run(Drainer(directory, KEY, server.base_url, QUICK).run_once())
            assert report.complete, str(report)
            delivered.append(call_id)

        deliver("bystander", 0)

        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(call_id=call_ids)
        def one_odd_id(call_id: str) -> None:
            if call_id in delivered:  # a reused id is another issue (the writer's half)
                return
            deliver(call_id, len(delivered))
            check_delivered_once(server, directory, call_id)
            assert sql(
                directory, "SELECT DISTINCT call_id FROM deliveries WHERE call_id = ?", call_id
            ) == [(call_id,)], "stored verbatim"
            # Every call delivered before is still there exactly once, untouched.
            for earlier in delivered:
                assert server.call(earlier)["eventCounts"] == {"callStarted": 1, "callEnded": 1}
            assert json.dumps(server.call("bystander")["callStarted"]["pipecatCallId"]) == (
                '"bystander"'
            )

        one_odd_id()
    assert len(delivered) > 10, "the strategy produced ids"
