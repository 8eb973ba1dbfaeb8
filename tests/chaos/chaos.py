"""``make chaos``: prove with figures that crashes, broker restarts and downstream faults lose nothing and apply
nothing twice.

    .venv/bin/python tests/chaos/chaos.py [--orders N] [--kills K] [--sigterms S] [--broker-kills B] [--out FILE]

Runs its own Kafka broker (own data dir, free ports), the sandbox systems and the daemon as real processes; see
`chaos.run` for what happens and what is checked. Prints the report as JSON (and writes it to ``--out``); exit
code 0 when every criterion passed, 1 otherwise. Not collected by pytest; the short version is
tests/integration/test_chaos_short.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, sys.path[0] is this directory, where `chaos` would be this file: make it tests/ instead.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402 - after the path fix above
import asyncio  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

from chaos.config import ChaosConfig  # noqa: E402
from chaos.run import run_chaos  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    defaults = ChaosConfig()
    parser = argparse.ArgumentParser(prog="tests/chaos/chaos.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=defaults.orders, help="valid orders (3 effects each)")
    parser.add_argument("--kills", type=int, default=defaults.kills, help="SIGKILLs of the daemon")
    parser.add_argument("--sigterms", type=int, default=defaults.sigterms, help="SIGTERMs of the daemon")
    parser.add_argument("--broker-kills", type=int, default=defaults.broker_kills, help="SIGKILLs of the broker")
    parser.add_argument("--bad-webhooks", type=int, default=defaults.bad_webhooks, help="malformed webhook bodies")
    parser.add_argument("--bad-records", type=int, default=defaults.bad_records, help="malformed Kafka records")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--budget", type=float, default=defaults.budget, help="seconds before the run gives up")
    parser.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight, help="per sink")
    parser.add_argument(
        "--independent-429",
        action="store_true",
        help="429s drawn per request (fixed Retry-After) instead of throttle episodes; see chaos.observe",
    )
    parser.add_argument("--work-dir", type=Path, help="keep everything here (default: a temporary dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir after a passing run")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    # The run's own producers log every failed connection while the broker is down, which the run causes.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    config = ChaosConfig(
        orders=args.orders,
        kills=args.kills,
        sigterms=args.sigterms,
        broker_kills=args.broker_kills,
        bad_webhooks=args.bad_webhooks,
        bad_records=args.bad_records,
        seed=args.seed,
        budget=args.budget,
        max_in_flight=args.max_in_flight,
        independent_429=args.independent_429,
        work_dir=args.work_dir,
        keep=args.keep,
    )
    report = asyncio.run(run_chaos(config, log=lambda line: print(line, file=sys.stderr, flush=True)))
    text = json.dumps(report, indent=2, sort_keys=False)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    verdict = "PASSED" if report.get("passed") else f"FAILED: {len(report.get('failures', []))} criteria"
    print(f"chaos: {verdict}", file=sys.stderr)
    return 0 if report.get("passed") else 1


if __name__ == "__main__":
    raise SystemExit(main())
