#!/usr/bin/env python3
"""Render the README's fault and bad-input catalogue from the tests, so the table stays true.

A catalogue test is a ``test_*`` function in ``Testing/<layer>/test_*.py`` whose docstring starts with
``case: <what goes wrong> -> <what the user gets>`` (it may wrap over several lines; a blank line ends it). Tests
written before the catalogue, in modules owned by other work, are listed in :data:`EARLIER_TESTS` instead; each
entry must name a test that exists (checked on every run).

A test marked ``xfail`` is shown as open, with its reason.

Usage: ``python Utilities/fault_catalogue.py`` rewrites the table between the README markers;
``--check`` exits 1 when the README differs from what would be written (a test runs this).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTING = REPO / "Testing"
README = REPO / "README.md"
BEGIN, END = "<!-- BEGIN fault-catalogue -->", "<!-- END fault-catalogue -->"
ANCHOR = "## Repository layout"

# Cases covered before the catalogue existed: test id -> (case, behaviour). Moving a docstring "case: ..." line into
# the test itself makes its entry here redundant (the script then refuses the duplicate).
EARLIER_TESTS: dict[str, tuple[str, str]] = {
    "model/test_model_lamed.py::test_truncated_safetensors_names_the_file": (
        "corrupted weight shard (truncated)", "CheckpointError naming the file"),
    "model/test_model_lamed.py::test_garbage_safetensors_header_names_the_file": (
        "corrupted weight shard (garbage header)", "CheckpointError naming the file"),
    "model/test_model_lamed.py::test_missing_shard_names_the_shard": (
        "model folder partial: a shard of the index missing", "CheckpointError naming the shard"),
    "model/test_model_lamed.py::test_wrong_model_type_is_refused": (
        "config.json with the wrong model_type", "ConfigError"),
    "model/test_model_lamed.py::test_tokenizer_without_m3d_tokens_is_refused": (
        "tokenizer without the M3D special tokens", "TokenizerError"),
    "model/test_model_lamed.py::test_seg_token_id_mismatch_is_refused": (
        "seg_token_id differs from the tokenizer's [SEG] id", "ConfigError"),
    "model/test_model_lamed.py::test_prompt_longer_than_context_is_refused": (
        "prompt longer than the context (model)", "InputError"),
    "outputs/test_outputs.py::test_disk_full_leaves_nothing_half_written": (
        "disk full while writing a .seg.nrrd (and other outputs)", "OutputWriteError; nothing half-written"),
    "outputs/test_outputs.py::test_never_overwrites_without_permission": (
        "output file already exists", "not overwritten without permission"),
    "serving/test_server.py::test_every_route_needs_the_token": (
        "wrong / missing token (server)", "401 on every route"),
    "serving/test_server.py::test_too_large_uploads_are_refused_before_allocation": (
        "request or volume over the server's limits (server, client)",
        "413 before allocation; the client refuses first, naming the limit and --max-volume-mb"),
    "serving/test_server.py::test_port_taken_is_a_clear_error": (
        "server port taken", "a clear error naming the port"),
    "serving/test_server.py::test_two_concurrent_clients_get_their_own_answers": (
        "two clients at once (server)", "each gets its own answer"),
    "serving/test_server.py::test_remote_bind_needs_the_flag_and_a_token": (
        "remote bind without the flag or without a token", "refuses to start"),
    "serving/test_server.py::test_openapi_fuzz_no_server_errors": (
        "fuzzed requests from the OpenAPI schema (bounded schemathesis)", "no 5xx"),
    "serving/test_worker.py::test_worker_lifecycle_start_reuse_crash_restart_cancel_stop": (
        "worker killed mid-answer (worker)", "reported, restarted on the next request"),
    "training/test_jobs.py::test_sigkill_mid_run_then_resume_reproduces_the_uninterrupted_loss_curve": (
        "training killed mid-epoch (SIGKILL)", "resumes; the loss curve equals the uninterrupted run"),
    "slicer/test_scene.py::test_read_volume_node_uses_world_geometry_under_linear_transforms": (
        "volume with a parent transform", "read in world coordinates"),
    "slicer/test_scene.py::test_read_volume_node_refuses_a_non_linear_transform": (
        "volume under a non-linear transform", "InputError"),
    "training/test_export.py::test_export_report_counts_and_reasons": (
        "export of a scene with unsupported nodes", "reported with reasons, not a crash"),
    "training/test_export.py::test_export_never_overwrites_and_leaves_nothing_on_failure": (
        "export fails half way", "nothing left, nothing overwritten"),
    "geometry/test_geometry.py::test_nan_inf_and_constant_volumes": (
        "volume NaN / Inf / constant", "documented handling (geometry)"),
    "geometry/test_volume_io.py::test_2d_image": (
        "volume 2D (file)", "InputError"),
    "slicer/test_session.py::test_bad_volumes_are_refused_before_the_backend_is_called": (
        "volume 2D / 4D / vector / label map (session)", "InputError before the backend is called"),
}


def _docstring_case(doc: str) -> tuple[str, str] | None:
    if not doc.startswith("case:"):
        return None
    first = " ".join(doc.split("\n\n", 1)[0].split())  # the first paragraph, joined
    case, _, behaviour = first[len("case:"):].partition("->")
    if not behaviour:
        raise SystemExit(f"a 'case:' docstring needs '<case> -> <behaviour>': {first!r}")
    return case.strip(), behaviour.strip()


def _xfail_reason(func: ast.FunctionDef, source: str) -> str | None:
    for deco in func.decorator_list:
        text = ast.get_source_segment(source, deco) or ""
        if "mark.xfail" in text:
            reason = next((k.value for k in getattr(deco, "keywords", []) if k.arg == "reason"), None)
            if isinstance(reason, ast.Constant):
                return str(reason.value)
            return "marked xfail" if reason is None else (ast.get_source_segment(source, reason) or "marked xfail")
    return None


def collect(testing: Path = TESTING) -> list[dict[str, str]]:
    """Every catalogue row: case, behaviour, test id, status; from docstrings and :data:`EARLIER_TESTS`."""
    rows, defined = [], set()
    for path in sorted(testing.glob("*/test_*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.name.startswith("test_"):
                continue
            test_id = f"{path.relative_to(testing).as_posix()}::{node.name}"
            defined.add(test_id)
            found = _docstring_case(ast.get_docstring(node) or "")
            if found is None:
                continue
            if test_id in EARLIER_TESTS:
                raise SystemExit(f"{test_id} has a 'case:' docstring; remove its EARLIER_TESTS entry")
            reason = _xfail_reason(node, source)
            rows.append({"case": found[0], "behaviour": found[1], "test": test_id,
                         "status": "open: " + reason if reason else "tested"})
    missing = sorted(set(EARLIER_TESTS) - defined)
    if missing:
        raise SystemExit("EARLIER_TESTS names tests that do not exist: " + ", ".join(missing))
    rows += [{"case": c, "behaviour": b, "test": t, "status": "tested"} for t, (c, b) in EARLIER_TESTS.items()]
    return sorted(rows, key=lambda r: (r["case"].lower(), r["test"]))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(rows: list[dict[str, str]]) -> str:
    lines = [BEGIN, "## Fault and bad-input catalogue", "",
             "Generated by `python Utilities/fault_catalogue.py` from the tests (docstrings starting with `case:`); "
             "a test fails when this table is stale. *open* = not handled yet (the test is an `xfail` naming the "
             "fix).", "",
             "| Case | Behaviour | Test | Status |", "|---|---|---|---|"]
    lines += [f"| {_cell(r['case'])} | {_cell(r['behaviour'])} | `Testing/{r['test']}` | {_cell(r['status'])} |"
              for r in rows]
    lines.append(END)
    return "\n".join(lines) + "\n"


def updated_readme(text: str, table: str) -> str:
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        return head + table + "\n" + tail
    if ANCHOR not in text:
        raise SystemExit(f"README.md has neither the catalogue markers nor the line {ANCHOR!r}")
    head, tail = text.split(ANCHOR, 1)
    return head + table + "\n" + ANCHOR + tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's table is stale")
    args = parser.parse_args(argv)
    text = README.read_text(encoding="utf-8")
    new = updated_readme(text, render(collect()))
    if args.check:
        if new != text:
            print("README.md's fault catalogue is stale; run: python Utilities/fault_catalogue.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new, encoding="utf-8")
    print(f"{len(collect())} catalogue rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
