"""Every folder we create is 0700 and every file 0600, whatever the umask: the recording
side (parents included), the drainer's dev server, and export."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from devserver_fixture import running_dev_server
from pipecat_roark.lifecycle import close_all_writers
from test_cli import cli
from test_drain import record
from test_writer_bulkheads import deliver

pytestmark = pytest.mark.anyio


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def modes_under(root: Path) -> dict[str, str]:
    """Every path under ``root`` (itself included), with its permission bits."""
    found = {".": f"{stat.S_IMODE(root.stat().st_mode):04o}"}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = f"{stat.S_IMODE(path.lstat().st_mode):04o}"
    return found


def assert_private(root: Path) -> None:
    modes = modes_under(root)
    wrong = {
        path: mode
        for path, mode in modes.items()
        if mode != ("0700" if (root / path).is_dir() else "0600")
    }
    assert wrong == {}, f"not private under {root}"
    assert len(modes) > 3, "the test did create things"


async def test_everything_we_create_is_private_under_umask_000(
    tmp_path: Path, umask_000: None
) -> None:
    recorded = tmp_path / "made" / "by" / "us" / "roark"  # three parents that do not exist
    await record(recorded, "call-1")
    close_all_writers()
    exported = tmp_path / "exports"
    exported.mkdir(mode=0o700)
    done = cli(  # before delivery: once Roark has the call, its audio leaves the disk
        recorded,
        "export",
        "call-1",
        "--wav",
        str(exported / "c.wav"),
        "--payloads",
        str(exported / "c.json"),
    )
    assert done.returncode == 0, done.stderr
    with running_dev_server(tmp_path / "server" / "parents") as server:
        await deliver(recorded, server, "call-1")
    close_all_writers()

    assert_private(tmp_path / "made")
    assert_private(tmp_path / "server")
    assert modes_under(exported) == {".": "0700", "c.wav": "0600", "c.json": "0600"}
