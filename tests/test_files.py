"""Properties of lowrank.files: a folder written with write_folder loads as the old files or the new ones
whatever moment the writer is killed at; names that become paths stay inside their folder; leftovers of a
killed write are removed by the next one."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lowrank import models
from lowrank.errors import CheckpointError
from lowrank.files import (JOURNAL_NAME, atomic_write, checked_name, finish_interrupted_write, inside,
                           read_json_object, write_folder)

from .helpers import tiny_gpt2

# The writer is SIGKILLed as it makes the n-th call of one of these (before the call runs): every moment of a
# two-file save. fsync 1 and 2: the two temporary files; fsync 3: the journal's temporary file; replace 1:
# the journal's rename (the commit point); replace 2: the weights' rename; replace 3: the config's (between
# the two files); fsync 4: the folder, after both renames, before the journal is removed.
KILL_POINTS = [("_fsync", 1), ("_fsync", 2), ("_fsync", 3), ("replace", 1), ("replace", 2), ("replace", 3),
               ("_fsync", 4)]

CHILD = textwrap.dedent("""
    import os, signal, sys
    import torch
    from lowrank import files, models
    hook, nth, folder, n_layer = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    calls = []
    target = files if hook == "_fsync" else os
    original = getattr(target, hook)
    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    torch.manual_seed(1)
    model = models.GPT2LMHeadModel(models.GPT2Config(n_embd=32, n_layer=n_layer, n_head=4, vocab_size=64,
                                                     n_positions=64, eos_token_id=None))
    setattr(target, hook, dying)
    model.save_pretrained(folder)
""")


def _killed_save(folder, hook, nth, n_layer):
    result = subprocess.run([sys.executable, "-c", CHILD, hook, str(nth), str(folder), str(n_layer)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr


@pytest.mark.parametrize("hook,nth", KILL_POINTS)
def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_checkpoint(tmp_path, hook, nth):
    old = tiny_gpt2(n_layer=2)
    old.save_pretrained(tmp_path)
    _killed_save(tmp_path, hook, nth, n_layer=3)
    loaded = models.from_pretrained(tmp_path)  # finishes a committed save, or keeps the old one
    committed = (hook == "replace" and nth >= 2) or (hook, nth) == ("_fsync", 4)
    assert loaded.config.n_layer == (3 if committed else 2)
    if not committed:
        for k, v in old.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    assert not (tmp_path / JOURNAL_NAME).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # a dead writer's leftovers go


def test_a_killed_writer_leaves_temporary_files_that_the_next_write_removes(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    _killed_save(tmp_path, "_fsync", 2, n_layer=3)
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 2
    tiny_gpt2().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_temporary_files_of_a_live_process_are_kept(tmp_path):
    mine = tmp_path / f".config.json.{os.getpid()}.0123abcd.tmp"
    mine.write_text("being written")
    atomic_write(tmp_path / "other.txt", lambda tmp: tmp.write_text("x"))
    assert mine.exists()


def test_write_folder_replaces_both_files_and_leaves_others(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    write_folder(tmp_path, {"a.txt": lambda t: t.write_text("1"), "b.txt": lambda t: t.write_text("2")})
    write_folder(tmp_path, {"a.txt": lambda t: t.write_text("3"), "b.txt": lambda t: t.write_text("4")})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.txt": "3", "b.txt": "4", "tokenizer.json": "{}"}


def test_a_failing_writer_changes_nothing(tmp_path):
    write_folder(tmp_path, {"a.txt": lambda t: t.write_text("old a"), "b.txt": lambda t: t.write_text("old b")})

    def fails(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_folder(tmp_path, {"a.txt": lambda t: t.write_text("new a"), "b.txt": fails})
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.txt": "old a", "b.txt": "old b"}


@pytest.mark.parametrize("journal", [
    '{"config.json": "../escape.tmp"}', '{"/etc/passwd": ".x.tmp"}', '["a"]', '{"a": 1}', "not json",
])
def test_a_hostile_journal_is_refused_and_nothing_moves(tmp_path, journal):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / JOURNAL_NAME).write_text(journal)
    with pytest.raises(CheckpointError, match=JOURNAL_NAME):
        finish_interrupted_write(tmp_path)
    assert (tmp_path / "config.json").read_text() == "{}"


@pytest.mark.parametrize("name", ["", ".", "..", "../up", "a/b", "/abs", "a\\b", "a.b", "x\0y", 3, None, "a b"])
def test_a_name_that_could_leave_its_folder_is_refused(name):
    with pytest.raises(ValueError, match="adapter name"):
        checked_name(name, "adapter name")


@pytest.mark.parametrize("name", ["default", "task_1", "A-b", "ünï"])
def test_plain_names_pass(name):
    assert checked_name(name, "adapter name") == name


@pytest.mark.parametrize("name", ["../x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors", "..", "", "a\\b"])
def test_a_file_name_from_a_file_stays_inside_its_folder(tmp_path, name):
    with pytest.raises(CheckpointError, match="index.json"):
        inside(tmp_path, name, "index.json")


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "expected a JSON object, got list"), (b"3", "got int"), (b"{", "not a valid UTF-8 JSON"),
    (b'{"a": "\xff"}', "not a valid UTF-8 JSON"),
])
def test_json_that_is_not_an_object_names_the_file(tmp_path, content, message):
    (tmp_path / "x.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        read_json_object(tmp_path / "x.json")
    assert "x.json" in str(e.value)


def test_the_journal_is_json_naming_plain_files(tmp_path):
    """What a crash after the commit point leaves: the renames to do, by plain names."""
    seen = {}

    def peek(tmp):
        seen.update(json.loads((tmp_path / JOURNAL_NAME).read_text()) if (tmp_path / JOURNAL_NAME).exists() else {})
        tmp.write_text("x")
    write_folder(tmp_path, {"a.txt": lambda t: t.write_text("a")})
    write_folder(tmp_path, {"b.txt": peek})
    assert seen == {}  # the journal is written only after every temporary file
