"""Checkpoints that cannot silently poison a run: checksums, one clear error per kind of bad file, settings
checked on resume, diverged runs stopped before they write, atomic writes, stale temporaries removed."""
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import needs_ptb
from hyperfused.train import charlm
from hyperfused.train import checkpoint as ck_io
from hyperfused.train.determinism import deterministic_algorithms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden", "16", "--hyper-size", "8", "--hyper-embed", "2", "--embed", "8", "--batch-size", "4",
        "--seq-len", "10", "--train-limit", "4000", "--eval-limit", "200", "--quiet"]


# -- the file format ----------------------------------------------------------------------------------------

def test_round_trip_and_checksum(tmp_path):
    path = str(tmp_path / "ck.pt")
    state = dict(step=3, w=torch.arange(6.0), rng=torch.get_rng_state(), args=dict(lr=1e-3, log=None))
    ck_io.save(state, path)
    back = ck_io.load(path)
    assert back["step"] == 3 and torch.equal(back["w"], state["w"]) and back["args"] == state["args"]


def _flip_a_payload_byte(path):
    outer = torch.load(path, weights_only=True)
    payload = bytearray(outer["payload"])
    payload[len(payload) // 2] ^= 0x40
    outer["payload"] = bytes(payload)
    torch.save(outer, path)


@pytest.mark.parametrize("damage, match", [
    (lambda p: _flip_a_payload_byte(p), r"is corrupted: the checksum of its contents does not match"),
    (lambda p: open(p, "wb").close(), r"is empty \(0 bytes\): not a checkpoint"),
    (lambda p: open(p, "r+b").truncate(os.path.getsize(p) // 2), r"is not a readable checkpoint .*truncated"),
    (lambda p: open(p, "wb").write(os.urandom(3000)), r"is not a readable checkpoint \(3000 bytes"),
    # garbage on which the unpickler fails with an IndexError (seed 2) or a KeyError (seed 20), not an
    # UnpicklingError: the random case above hit them now and then
    (lambda p: open(p, "wb").write(random.Random(2).randbytes(3000)), r"is not a readable checkpoint \(3000 bytes"),
    (lambda p: open(p, "wb").write(random.Random(20).randbytes(3000)), r"is not a readable checkpoint \(3000 bytes"),
    (lambda p: torch.save({"rnn.weight": torch.zeros(2)}, p), r"holds a model state_dict \(as --save-final writes\)"),
    (lambda p: torch.save([1, 2, 3], p), r"is not a training checkpoint \(a list"),
])
def test_each_bad_file_is_one_clear_error(tmp_path, damage, match):
    path = str(tmp_path / "ck.pt")
    ck_io.save(dict(step=1, w=torch.randn(1000)), path)
    damage(path)
    with pytest.raises(ck_io.CheckpointError, match=match):
        ck_io.load(path)


def test_write_interrupted_at_the_rename_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    ck_io.save(dict(step=1), path)

    def killed(src, dst):
        raise KeyboardInterrupt  # the process dies between writing the new file and renaming it
    monkeypatch.setattr(ck_io.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ck_io.save(dict(step=2), path)
    monkeypatch.undo()
    assert ck_io.load(path)["step"] == 1
    assert os.path.exists(f"{path}.tmp.{os.getpid()}")  # what a killed writer leaves behind


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    path = str(tmp_path / "ck.pt")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale, alive = f"{path}.tmp.{dead}", f"{path}.tmp.{os.getppid()}"
    for f in (stale, alive):
        open(f, "wb").write(b"partial")
    ck_io.save(dict(step=1), path)
    assert not os.path.exists(stale) and os.path.exists(alive)  # a live writer's file is left alone


# -- resuming a charlm run ------------------------------------------------------------------------------------

def _train(*extra):
    return charlm.train(charlm.parse_args(TINY + list(extra)))


@needs_ptb
def test_corrupted_checkpoint_stops_resume_with_an_error(tmp_path):
    ck = str(tmp_path / "ck.pt")
    _train("--steps", "2", "--checkpoint", ck)
    _flip_a_payload_byte(ck)
    with pytest.raises(SystemExit, match=r"error: .*ck.pt is corrupted"):
        _train("--steps", "4", "--checkpoint", ck, "--resume")


@needs_ptb
@pytest.mark.parametrize("change, match", [
    (["--batch-size", "8"], r"written with --batch-size 4 \(this run: 8\)"),
    (["--seq-len", "12"], r"--seq-len 10 \(this run: 12\)"),
    (["--hidden", "20"], r"--hidden 16 \(this run: 20\)"),
    (["--model", "lstm"], r"--model 'ln-hyperlstm' \(this run: 'lstm'\)"),
])
def test_resume_refuses_settings_that_break_it(tmp_path, change, match):
    ck = str(tmp_path / "ck.pt")
    _train("--steps", "2", "--checkpoint", ck)
    args = TINY + ["--steps", "4", "--checkpoint", ck, "--resume"]
    for i in range(0, len(change), 2):
        if change[i] in args:
            args[args.index(change[i]) + 1] = change[i + 1]
        else:
            args += change[i:i + 2]
    with pytest.raises(SystemExit, match=match):
        charlm.train(charlm.parse_args(args))


@needs_ptb
def test_resume_applies_a_new_learning_rate_and_says_so(tmp_path, capsys):
    ck = str(tmp_path / "ck.pt")
    _train("--steps", "2", "--checkpoint", ck, "--lr", "1e-3")
    args = [a for a in TINY if a != "--quiet"] + ["--steps", "3", "--checkpoint", ck, "--resume", "--lr", "5e-4"]
    charlm.train(charlm.parse_args(args))
    assert "note: resuming with --lr 0.0005 (the checkpoint has 0.001): applied from step 2 on" in capsys.readouterr().out
    saved = ck_io.load(ck)
    assert saved["optimizer"]["param_groups"][0]["lr"] == 5e-4 and saved["step"] == 3


@needs_ptb
def test_a_run_ending_between_checkpoints_writes_a_final_one(tmp_path):
    ck = str(tmp_path / "ck.pt")
    _train("--steps", "5", "--checkpoint", ck, "--checkpoint-every", "2")
    assert ck_io.load(ck)["step"] == 5


@needs_ptb
def test_diverged_run_stops_with_an_error_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    ck = str(tmp_path / "ck.pt")
    real_step = torch.optim.Adam.step

    def poisoned(self, *a, **kw):
        out = real_step(self, *a, **kw)
        self._calls = getattr(self, "_calls", 0) + 1
        if self._calls == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out
    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    with pytest.raises(SystemExit, match=r"error: training diverged at step [34]: .* is not finite; the last good "
                                         r"checkpoint .*ck.pt is kept"):
        _train("--steps", "8", "--checkpoint", ck, "--checkpoint-every", "2")
    saved = ck_io.load(ck)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())


@needs_ptb
def test_diverged_command_line_run_exits_non_zero(tmp_path):
    """A run that goes to NaN used to print 'valid nan bpc' and exit 0."""
    r = subprocess.run([sys.executable, "-m", "hyperfused.train", "charlm", *TINY, "--steps", "30", "--lr", "1e30",
                        "--clip", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "error: training diverged" in r.stderr, (r.returncode, r.stdout[-500:], r.stderr[-500:])


@needs_ptb
def test_kill_9_at_any_moment_leaves_a_loadable_checkpoint_and_an_exact_resume(tmp_path):
    import signal
    import time
    common = TINY + ["--steps", "60", "--dropout", "0.1"]
    straight = str(tmp_path / "straight.pt")
    _train(*common[len(TINY):], "--save-final", straight)
    ck = str(tmp_path / "ck.pt")
    cmd = [sys.executable, "-m", "hyperfused.train", "charlm", *common, "--checkpoint", ck, "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not os.path.exists(ck) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the middle of the run, checkpoint writes included
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = ck_io.load(ck)["step"]
    assert 0 < step <= 60
    resumed = str(tmp_path / "resumed.pt")
    charlm.train(charlm.parse_args(common + ["--checkpoint", ck, "--resume", "--save-final", resumed]))
    a, b = torch.load(straight), torch.load(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fails", [False, True], ids=["returns", "raises"])
def test_deterministic_holds_for_the_run_only(fails, monkeypatch):
    """--deterministic turns torch's deterministic algorithms on for the run, strictly (on the CPU: no library
    measured, every product in at::mm, so a run resumed in another process continues bit for bit), and gives the
    caller's setting back after it, both flags, however the run ends. The caller here runs them warn-only."""
    seen = []

    def setting():
        return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()

    def run(args):
        seen.append(setting())
        if fails:
            raise RuntimeError("stopped")
        return {}, None

    monkeypatch.setattr(charlm, "_train", run)
    with deterministic_algorithms(warn_only=True):
        for extra in (["--deterministic"], []):
            try:
                charlm.train(charlm.parse_args(TINY + extra))
            except RuntimeError:
                assert fails
        after = setting()
    assert seen == [(True, False), (True, True)] and after == (True, True)


@needs_ptb
def test_sample_prints_characters_from_a_trained_checkpoint(tmp_path, capsys):
    ck = str(tmp_path / "ck.pt")
    _train("--steps", "3", "--checkpoint", ck)
    base = TINY + ["--checkpoint", ck, "--sample", "40", "--prompt", "the ", "--temperature", "0.8"]
    charlm.main(base)
    first = capsys.readouterr().out.rstrip("\n")
    assert first.startswith("the ") and len(first) == 44
    charlm.main(base)
    assert capsys.readouterr().out.rstrip("\n") == first  # --seed fixes the draw
    charlm.main(base[:-1] + ["0.3"] + ["--seed", "7"])
    assert capsys.readouterr().out.rstrip("\n") != first
    with pytest.raises(SystemExit, match=r"--temperature: expected a positive number"):
        charlm.main(base[:-1] + ["0"])
    with pytest.raises(SystemExit, match=r"--prompt: expected non-empty text of Penn Treebank characters; \['§'\]"):
        charlm.main(TINY + ["--checkpoint", ck, "--sample", "5", "--prompt", "§"])
