"""JSON Schema (draft 2020-12) of the contract, generated from the models and kept in the repository.

Why files in the repo: upstream teams validate their producers against them without running our Python, and
a diff of the schema shows a contract change in review. Why generated: the models are the truth; a unit test
fails when a file is stale. Regenerate with ``python -m topics.schema``; ``--check`` only reports (exit 1).
Output is stable (sorted keys, 2-space indent, trailing newline) so regenerating never makes noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel

from topics.envelope import OrderEvent, OrderSubmission

DRAFT: Final = "https://json-schema.org/draft/2020-12/schema"
REGENERATE: Final = "python -m topics.schema"

EVENT_SCHEMA_PATH: Final = Path(__file__).with_name("order-event.schema.json")
SUBMISSION_SCHEMA_PATH: Final = Path(__file__).with_name("order-submission.schema.json")
SCHEMA_PATHS: Final[Mapping[Path, type[BaseModel]]] = {
    EVENT_SCHEMA_PATH: OrderEvent,
    SUBMISSION_SCHEMA_PATH: OrderSubmission,
}


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The schema of what `model` accepts (validation mode), with the draft it follows."""
    return {"$schema": DRAFT, **model.model_json_schema(mode="validation")}


def render(model: type[BaseModel]) -> str:
    """The exact text of `model`'s schema file."""
    return json.dumps(json_schema(model), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def stale_paths() -> list[Path]:
    """Schema files that are missing or differ from what the models generate now."""
    return [
        path
        for path, model in SCHEMA_PATHS.items()
        if not path.is_file() or path.read_text(encoding="utf-8") != render(model)
    ]


def write_all() -> list[Path]:
    """Rewrite the stale schema files; returns the ones written."""
    stale = stale_paths()
    for path in stale:
        path.write_text(render(SCHEMA_PATHS[path]), encoding="utf-8")
    return stale


def _shown(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m topics.schema [--check]``."""
    parser = argparse.ArgumentParser(
        prog="python -m topics.schema",
        description="Write or check the JSON Schema files of the order contract.",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a schema file is stale; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_paths()
        for path in stale:
            print(f"stale: {_shown(path)} (run: {REGENERATE})", file=sys.stderr)
        return 1 if stale else 0
    for path in write_all():
        print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
