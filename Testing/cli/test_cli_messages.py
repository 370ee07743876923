"""The first hour with ``m3d``: each message a new user meets names what they can type, and every check that can
run before the model does -- asserted through the command line (``cli.main``, or a real process where the output
stream matters) as the user meets it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading

import pytest

from M3DAssistantLib import AI_LABEL, cli


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the CLI loads a model: every case here must be caught before."""
    monkeypatch.setattr(cli, "_engine", lambda args, bar: pytest.fail("the model was loaded"))
    monkeypatch.setattr("M3DAssistantLib.retrieval.Retriever", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.fixture
def forced_engine(monkeypatch, tiny_phi3_model):
    from forcing import force_answer

    from M3DAssistantLib.engine import InferenceEngine

    undo = []

    def make(args, bar):
        engine = InferenceEngine(tiny_phi3_model)
        undo.append(force_answer(engine, " It is [SEG]."))
        return engine

    monkeypatch.setattr(cli, "_engine", make)
    yield
    for restore in undo:
        restore()


def test_window_error_shows_center_width(no_model, ct_path, capsys):
    """case: --window 40 / --window soft / --window 40,-5 -> refused before the model, showing CENTER,WIDTH"""
    for value in ("40", "soft", "40,abc", "40,-5"):
        assert cli.main(["report", str(ct_path), "--window", value]) == 2
        err = capsys.readouterr().err
        assert f"--window {value!r}" in err and "--window 40,350" in err and "Traceback" not in err, err


def test_existing_output_says_overwrite_as_typed(no_model, ct_path, tmp_path, capsys):
    """case: -o to an existing file -> refused before the model loads, saying --overwrite (not overwrite=True)"""
    out = tmp_path / "report.txt"
    out.write_text("mine")
    assert cli.main(["report", str(ct_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pass --overwrite" in err and "overwrite=True" not in err and out.read_text() == "mine"


def test_output_folder_problems_are_refused_before_the_model(no_model, ct_path, tmp_path, capsys, monkeypatch):
    """case: -o into a missing folder / a dangling symlink / a read-only file system -> refused before the model
    loads, naming the folder or link and the fix"""
    assert cli.main(["segment", str(ct_path), "liver", "-o", str(tmp_path / "nope" / "liver.seg.nrrd")]) == 2
    assert f"the folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    link = tmp_path / "liver.nii.gz"
    link.symlink_to(tmp_path / "gone" / "target.nii.gz")
    assert cli.main(["segment", str(ct_path), "liver", "-o", str(link), "--overwrite"]) == 2
    assert "which does not exist; remove the link" in capsys.readouterr().err
    link.unlink()

    from M3DAssistantLib.outputs import atomic

    real = atomic.tempfile.mkstemp

    def read_only(*args, **kwargs):  # what the OS answers on a read-only mount (root bypasses permission bits)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    assert cli.main(["segment", str(ct_path), "liver", "-o", str(tmp_path / "liver.seg.nrrd")]) == 2
    err = capsys.readouterr().err
    assert "Read-only file system" in err and "choose a folder you can write to" in err
    monkeypatch.setattr(atomic.tempfile, "mkstemp", real)
    assert not list(tmp_path.iterdir())


def test_a_write_that_fails_at_the_end_keeps_the_result(forced_engine, ct_path, tmp_path, capsys, monkeypatch):
    """case: -o checked fine but the write fails after inference (disk filled meanwhile), also with --json -> the
    error is reported, the result is written beside under a free name and the JSON still printed; nothing lost"""
    from M3DAssistantLib import outputs

    target = tmp_path / "liver.seg.nrrd"
    real = outputs.formats.write_segmentation_nrrd

    def disk_full_once(path, *args, **kwargs):
        if os.fspath(path) == os.fspath(target):
            raise outputs.OutputWriteError(errno.ENOSPC, f"could not write {path}: No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(outputs.formats, "write_segmentation_nrrd", disk_full_once)
    code = cli.main(["segment", str(ct_path), "liver", "-o", str(target), "--json", "--quiet",
                     "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 2
    assert "No space left on device" in captured.err
    kept = tmp_path / "liver (2).seg.nrrd"
    assert f"the result was kept in {kept}" in captured.err and kept.is_file() and not target.exists()
    assert json.loads(captured.out)["task"] == "seg"  # --json still prints the whole result


def test_max_new_tokens_is_capped_as_the_server(no_model, ct_path, capsys):
    """case: --max-new-tokens 100000 (or 0) -> refused by the parser, naming the cap the server uses too"""
    from M3DAssistantLib.results import MAX_NEW_TOKENS
    from M3DAssistantLib.serving.guard import ServerLimits

    assert ServerLimits().max_new_tokens == MAX_NEW_TOKENS  # one constant for the CLI and the server
    for value in ("100000", "0"):
        with pytest.raises(SystemExit) as info:
            cli.main(["report", str(ct_path), "--max-new-tokens", value])
        assert info.value.code == 2
        assert f"outside 1..{MAX_NEW_TOKENS}" in capsys.readouterr().err


def test_a_label_map_file_is_refused_naming_the_ct_next_to_it(no_model, data_dir, tmp_path, capsys):
    """case: a TotalSegmentator segmentation.nii.gz given as the volume (file) -> refused before the model, as a
    label map, naming the CT next to it"""
    case = tmp_path / "s0001"
    case.mkdir()
    shutil.copy(data_dir / "example_ct_sm.nii.gz", case / "ct.nii.gz")
    shutil.copy(data_dir / "example_seg.nii.gz", case / "segmentation.nii.gz")
    assert cli.main(["report", str(case / "segmentation.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert "is a label map or mask" in err and str(case / "ct.nii.gz") in err


def test_empty_prompt_and_missing_roi_file_before_the_model(no_model, ct_path, tmp_path, capsys):
    assert cli.main(["segment", str(ct_path), "  "]) == 2
    assert "is empty; type a question or a target name" in capsys.readouterr().err
    assert cli.main(["describe", str(ct_path), "--roi", str(tmp_path / "box.mrk.json")]) == 2
    err = capsys.readouterr().err
    assert f"no ROI file at {tmp_path / 'box.mrk.json'}" in err and "m3d locate" in err


def test_retrieve_and_inspect_name_their_own_model_argument(no_model, ct_path, tmp_path, capsys, monkeypatch):
    """case: m3d retrieve / m3d inspect with a model that is not there -> the message names --clip-model / the
    positional argument, not --model or M3D_MODEL"""
    monkeypatch.undo()  # the real Retriever: it fails on the missing folder before any weights
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cli.main(["retrieve", str(ct_path), "--texts", "a", "b"]) == 2
    err = capsys.readouterr().err
    assert "--clip-model PATH" in err and "--model" not in err.replace("--clip-model", "") and "M3D_MODEL" not in err
    assert cli.main(["retrieve", str(ct_path), "--texts", "a", "b", "--clip-model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "GoodBaiBai88/M3D-CLIP" in err and "M3D-LaMed" not in err
    assert cli.main(["inspect", "Someone/missing-model"]) == 2
    err = capsys.readouterr().err
    assert "m3d inspect PATH" in err and "--model" not in err and "M3D_MODEL" not in err


def test_dicom_errors_come_without_itks_raw_warning(tiny_phi3, data_dir, tmp_path):
    """case: a DICOM folder with a missing slice / without DICOM files -> one line naming the problem, without
    ITK's raw "WARNING: In .../itk...cxx" lines"""
    series = tmp_path / "series"
    shutil.copytree(data_dir / "example_ct_dicom", series)
    sorted(series.iterdir())[7].unlink()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.dcm").write_text("not dicom")
    for folder, message in ((series, "uneven slice spacing"), (junk, "no DICOM series found")):
        done = subprocess.run([sys.executable, "-m", "M3DAssistantLib", "report", str(folder), "--model",
                               str(tiny_phi3), "--quiet"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and message in done.stderr
        assert "WARNING" not in done.stderr and "itk" not in done.stderr.lower(), done.stderr


def test_progress_bar_ends_its_line_before_the_answer(capsys):
    """case: an answer starts streaming while a progress bar is shown -> the bar's line is ended first"""
    import argparse

    from M3DAssistantLib.progress import ProgressEvent

    bar = cli.ProgressBar(True)
    bar(ProgressEvent("generate", 0.1, "1 tokens"))
    assert cli.ProgressBar.open_bars == {bar}
    on_text = cli._stream_printer(argparse.Namespace(json=False), bar)
    on_text(" The liver")
    assert not cli.ProgressBar.open_bars and bar.bar is None
    captured = capsys.readouterr()
    assert captured.out == " The liver"


def _serve_once(handler, context=None):
    """A one-request server on 127.0.0.1 in a thread (TLS with ``context``); returns its port."""
    import http.server

    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.handle_request, daemon=True).start()
    return server.server_address[1]


def test_wrong_token_tells_a_slicer_user_where_the_token_goes():
    """case: a wrong server token -> the message says which token to use and where Slicer's setting is"""
    import http.server

    from M3DAssistantLib.serving.client import M3DClient
    from M3DAssistantLib.serving.protocol import AuthenticationError

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            body = json.dumps({"error": "AuthenticationError", "detail": "missing or wrong token"}).encode()
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    port = _serve_once(Refuse)
    with pytest.raises(AuthenticationError) as info:
        M3DClient(f"http://127.0.0.1:{port}", "wrong-token").health()
    text = str(info.value)
    assert "refused the token" in text and "--token-file" in text and "Server token:" in text


def test_https_hostname_mismatch_is_called_a_hostname_mismatch(tmp_path):
    """case: an https server whose certificate is for another host name -> the message says hostname mismatch and
    what to do, not a bare SSL error"""
    import http.server

    import trustme

    from M3DAssistantLib.serving.client import M3DClient
    from M3DAssistantLib.serving.protocol import ServerUnavailableError

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("gpu-box.example").configure_cert(context)
    port = _serve_once(http.server.BaseHTTPRequestHandler, context)
    with pytest.raises(ServerUnavailableError) as info:
        M3DClient(f"https://127.0.0.1:{port}", "t" * 32, ca_file=str(tmp_path / "ca.pem")).health()
    text = str(info.value)
    assert "hostname mismatch" in text and "'127.0.0.1'" in text and "subjectAltName" in text


def test_report_file_says_ai_generated(forced_engine, ct_path, tmp_path):
    assert cli.main(["report", str(ct_path), "-o", str(tmp_path / "r.txt"), "--quiet", "--max-new-tokens", "4"]) == 0
    assert (tmp_path / "r.txt").read_text().rstrip().endswith(f"[{AI_LABEL}]")


def test_progress_after_the_answer_started_draws_no_new_bar(capsys):
    from M3DAssistantLib.progress import ProgressEvent

    bar = cli.ProgressBar(True)
    bar(ProgressEvent("generate", 0.1, "1 tokens"))
    bar.stop()
    bar(ProgressEvent("generate", 0.2, "2 tokens"))  # the stream goes on: no bar between the words
    assert bar.bar is None and not cli.ProgressBar.open_bars
