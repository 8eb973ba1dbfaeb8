"""The chaos proof in short, inside `make test`: 3,000 orders, two SIGKILLs and a SIGTERM of the daemon, a SIGKILL
of the broker, 1,000 malformed webhooks and 1,000 malformed records, with the downstream faults of `make chaos`.

The same run and the same checks as tests/chaos/chaos.py (see `chaos.run`), at a size that takes about a minute:
nothing lost, nothing applied twice, dead letters exactly the scripted 400s and the malformed records, offsets
committed to the end, no duplicate request after a SIGTERM and at most the in-flight window after a kill,
throughput back within 20 s, every SQLite file intact after every stop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chaos.config import ChaosConfig
from chaos.run import run_chaos

pytestmark = pytest.mark.integration


async def test_kills_broker_restart_faults_and_bad_input_lose_nothing_and_apply_nothing_twice(tmp_path: Path) -> None:
    config = ChaosConfig(
        orders=3000,
        kills=2,
        sigterms=1,
        broker_kills=1,
        bad_webhooks=1000,
        bad_records=1000,
        seed=8,
        rate=70.0,
        ahead=1000,
        budget=100.0,
        broker_heap="384m",
        work_dir=tmp_path / "chaos",
    )
    lines: list[str] = []
    report = await run_chaos(config, log=lines.append)
    summary = {
        key: report.get(key)
        for key in ("failures", "duration_s", "orders", "duplicate_requests", "recovery_s_after_each_kill")
    }
    print(json.dumps(summary, indent=2))
    assert report["passed"], json.dumps({**summary, "log": lines}, indent=2)
    assert report["effects"]["expected"] == report["effects"]["applied"]
    assert report["dead_letters"]["expected"] == report["dead_letters"]["found"]
