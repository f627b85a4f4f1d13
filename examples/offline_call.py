"""What `scripts/demo` runs: a whole call, recorded, delivered and checked, all offline.

    uv run examples/offline_call.py            # a call end to end
    uv run examples/offline_call.py --crash    # the bot is killed with SIGKILL mid-call,
                                               # then `pipecat-roark drain` recovers it
    uv run examples/offline_call.py --real     # the same call, sent to Roark itself
                                               # (ROARK_API_KEY, ROARK_BASE_URL)

A real Pipecat pipeline plays a scripted call (synthetic speech audio, transcripts, a
tool call, an interruption) through RoarkObserver. The local Roark-compatible dev
server stands in for Roark on a free loopback port; nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import subprocess
import sys
import tempfile
import uuid
import wave
from pathlib import Path
from typing import Any

import httpx
from loguru import logger
from rich.console import Console
from rich.panel import Panel
from rich.prompt import Confirm
from rich.table import Table

from pipecat_roark import Drainer, RoarkObserver, config
from pipecat_roark.background_drainer import stop_background_drainers
from pipecat_roark.devserver import DevServer
from pipecat_roark.testing import Bot, Pause, ScriptedCall, Step, Tool, User, run_pipeline

DEMO_KEY = "demo-key-not-secret"
AGENT = {"agent_id": "demo-support-bot", "agent_name": "Demo support bot"}
CHUNK_BYTES = 32_000  # half a second of 16 kHz stereo, so a short demo call has several chunks
console = Console()


def demo_script() -> list[Step]:
    return [
        Bot(["Hi,", "thanks", "for", "calling.", "How", "can", "I", "help?"]),
        Pause(300),
        User(["My order", "is late."], ms=900),
        Tool(
            "call_1", "lookup_order", {"order_id": "42"}, {"status": "shipped", "eta": "tomorrow"}
        ),
        Bot(["It", "shipped", "yesterday", "and", "arrives", "tomorrow."], interrupt_after=3),
        User("Great, thanks. Bye!", ms=700),
        Bot(["Goodbye!"]),
    ]


async def record_call(
    directory: Path, base_url: str, call_id: str, emitted: list[bytes], api_key: str = DEMO_KEY
) -> None:
    roark = RoarkObserver(
        **AGENT,
        api_key=api_key,
        base_url=base_url,
        data_dir=directory,
        pipecat_call_id=call_id,
        agent_prompt="You are a helpful support agent.",
        chunk_bytes=CHUNK_BYTES,
    )

    @roark.audio_processor.event_handler("on_audio_data")
    async def keep(processor: Any, audio: bytes, sample_rate: int, num_channels: int) -> None:
        emitted.append(bytes(audio))

    await run_pipeline(
        [ScriptedCall(demo_script(), pace=0.25), roark.audio_processor], observers=[roark]
    )


async def show_arrival(
    base_url: str, call_id: str, directory: Path, expected_pcm: bytes, expected: str
) -> bool:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        call = (await http.get(f"/_dev/calls/{call_id}")).json()
        wav_response = await http.get(f"/_dev/calls/{call_id}/recording.wav")
    ended = call.get("callEnded") or {}
    table = Table(title="Transcript as Roark received it", show_lines=False)
    table.add_column("offset", justify="right")
    table.add_column("role")
    table.add_column("content")
    for turn in ended.get("transcript", []):
        offset = turn.get("audioOffsetMs")
        table.add_row(
            "" if offset is None else f"{offset / 1000:.2f}s", turn["role"], turn["content"]
        )
    console.print(table)
    for tool in ended.get("toolCalls", []):
        detail = tool.get("arguments") if tool["kind"] == "tool_call" else tool.get("content")
        console.print(
            f"  [cyan]{tool['kind']}[/] {tool['toolCallId']} {tool.get('name', '')} {detail}"
        )

    wav_path = directory / f"{call_id}.wav"
    wav_path.write_bytes(wav_response.content)
    wav_path.chmod(0o600)
    with wave.open(io.BytesIO(wav_response.content)) as wav:
        frames = wav.readframes(wav.getnframes())
        shape = f"{wav.getframerate()} Hz, {wav.getnchannels()} channels, {wav.getnframes() / wav.getframerate():.1f} s"
    same = frames == expected_pcm
    console.print(
        Panel.fit(
            f"call [bold]{call_id}[/]\n"
            f"reason: [bold]{ended.get('callEndedReason')}[/]  chunks: {len(call.get('chunks', {}))}\n"
            f"recording: {wav_path} ({shape})\n"
            + (
                f"[green]✓ its audio equals {expected}[/]"
                if same
                else f"[red]✗ its audio differs from {expected}[/]"
            ),
            title="Arrived at the Roark-compatible dev server",
        )
    )
    return same and bool(ended)


def run_cli(*args: str, env: dict[str, str]) -> int:
    console.print(f"[dim]$ pipecat-roark {' '.join(args)}[/]")
    return subprocess.run(
        [sys.executable, "-m", "pipecat_roark.cli", *args], env=env, check=False
    ).returncode


async def normal(directory: Path) -> bool:
    async with DevServer() as server:
        call_id = "demo-call-1"
        emitted: list[bytes] = []
        console.rule("1. a scripted call through a real Pipecat pipeline, recorded in the WAL")
        await record_call(directory, server.base_url, call_id, emitted)
        await stop_background_drainers(10)  # the bot's own drainer hands over what it holds
        console.rule("2. the drainer delivers it (it already started during the call)")
        report = await Drainer(directory, DEMO_KEY, server.base_url).run_once(budget_s=60)
        console.print(f"  what was left after the call: {report}")
        console.rule("3. what arrived")
        ok = await show_arrival(
            server.base_url,
            call_id,
            directory,
            b"".join(emitted),
            "every chunk the AudioBufferProcessor emitted",
        )
        env = {**os.environ, "PIPECAT_ROARK_DIR": str(directory)}
        run_cli("status", env=env)
    return ok


async def real(directory: Path) -> bool:
    """The demo call, delivered to Roark itself: ROARK_API_KEY and ROARK_BASE_URL."""
    key = config.resolve_api_key(None)
    if key is None:
        console.print("[red]--real needs ROARK_API_KEY[/]")
        return False
    base_url = config.resolve_base_url(None)
    call_id = f"pipecat-roark-demo-{uuid.uuid4()}"
    console.rule(f"1. a scripted call, recorded in the WAL and delivered to {base_url}")
    await record_call(directory, base_url, call_id, [], api_key=key)
    await stop_background_drainers(10)  # the bot's own drainer hands over what it holds
    console.rule("2. the drainer delivers what is left")
    report = await Drainer(directory, key, base_url).run_once(budget_s=60)
    console.print(f"  {report}")
    env = {**os.environ, "PIPECAT_ROARK_DIR": str(directory)}
    await asyncio.to_thread(run_cli, "calls", env=env)
    await asyncio.to_thread(run_cli, "status", env=env)
    if report.complete:
        console.print(f"[green]✓ call {call_id} is at Roark: look for agent {AGENT['agent_id']}[/]")
    return report.complete


def wants_real(args: argparse.Namespace) -> bool:
    """--real, or ROARK_API_KEY set and a yes at the prompt (only on a terminal)."""
    if args.real:
        return True
    if args.crash or config.resolve_api_key(None) is None:
        return False
    if not sys.stdin.isatty():
        console.print("[dim]ROARK_API_KEY is set: `scripts/demo --real` sends the call to Roark[/]")
        return False
    return Confirm.ask(
        f"ROARK_API_KEY is set: send the demo call to Roark at "
        f"{config.resolve_base_url(None)} instead of the local dev server?",
        default=False,
    )


async def crash(directory: Path) -> bool:
    async with DevServer() as server:
        call_id = "demo-crash-call"
        env = {
            **os.environ,
            "PIPECAT_ROARK_DIR": str(directory),
            "ROARK_API_KEY": DEMO_KEY,
            "ROARK_BASE_URL": server.base_url,
            "PYTHONUNBUFFERED": "1",
        }
        console.rule("1. the bot records a call ... and is killed with SIGKILL mid-call")
        bot = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--bot",
            "--dir",
            str(directory),
            "--call",
            call_id,
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        assert bot.stdout is not None
        for _ in range(4):  # wait for the 4th step of the script, then pull the plug
            line = await asyncio.wait_for(bot.stdout.readline(), 60)
            console.print(f"  [dim]bot: {line.decode().strip()}[/]")
        bot.send_signal(signal.SIGKILL)
        await bot.wait()
        console.print(
            f"  [red]bot killed (exit {bot.returncode})[/]: no EndFrame, no cleanup, no final drain"
        )
        console.rule("2. after the restart: what the disk kept, then pipecat-roark drain")
        # Exported before the drain: once Roark has the whole call, its chunk files are deleted.
        local_wav = directory / "exported.wav"
        exported = await asyncio.to_thread(
            run_cli, "export", call_id, "--wav", str(local_wav), env=env
        )
        with wave.open(str(local_wav)) as wav:
            durable_pcm = wav.readframes(wav.getnframes())
        code = await asyncio.to_thread(run_cli, "drain", env=env)
        console.rule("3. what arrived")
        ok = await show_arrival(
            server.base_url,
            call_id,
            directory,
            durable_pcm,
            f"the chunks made durable before the kill ({local_wav.name})",
        )
        await asyncio.to_thread(run_cli, "show", call_id, env=env)
    return ok and code == 0 and exported == 0


async def bot_process(directory: Path, call_id: str) -> None:
    """The crash demo's bot: reports each step on stdout, then keeps talking until killed."""
    roark = RoarkObserver(
        **AGENT, data_dir=directory, pipecat_call_id=call_id, chunk_bytes=CHUNK_BYTES
    )

    async def progress(step: int) -> None:
        print(f"step {step} played and recorded", flush=True)

    script = ScriptedCall(demo_script(), pace=0.25, end="hang", on_step=progress)
    await run_pipeline([script, roark.audio_processor], observers=[roark])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--crash", action="store_true", help="kill the bot mid-call, then recover")
    parser.add_argument(
        "--real", action="store_true", help="send the call to Roark (ROARK_API_KEY) instead"
    )
    parser.add_argument("--dir", type=Path, help="data directory (default: a fresh temporary one)")
    parser.add_argument("--bot", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--call", default="demo-call", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logger.remove()  # Pipecat logs every frame hop at DEBUG; the demo shows warnings only
    logger.add(sys.stderr, level="WARNING")
    if args.bot:
        asyncio.run(bot_process(args.dir, args.call))
        return 0
    directory = args.dir or Path(tempfile.mkdtemp(prefix="pipecat-roark-demo-")) / "roark"
    console.print(f"data directory: {directory}")
    if args.crash:
        ok = asyncio.run(crash(directory))
    elif wants_real(args):
        ok = asyncio.run(real(directory))
    else:
        ok = asyncio.run(normal(directory))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
