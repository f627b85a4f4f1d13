"""What every lag experiment of issue 12 starts with: its arguments and a dev server.

    uv run python scripts/exp_<name>.py MODE[,MODE...] ROUNDS [CALLS]

``scripts/exp_lag_placement.py`` and ``scripts/exp_lag_sched.py`` take turns of
``bench.lag_probe`` over the modes given, for that many rounds, with CALLS real-time calls
(50 unless given), against a dev server of their own.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from loguru import logger

from pipecat_roark.devserver import spawn


class Experiment(NamedTuple):
    modes: list[str]
    rounds: int
    calls: int
    tmp: Path
    server: subprocess.Popen[str]
    base_url: str


def start(prefix: str) -> Experiment:
    """Read the arguments, silence loguru, and start a dev server in a fresh directory."""
    modes = sys.argv[1].split(",")
    rounds = int(sys.argv[2])
    calls = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    logger.remove()
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    server, base_url = spawn(tmp / "devserver")
    return Experiment(modes, rounds, calls, tmp, server, base_url)
