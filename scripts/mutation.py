"""The mutation check: break each rule that matters, and a named quick test must fail.

Each mutant replaces one small, stable snippet of a core module in a copy of the
checkout (in a temp dir; the worktree is never touched) and runs only the tests that
should catch it, with the copy's ``src`` first on PYTHONPATH (subprocesses inherit it).
A mutant is *killed* when those tests fail (pytest exit status 1); it *survives* when
they pass. A snippet that is no longer in its file is an error, never a silent skip:
fix the snippet when the code moves. First the named tests run once unmutated: a test
that already fails would kill every mutant for free.

    uv run python scripts/mutation.py            # all mutants (scripts/test --long runs this)
    uv run python scripts/mutation.py -k tail    # only mutants whose name contains "tail"

Exit status 0 when every mutant is killed; the score goes in docs/testing.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("src", "tests", "migrations", "examples", "scripts", "pyproject.toml", "README.md")
PER_TEST_TIMEOUT_S = 240


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    snippet: str
    replacement: str
    tests: tuple[str, ...]


DRAIN = "tests/test_drain.py::"
PROCS = "tests/test_drain_processes.py::"

MUTANTS = (
    Mutant(
        "lease: a live lease can be claimed",
        "src/pipecat_roark/outbox/rows.py",
        "d.state = 'leased' AND d.lease_expires_at < :now",
        "d.state = 'leased' AND d.lease_expires_at > :now",
        (PROCS + "test_three_drainer_processes_deliver_each_row_once",),
    ),
    Mutant(
        "key format: call-started",
        "src/pipecat_roark/wire.py",
        'f"{call_id}:call-started"',
        'f"{call_id}:started"',
        (DRAIN + "test_a_recorded_call_arrives_whole_and_in_order",),
    ),
    Mutant(
        "key format: chunk",
        "src/pipecat_roark/wire.py",
        'f"{call_id}:chunk:{index}"',
        'f"{call_id}:chunk-{index}"',
        (DRAIN + "test_every_call_arrives_exactly_once_through_storms_of_faults",),
    ),
    Mutant(
        "key format: call-ended",
        "src/pipecat_roark/wire.py",
        'f"{call_id}:call-ended"',
        'f"{call_id}:ended"',
        (DRAIN + "test_a_recorded_call_arrives_whole_and_in_order",),
    ),
    Mutant(
        "key format: upload URL per attempt",
        "src/pipecat_roark/client.py",
        'idempotency_key=f"{idempotency_key}:url:{attempt}"',
        'idempotency_key=f"{idempotency_key}:url"',
        (
            "tests/test_client.py::"
            "test_an_expired_url_is_upload_url_expired_and_the_next_attempt_mints_a_new_one",
        ),
    ),
    Mutant(
        "order: chunks do not wait for call-started",
        "src/pipecat_roark/outbox/rows.py",
        "AND s.kind = 'call-started' AND s.state IN ('delivered', 'dead')",
        "AND s.kind = 'call-started'",
        (DRAIN + "test_chunks_wait_for_call_started_and_call_ended_waits_for_every_chunk",),
    ),
    Mutant(
        "order: call-ended does not wait for the chunks",
        "src/pipecat_roark/outbox/rows.py",
        "AND x.kind = 'chunk' AND x.state NOT IN ('delivered', 'dead')",
        "AND x.kind = 'chunk' AND 0",
        (DRAIN + "test_chunks_wait_for_call_started_and_call_ended_waits_for_every_chunk",),
    ),
    Mutant(
        "tail: the end of a call does not wait for the last chunk",
        "src/pipecat_roark/audio_tail.py",
        "    loop = asyncio.get_running_loop()\n    deadline = loop.time() + TAIL_WAIT_S\n",
        "    return\n",
        ("tests/test_tail.py::test_a_stop_frame_keeps_the_tail",),
    ),
    Mutant(
        "played words: no word counts as played",
        "src/pipecat_roark/facts.py",
        "self._bot_text(frame, played=True)",
        "self._bot_text(frame, played=False)",
        ("tests/test_played_words.py",),
    ),
    Mutant(
        "orphans: a call of another host is never finalized",
        "src/pipecat_roark/call_ending.py",
        "if gone is None and heartbeat_at >= cutoff:",
        "if gone is None:",
        (PROCS + "test_a_call_of_another_host_waits_for_its_heartbeat_grace_then_ends_once",),
    ),
    Mutant(
        "orphans: a call of another host is finalized without waiting for its heartbeat",
        "src/pipecat_roark/call_ending.py",
        "cutoff = now - effective_grace_us(token, grace_us)",
        "cutoff = now",
        (PROCS + "test_a_call_of_another_host_waits_for_its_heartbeat_grace_then_ends_once",),
    ),
    Mutant(
        "orphans: no pid check in the owner's own namespace (heartbeat age only)",
        "src/pipecat_roark/owner.py",
        "        or identity.pid_ns != _pid_ns()\n    ):\n        return None",
        "        or True\n    ):\n        return None",
        (PROCS + "test_a_killed_bots_call_is_finalized_once_as_observer_lost",),
    ),
    Mutant(
        "orphans: a live owner's call is finalized",
        "src/pipecat_roark/call_ending.py",
        "if gone is False:",
        "if gone is False and False:",
        (PROCS + "test_a_live_bots_call_is_left_alone_until_its_process_dies",),
    ),
    Mutant(
        "salvage: a corrupt database is deleted, not moved aside",
        "src/pipecat_roark/store.py",
        "source.rename(target.with_name(target.name + suffix))",
        "source.unlink()",
        (
            "tests/test_capture_bad_input.py::"
            "test_a_corrupt_database_is_quarantined_not_deleted_and_recording_goes_on",
        ),
    ),
)


def copy_checkout(into: Path) -> None:
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, into / name)


def run_tests(tree: Path, tests: tuple[str, ...], *, show: bool = False) -> int:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
    command += ["-o", f"timeout={PER_TEST_TIMEOUT_S}", *tests]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if show and done.returncode != 0:
        print((done.stdout + done.stderr)[-3000:])
    if done.returncode not in (0, 1):
        tail = (done.stdout + done.stderr)[-1500:]
        raise SystemExit(f"tests did not run (pytest exit status {done.returncode}):\n{tail}")
    return done.returncode


def apply(tree: Path, mutant: Mutant) -> None:
    path = tree / mutant.path
    text = path.read_text()
    found = text.count(mutant.snippet)
    if found != 1:
        raise SystemExit(
            f"mutation {mutant.name!r}: snippet found {found} times in {mutant.path} "
            f"(expected once): {mutant.snippet!r}. Update scripts/mutation.py."
        )
    path.write_text(text.replace(mutant.snippet, mutant.replacement))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    chosen = [m for m in MUTANTS if parser.parse_args().k in m.name]
    with tempfile.TemporaryDirectory(prefix="roark-mutation-") as tmp:
        for mutant in chosen:  # every snippet is checked before anything runs
            probe = Path(tmp) / "probe"
            probe.mkdir(exist_ok=True)
            target = probe / mutant.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / mutant.path, target)
            apply(probe, mutant)
        clean = Path(tmp) / "clean"
        copy_checkout(clean)
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        if run_tests(clean, tests, show=True) != 0:
            raise SystemExit("the named tests fail without any mutation: fix them first")
        survivors = []
        for number, mutant in enumerate(chosen, start=1):
            tree = Path(tmp) / f"mutant-{number}"
            copy_checkout(tree)
            apply(tree, mutant)
            killed = run_tests(tree, mutant.tests) == 1
            print(f"{'killed  ' if killed else 'SURVIVED'} {mutant.name}", flush=True)
            if not killed:
                survivors.append(mutant.name)
            shutil.rmtree(tree)
    print(f"mutation score: {len(chosen) - len(survivors)}/{len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
