"""The per-VM state file (vhostser.state): round trip, atomic save, bad files → fresh state."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostser import state
from vhostser.state import VERSION, PortState, VMState

LOGGER = "vhostser.state"

port_states = st.builds(
    PortState,
    next_session_id=st.integers(1, 2**53),
    guest_open=st.booleans(),
    session_id=st.none() | st.integers(0, 2**53),
)
vm_states = st.builds(VMState, ports=st.dictionaries(st.integers(0, 30), port_states, max_size=8))


@given(vm=vm_states)
def test_json_round_trip(vm: VMState) -> None:
    assert VMState.from_json(vm.to_json()) == vm


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(vm=vm_states)
def test_file_round_trip(tmp_path: Path, vm: VMState) -> None:
    path = tmp_path / "vm" / "state.json"
    state.save(path, vm)
    assert state.load(path) == vm


def test_document_shape(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state.save(path, VMState({1: PortState(5, True, 4), 0: PortState()}))
    doc = json.loads(path.read_text())
    assert doc == {
        "version": VERSION,
        "ports": {
            "0": {"next_session_id": 1, "guest_open": False, "session_id": None},
            "1": {"next_session_id": 5, "guest_open": True, "session_id": 4},
        },
    }
    loaded = state.load(path)
    assert set(loaded.ports) == {0, 1}  # int keys again
    assert loaded.ports[1] == PortState(5, True, 4)


def test_save_creates_directories_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "state.json"
    state.save(path, VMState({1: PortState(2)}))
    state.save(path, VMState({1: PortState(3)}))
    assert os.listdir(path.parent) == ["state.json"]
    assert state.load(path).ports[1].next_session_id == 3


def test_save_is_atomic_old_file_survives_a_failed_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    state.save(path, VMState({1: PortState(7, True, 6)}))
    before = path.read_bytes()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        state.save(path, VMState({1: PortState(99)}))
    assert path.read_bytes() == before
    assert state.load(path).ports[1] == PortState(7, True, 6)


def test_save_replaces_by_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    state.save(path, VMState())
    inode = path.stat().st_ino
    calls: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        calls.append((str(src), str(dst)))
        # at the moment of the rename the new content is complete on disk
        assert json.loads(Path(src).read_text())["ports"] == {"2": {
            "next_session_id": 1, "guest_open": False, "session_id": None}}
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    state.save(path, VMState({2: PortState()}))
    assert len(calls) == 1 and calls[0][1] == str(path)
    assert path.stat().st_ino != inode  # a new file, not rewritten in place


def test_missing_file_is_fresh_and_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert state.load(tmp_path / "nope.json") == VMState()
    assert caplog.records == []


BAD_FILES = {
    "not-json": "{not json",
    "empty": "",
    "binary": "\udcff",
    "list": "[1, 2]",
    "no-version": '{"ports": {}}',
    "version-2": '{"version": 2, "ports": {}}',
    "version-string": '{"version": "1", "ports": {}}',
    "port-key-not-int": '{"version": 1, "ports": {"x": '
    '{"next_session_id": 1, "guest_open": false, "session_id": null}}}',
    "entry-missing-key": '{"version": 1, "ports": {"1": {"next_session_id": 1}}}',
    "entry-not-object": '{"version": 1, "ports": {"1": 5}}',
    "next-id-zero": '{"version": 1, "ports": {"1": '
    '{"next_session_id": 0, "guest_open": false, "session_id": null}}}',
    "next-id-string": '{"version": 1, "ports": {"1": '
    '{"next_session_id": "3", "guest_open": false, "session_id": null}}}',
    "guest-open-int": '{"version": 1, "ports": {"1": '
    '{"next_session_id": 3, "guest_open": 1, "session_id": null}}}',
    "session-id-float": '{"version": 1, "ports": {"1": '
    '{"next_session_id": 3, "guest_open": true, "session_id": 2.5}}}',
}


@pytest.mark.parametrize("text", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_gives_fresh_state_and_an_error_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert state.load(path) == VMState()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert f"state file {path} unusable, starting fresh" in errors[0].getMessage()


def test_unknown_version_named_in_the_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"version": 7, "ports": {}}')
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        state.load(path)
    assert "unknown state file version 7" in caplog.text


def test_unreadable_path_gives_fresh_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "dir.json").mkdir()  # reading a directory: IsADirectoryError
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert state.load(tmp_path / "dir.json") == VMState()
    assert "unusable" in caplog.text


@pytest.mark.parametrize("ports", ["null", "[]", '"x"'])
def test_ports_not_an_object_gives_fresh_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, ports: str
) -> None:
    path = tmp_path / "state.json"
    path.write_text(f'{{"version": 1, "ports": {ports}}}')
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        assert state.load(path) == VMState()
    assert "unusable" in caplog.text
