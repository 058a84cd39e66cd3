"""CheckpointManager folders / COMPLETE / pruning, and the exact state round trip."""

import random

import pytest
import torch

from tunelab.errors import CheckpointError
from tunelab.training.checkpointing import (
    COMPLETE,
    CheckpointManager,
    ResumableSampler,
    TrainingProgress,
    load_state,
    save_state,
    state_writer,
)
from tunelab.training.schedules import build_lr_scheduler


def _write_file(name):
    def write(folder):
        folder.mkdir(parents=True)
        (folder / name).write_text("x")

    return write


def test_save_layout_complete_and_prune(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last_n=2)
    for step in (1, 2, 3):
        d = mgr.save(step, {"adapter": _write_file("a.txt"), "state": _write_file("s.txt")})
        assert (d / COMPLETE).is_file() and (d / "adapter" / "a.txt").is_file()
    assert mgr.complete_steps() == [2, 3]
    assert not (tmp_path / "step_1").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_folder_without_complete_is_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last_n=5)
    mgr.save(2, {"state": _write_file("s")})
    (tmp_path / "step_4" / "state").mkdir(parents=True)  # killed mid-write: no COMPLETE
    assert mgr.latest_complete() == tmp_path / "step_2"
    # the next save of step 4 replaces the broken folder
    mgr.save(4, {"state": _write_file("s")})
    assert mgr.latest_complete() == tmp_path / "step_4"


def test_failed_writer_leaves_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last_n=1)
    mgr.save(1, {"state": _write_file("s")})

    def boom(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        mgr.save(2, {"state": boom})
    assert mgr.complete_steps() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]


def test_keep_last_n_must_be_positive(tmp_path):
    with pytest.raises(CheckpointError, match="keep_last_n_checkpoints"):
        CheckpointManager(tmp_path, keep_last_n=0)


def _model_opt(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)  # a frozen base weight is not saved
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    sched = build_lr_scheduler(opt, warmup_steps=2, total_steps=10, schedule="cosine")
    return model, opt, sched


def _train(model, opt, sched, n):
    losses = []
    for _ in range(n):
        x = torch.randn(3, 4)
        loss = torch.nn.functional.dropout(model(x), 0.3).pow(2).mean()
        loss.backward()
        opt.step(); sched.step(); opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_state_roundtrip_gives_identical_continuation(tmp_path):
    """Save after 3 steps, restore into fresh objects: the next steps match bit for bit
    (fp32 on cpu is deterministic, so exact equality is the right tolerance)."""
    model, opt, sched = _model_opt(0)
    _train(model, opt, sched, 3)
    random.random()
    save_state(tmp_path / "state", progress=TrainingProgress(step=3, epoch=1, batches_consumed=5, sampler_seed=7),
               model=model, optimizer=opt, scheduler=sched)
    expected = _train(model, opt, sched, 4)
    py_expected = random.random()

    model2, opt2, sched2 = _model_opt(1)  # different init: everything must come from the files
    with torch.no_grad():
        model2[0].weight.copy_(model[0].weight)  # the frozen base comes from the base checkpoint
    progress = load_state(tmp_path / "state", model=model2, optimizer=opt2, scheduler=sched2)
    assert progress == TrainingProgress(step=3, epoch=1, batches_consumed=5, sampler_seed=7)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    assert _train(model2, opt2, sched2, 4) == expected
    assert random.random() == py_expected
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert not list((tmp_path / "state").glob("*.pt")) and not list((tmp_path / "state").glob("*.bin"))


def test_state_mismatch_is_one_line_error(tmp_path):
    model, opt, sched = _model_opt(0)
    save_state(tmp_path / "s", progress=TrainingProgress(), model=model)
    other = torch.nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match="trainable parameters do not match"):
        load_state(tmp_path / "s", model=other)
    with pytest.raises(CheckpointError, match="not a tunelab state folder"):
        load_state(tmp_path / "nothing")


def test_state_writer_freezes_progress(tmp_path):
    progress = TrainingProgress(step=1)
    write = state_writer(progress)
    progress.step = 99
    write(tmp_path / "s")
    assert load_state(tmp_path / "s", restore_rng=False).step == 1


def test_resumable_sampler():
    s = ResumableSampler(10, seed=3)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert sorted(e0) == list(range(10)) and e0 != e1
    s.set_epoch(0, start_sample=4)
    assert list(s) == e0[4:] and len(s) == 6
    assert list(ResumableSampler(10, seed=3)) == e0  # independent of the global RNG


def test_prune_drops_the_marker_before_the_files(tmp_path, monkeypatch):
    """A kill while pruning an old step must not leave COMPLETE beside missing files: the marker
    is gone before any file of the folder is deleted."""
    import tunelab.training.checkpointing as checkpointing

    mgr = CheckpointManager(tmp_path, keep_last_n=1)
    mgr.save(1, {"state": _write_file("s")})
    marker_at_delete = []
    real_rmtree = checkpointing.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if path.name == "step_1":
            marker_at_delete.append((path / COMPLETE).exists())
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.shutil, "rmtree", rmtree)
    mgr.save(2, {"state": _write_file("s")})
    assert marker_at_delete == [False] and mgr.complete_steps() == [2]


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    import errno

    mgr = CheckpointManager(tmp_path, keep_last_n=1)
    mgr.save(1, {"state": _write_file("s")})

    def full(folder):
        folder.mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="saving step_2 failed \\(No space left on device\\)") as info:
        mgr.save(2, {"state": full})
    assert "\n" not in str(info.value) and str(tmp_path / "step_1") in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"] and mgr.damage(tmp_path / "step_1") is None
