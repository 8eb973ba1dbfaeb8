"""The JSON Schema files in the repository are exactly what the models generate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import topics.schema
from topics.envelope import OrderEvent, OrderSubmission
from topics.schema import DRAFT, REGENERATE, SCHEMA_PATHS, json_schema, main, render


@pytest.mark.parametrize("path", list(SCHEMA_PATHS), ids=lambda path: path.name)
def test_schema_file_is_up_to_date(path: Path) -> None:
    on_disk = path.read_text(encoding="utf-8") if path.is_file() else ""
    assert on_disk == render(SCHEMA_PATHS[path]), f"{path.name} is stale; run: {REGENERATE}"


def test_both_models_have_a_file() -> None:
    assert sorted(path.name for path in SCHEMA_PATHS) == [
        "order-event.schema.json",
        "order-submission.schema.json",
    ]
    assert set(SCHEMA_PATHS.values()) == {OrderEvent, OrderSubmission}


def test_rendering_is_stable_sorted_and_newline_terminated() -> None:
    text = render(OrderEvent)
    assert text == render(OrderEvent)
    assert text.endswith("}\n")
    assert not text.endswith("\n\n")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_schema_says_what_producers_must_send() -> None:
    schema = json_schema(OrderEvent)
    assert schema["$schema"] == DRAFT
    assert schema["additionalProperties"] is False
    order = schema["$defs"]["Order"]
    assert order["additionalProperties"] is False
    assert order["properties"]["gross_total"]["type"] == "string"
    assert "EUR" in order["properties"]["currency"]["enum"]
    assert order["properties"]["line_items"]["minItems"] == 1
    line = schema["$defs"]["LineItem"]["properties"]
    assert line["unit_price"]["pattern"] == r"^[0-9]{1,18}(\.[0-9]{1,18})?$"
    assert line["quantity"] == {
        "description": "A JSON integer written without a fraction: 2, not 2.0 (which JSON Schema would also call an "
        "integer)",
        "exclusiveMinimum": 0,
        "maximum": 1_000_000,
        "title": "Quantity",
        "type": "integer",
    }


def test_check_reports_stale_files_and_write_fixes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    event_path, submission_path = (
        tmp_path / "order-event.schema.json",
        tmp_path / "order-submission.schema.json",
    )
    monkeypatch.setattr(topics.schema, "SCHEMA_PATHS", {event_path: OrderEvent, submission_path: OrderSubmission})
    submission_path.write_text("{}\n", encoding="utf-8")

    assert main(["--check"]) == 1
    stderr = capsys.readouterr().err
    assert f"{tmp_path.name}/order-event.schema.json" in stderr
    assert f"{tmp_path.name}/order-submission.schema.json" in stderr
    assert REGENERATE in stderr
    assert not event_path.exists()

    assert main([]) == 0
    assert main(["--check"]) == 0
    assert event_path.read_text(encoding="utf-8") == render(OrderEvent)
