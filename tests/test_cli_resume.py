"""``ntt predict`` keeps finished images in a journal: Ctrl-C, a kill mid-record and re-runs lose,
duplicate or half-write nothing; existing outputs are refused before any compute; exit codes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from test_cli import TINY, build_one_shot_bank, error_line, models, run

from ntt_core import journal as journal_module
from ntt_core.cli import EXIT_ALL_FAILED, EXIT_INTERRUPTED, main
from ntt_core.cli import predict as cli
from ntt_core.journal import Journal, JournalError, journal_path
from ntt_core.predictor import Predictor


@pytest.fixture(scope="module")
def bank(folder, tiny_models, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bank") / "bank"
    build_one_shot_bank(folder, tiny_models, path)
    return path


@pytest.fixture(scope="module")
def predict(folder, tiny_models, bank):
    """``predict(capsys, out, *options)``: ``ntt predict`` of the test folder with the one-shot bank
    and the tiny models into ``out``; returns (exit code, stdout, stderr)."""
    argv = ["predict", "--memory", bank, "--images", folder / "images", *models(tiny_models), *TINY]
    return lambda capsys, out, *extra: run(capsys, *argv, "--out", out, *extra)


def outputs(out: Path) -> tuple[list, dict]:
    return json.loads(out.read_text()), json.loads(out.with_name(out.stem + "_targets.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(folder, tiny_models, bank, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "r.json"
    argv = ["predict", "--memory", bank, "--images", folder / "images", *models(tiny_models), *TINY]
    assert main([str(a) for a in [*argv, "--out", out]]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.json", "r_targets.json"]  # no journal left
    return outputs(out)


def interrupt_after(monkeypatch, images: int) -> None:
    """Send this process a real SIGINT once ``images`` images have been predicted."""
    real = Predictor.predict_paths
    done = []

    def predict_then_interrupt(self, paths):
        results = real(self, paths)
        done.extend(paths)
        if len(done) == images:
            os.kill(os.getpid(), signal.SIGINT)
        return results

    monkeypatch.setattr(Predictor, "predict_paths", predict_then_interrupt)


def test_ctrl_c_stops_after_the_current_image_and_resume_gives_the_uninterrupted_results(
    predict, uninterrupted, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "r.json"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        code, _, err = predict(capsys, out)
    assert code == EXIT_INTERRUPTED == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"ntt: interrupted: 2 of 4 images done, kept in {out}.journal; run the same command with --resume to finish"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json.journal"]

    code, _, err = predict(capsys, out)
    assert code == 2 and "an interrupted run into" in error_line(err) and "add --resume" in error_line(err)

    code, _, err = predict(capsys, out, "--resume")
    assert code == 0 and "ntt: resuming: 2 of 4 images already done" in err
    assert outputs(out) == uninterrupted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r_targets.json"]


def test_a_record_cut_by_a_kill_is_redone_and_nothing_else(predict, uninterrupted, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        assert predict(capsys, out)[0] == EXIT_INTERRUPTED
    journal = journal_path(out)
    lines = journal.read_text().splitlines(keepends=True)
    assert len(lines) == 4  # the header and three images
    journal.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # killed while writing image 3
    header, records, _ = journal_module.read(journal)
    assert sorted(records) == [0, 1]

    code, _, err = predict(capsys, out, "--resume")
    assert code == 0 and "ntt: resuming: 2 of 4 images already done" in err
    assert outputs(out) == uninterrupted


def test_ctrl_c_while_writing_the_results_keeps_the_journal(predict, uninterrupted, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    with monkeypatch.context() as patch:

        def interrupted(self, results):
            raise KeyboardInterrupt

        patch.setattr(cli.ResultsWriter, "write", interrupted)
        code, _, err = predict(capsys, out)
    assert code == EXIT_INTERRUPTED and "run the same command with --resume to write the results" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json.journal"]  # no partial results file
    assert predict(capsys, out, "--resume")[0] == 0
    assert outputs(out) == uninterrupted


@pytest.mark.bad_input
def test_resuming_with_other_settings_is_refused(predict, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r.json"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        assert predict(capsys, out)[0] == EXIT_INTERRUPTED
    before = journal_path(out).read_bytes()
    with monkeypatch.context() as patch:  # refused before the models load
        patch.setattr(cli, "load_segmenter", lambda *args: pytest.fail("models loaded for a foreign journal"))
        code, _, err = predict(capsys, out, "--resume", "--max-detections", "3")
    assert code == 2 and "the interrupted run used a different settings; resuming would mix results" in error_line(err)
    code, _, err = predict(capsys, out, "--resume", "--dtype", "bfloat16")  # other numbers than float32's
    assert code == 2 and "the interrupted run used a different dtype; resuming would mix results" in error_line(err)
    assert journal_path(out).read_bytes() == before  # kept for a resume with the right settings
    code, _, _ = predict(capsys, out, "--overwrite", "--max-detections", "3")
    assert code == 0 and not journal_path(out).exists()


@pytest.mark.bad_input
def test_existing_or_unwritable_outputs_are_refused_before_any_compute(folder, tmp_path, capsys):
    """Every check below fails before the (missing) bank and models would be loaded."""
    nothing = ["--memory", tmp_path / "nobank", "--sam2", tmp_path / "nosam2", "--dinov2", tmp_path / "nodino"]
    (tmp_path / "r.json").write_text("[]")
    (tmp_path / "s_targets.json").write_text("{}")
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "file").write_text("")
    (tmp_path / "p.json.partial").mkdir()  # where the results are written before taking their name
    cases = [
        ("p.json", f"a temporary file {tmp_path / 'p.json.partial'} is a folder: give a file name"),
        ("r.json", f"--out {tmp_path / 'r.json'} exists: add --overwrite to replace it"),
        ("s.json", f"the targets file {tmp_path / 's_targets.json'} exists: add --overwrite to replace it"),
        ("folder.json", f"--out {tmp_path / 'folder.json'} is a folder: give a file name"),
        ("file/r.json", f"--out {tmp_path / 'file' / 'r.json'}: {tmp_path / 'file'} is a file, not a folder"),
    ]
    before = sorted(tmp_path.rglob("*"))
    for name, message in cases:
        code, _, err = run(capsys, "predict", *nothing, "--images", folder / "images", "--out", tmp_path / name)
        assert code == 2 and error_line(err) == f"ntt: error: {message}"
    assert sorted(tmp_path.rglob("*")) == before  # nothing left behind


@pytest.mark.bad_input
def test_build_memory_refuses_an_existing_bank_file_or_folder_before_any_compute(
    folder,
    tiny_models,
    bank,
    tmp_path,
    capsys,
):
    argv = ["build-memory", "--references", folder / "annotations.json", "--images", folder / "images"]
    nothing = ["--dinov2", tmp_path / "nodino", "--sam2", tmp_path / "nosam2", "--device", "cpu"]
    (tmp_path / "file").write_text("")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    cases = [
        (bank, f"--out {bank} holds a memory bank: add --overwrite to replace it"),
        (tmp_path / "file", f"--out {tmp_path / 'file'} is a file, not a memory bank folder: give a folder name"),
        (
            tmp_path / "other",
            f"--out {tmp_path / 'other'} is a folder that is not a memory bank: give a new or empty folder",
        ),
    ]
    for out, message in cases:
        for extra in ([], ["--overwrite"]) if out != bank else ([],):
            code, _, err = run(capsys, *argv, "--out", out, *nothing, *extra)
            assert code == 2 and error_line(err) == f"ntt: error: {message}"
    built = bank.parent / "rebuilt"
    build_one_shot_bank(folder, tiny_models, built)
    code, _, _ = run(
        capsys, *argv, "--out", built, "--shots", 1, *models(tiny_models), "--device", "cpu", "--overwrite"
    )
    assert code == 0 and (built / "manifest.json").is_file()


@pytest.mark.bad_input
def test_every_image_failing_exits_1_and_writes_nothing(folder, tiny_models, bank, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(b"not a png")
    out = tmp_path / "out" / "r.json"
    code, out_text, err = run(
        capsys, "predict", "--memory", bank, "--images", images, "--out", out, *models(tiny_models), *TINY
    )
    assert code == EXIT_ALL_FAILED == 1 and "wrote" not in out_text
    line = error_line(err)
    assert line.startswith("ntt: error: every image failed (2): ") and "a.png: unreadable or corrupt image" in line
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_journal_lines_survive_cuts_and_foreign_journals_are_refused(tmp_path):
    path = tmp_path / "r.json.journal"
    journal = Journal.create(path, {"bank": "x", "settings": {"a": (1, 2)}})
    journal.append({"index": 0}, [])
    journal.close()
    path.write_bytes(path.read_bytes() + b'{"index": 1, "payl')
    resumed = Journal.resume(path, {"bank": "x", "settings": {"a": [1, 2]}})  # tuples read back as lists
    assert resumed.records == {0: {"index": 0}}
    resumed.append({"index": 1, "size": [2, 3]}, [{"score": 1.0}])
    resumed.close()
    assert journal_module.read(path)[1] == {0: {"index": 0}, 1: {"index": 1, "size": [2, 3]}}  # payloads: on disk
    assert list(resumed.payloads()) == [(0, []), (1, [{"score": 1.0}])]
    with pytest.raises(JournalError, match="used a different bank; resuming would mix results"):
        Journal.resume(path, {"bank": "y", "settings": {"a": [1, 2]}})
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{damaged", lines[2]]) + "\n")
    with pytest.raises(JournalError, match="line 2 is damaged; start again with --overwrite"):
        Journal.resume(path, {"bank": "x", "settings": {"a": [1, 2]}})
    journal_module.check_resumable(path, {"bank": "x"})  # only the first line is read
    with pytest.raises(JournalError, match="used a different bank; resuming would mix results"):
        journal_module.check_resumable(path, {"bank": "y"})
    path.write_text("\n".join([lines[0], "5"]) + "\n")  # JSON, but not a record
    with pytest.raises(JournalError, match="a record without its item index; start again with --overwrite"):
        Journal.resume(path, {"bank": "x", "settings": {"a": [1, 2]}})
    path.write_bytes(b'{"journal": 1, "ru')  # killed while writing the header: nothing was finished
    assert Journal.resume(path, {"bank": "x"}).records == {}


def test_ctrl_c_in_build_memory_is_one_line_and_exit_130(folder, tiny_models, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("ntt_core.memory_bank.build_memory_bank", interrupted)
    argv = ["build-memory", "--references", folder / "annotations.json", "--images", folder / "images"]
    code, _, err = run(capsys, *argv, "--out", tmp_path / "bank", *models(tiny_models), "--device", "cpu")
    assert code == EXIT_INTERRUPTED and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "ntt: interrupted"
    assert not (tmp_path / "bank").exists()
