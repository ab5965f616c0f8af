"""Which checkpoint a resume loads when the newest cannot be read (tidal.driver.checkpoint):
the one before it, with one warning naming the file; none readable is a user error; the
unreadable one is never deleted or replaced in place. Pure file logic: no Ray."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tidal.driver import checkpoint as ck
from tidal.driver.preflight import check_resume


def _write(run: Path, step: int, keep: int = ck.KEEP) -> Path:
    """A checkpoint with the files an RL checkpoint holds (driver state, RNG, a learner file)."""
    def write(d: Path) -> None:
        ck.DriverState(step=step, weight_version=step, kl_controller={"value": 0.1}, reward_state={},
                       data_state={"epoch": 0}).save(d)
        (d / "learner").mkdir()
        torch.save({"w": torch.full((64,), float(step))}, d / "learner" / "model_states.pt")
    return ck.write_checkpoint(run, step, write, keep=keep)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_retention_keeps_the_two_newest(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-000002", "step-000003"]


def _flip_middle_byte(path: Path) -> None:
    """Same size, one byte changed inside the stored tensor: only the CRC check sees it."""
    data = bytearray(path.read_bytes())
    z = zipfile.ZipFile(path)
    info = max(z.infolist(), key=lambda i: i.file_size)  # the tensor payload
    at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, reason", [
    (lambda d: _truncate(d / "learner" / "model_states.pt"), "truncated"),
    (lambda d: _truncate(d / "rng.pt"), "truncated"),
    (lambda d: (d / "driver_state.json").write_text('{"step": 4, '), "truncated"),
    (lambda d: (d / "rng.pt").unlink(), "missing"),
    (lambda d: (d / "learner" / "model_states.pt").unlink(), "missing"),
    (lambda d: _flip_middle_byte(d / "learner" / "model_states.pt"), "is corrupt"),
])
def test_unreadable_newest_falls_back_with_one_warning(tmp_path, capsys, damage, reason):
    _write(tmp_path, 2)
    newest = _write(tmp_path, 4)
    damage(newest)
    before = _tree(tmp_path)
    assert ck.resume_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-000002"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-000004" in err[0] and reason in err[0] and "step-000002" in err[0], err
    # preflight, the driver and the RL loop each ask: the same answer, and no second warning
    assert ck.resume_checkpoint(tmp_path).name == "step-000002"
    check_resume(tmp_path)
    assert capsys.readouterr().err == ""
    assert _tree(tmp_path) == before  # choosing moved, deleted and rewrote nothing


def test_the_warning_names_the_bad_file(tmp_path, capsys):
    _write(tmp_path, 1)
    bad = _write(tmp_path, 2) / "learner" / "model_states.pt"
    _truncate(bad)
    ck.resume_checkpoint(tmp_path)
    assert str(bad) in capsys.readouterr().err


def test_no_readable_checkpoint_is_a_user_error_naming_every_file(tmp_path):
    _truncate(_write(tmp_path, 1) / "rng.pt")
    (_write(tmp_path, 2) / "driver_state.json").write_text("not json")
    with pytest.raises(ck.CheckpointError) as e:
        ck.resume_checkpoint(tmp_path)
    assert "step-000001/rng.pt" in str(e.value) and "step-000002/driver_state.json" in str(e.value)
    with pytest.raises(ck.CheckpointError):  # preflight says the same, before Ray starts
        check_resume(tmp_path)


def test_no_checkpoint_at_all_resumes_from_the_start(tmp_path):
    assert ck.resume_checkpoint(tmp_path) is None
    assert ck.resume_point(tmp_path) == ck.ResumePoint(None)


def test_reaching_the_unreadable_step_again_keeps_it_aside(tmp_path, capsys):
    _write(tmp_path, 2)
    corrupt = _write(tmp_path, 4)
    _truncate(corrupt / "rng.pt")
    kept = _tree(corrupt)
    assert ck.resume_checkpoint(tmp_path).name == "step-000002"
    capsys.readouterr()
    # the resumed run checkpoints step 3: the newer, unreadable step 4 is neither pruned nor counted
    _write(tmp_path, 3)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000003", "step-000004"]
    assert ck.resume_checkpoint(tmp_path).name == "step-000003"  # `latest` names the newest written
    # ... then step 4 itself: the unreadable folder is renamed aside, with a warning, not replaced
    _write(tmp_path, 4)
    err = capsys.readouterr().err
    aside = [p for p in root.iterdir() if p.name.startswith("step-000004.corrupt-")]
    assert len(aside) == 1 and _tree(aside[0]) == kept
    assert "rng.pt" in err and aside[0].name in err
    assert ck.resume_checkpoint(tmp_path).name == "step-000004"
    # later checkpoints prune the old good ones, never the set-aside folder
    _write(tmp_path, 5)
    _write(tmp_path, 6)
    names = sorted(p.name for p in root.iterdir())
    assert names == sorted(["latest", "step-000005", "step-000006", aside[0].name])


def test_rewriting_a_readable_step_replaces_it_quietly(tmp_path, capsys):
    _write(tmp_path, 5)
    _write(tmp_path, 5)
    assert capsys.readouterr().err == ""
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if "corrupt" in p.name] == []


def test_a_corrupt_latest_pointer_target_with_an_older_good_one(tmp_path, capsys):
    """`latest` names the unreadable one and the step order agrees: the older one is used."""
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    (tmp_path / "checkpoints" / "step-000002" / "COMPLETE").write_text(json.dumps({"step": 2}))
    _truncate(tmp_path / "checkpoints" / "step-000002" / "learner" / "model_states.pt")
    point = ck.resume_point(tmp_path)
    assert point.checkpoint.name == "step-000001"
    assert [(c.name, f.name) for c, f, _ in point.skipped] == [("step-000002", "model_states.pt")]


def test_the_complete_marker_lists_every_file_and_its_size(tmp_path):
    d = _write(tmp_path, 1)
    listed = json.loads((d / "COMPLETE").read_text())
    assert listed["step"] == 1
    assert listed["files"] == {p.relative_to(d).as_posix(): p.stat().st_size for p in d.rglob("*")
                               if p.is_file() and p.name != "COMPLETE"}
    assert {"driver_state.json", "rng.pt", "learner/model_states.pt"} <= set(listed["files"])


def test_a_checkpoint_that_does_not_read_back_is_never_published(tmp_path):
    """Verified before it counts: the older checkpoints stay, `latest` does not move."""
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    before = _tree(tmp_path)

    def bad(d: Path) -> None:
        (d / "rng.pt").write_bytes(b"PK\x03\x04 not really a zip")

    with pytest.raises(OSError, match=r"rng\.pt does not read back"):
        ck.write_checkpoint(tmp_path, 3, bad)
    assert ck.resume_checkpoint(tmp_path).name == "step-000002"
    assert {k: v for k, v in _tree(tmp_path).items() if not k.startswith("checkpoints/.tmp-")} == before
    _write(tmp_path, 3)  # the next good write clears the leftover and prunes step 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002", "step-000003"]


def test_a_write_killed_midway_is_named_and_passed_over(tmp_path, capsys):
    """What SIGKILL during a checkpoint leaves: a .tmp folder without the COMPLETE marker."""
    _write(tmp_path, 2)
    cut = tmp_path / "checkpoints" / ".tmp-step-000004-4242"
    (cut / "learner").mkdir(parents=True)
    (cut / "driver_state.json").write_text("{}")
    assert ck.resume_checkpoint(tmp_path).name == "step-000002"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cut) in err[0] and "unfinished" in err[0] and "step-000002" in err[0], err


def test_a_write_killed_before_the_first_checkpoint_restarts_the_stage(tmp_path, capsys):
    cut = tmp_path / "checkpoints" / ".tmp-step-000001-4242"
    cut.mkdir(parents=True)
    assert ck.resume_checkpoint(tmp_path) is None  # not an error: the stage starts again
    err = capsys.readouterr().err
    assert str(cut) in err and "beginning" in err


def test_a_checkpoint_from_before_manifests_must_hold_the_required_files(tmp_path, capsys):
    old = _write(tmp_path, 1)
    (old / "COMPLETE").write_text(json.dumps({"step": 1}))  # the marker older versions wrote
    assert ck.checkpoint_problem(old) is None
    shutil.rmtree(old / "learner")
    assert ck.checkpoint_problem(old) == (old / "learner", "missing")


def test_a_folder_at_the_step_that_is_no_checkpoint_is_kept_aside(tmp_path, capsys):
    """A step folder without COMPLETE (a copy cut short, a folder made by hand) is not tidal's
    to delete: writing that step renames it aside."""
    mine = tmp_path / "checkpoints" / "step-000003"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    _write(tmp_path, 3)
    aside = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-000003.corrupt-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "keep me"
    assert "COMPLETE" in capsys.readouterr().err
    assert ck.resume_checkpoint(tmp_path).name == "step-000003"
