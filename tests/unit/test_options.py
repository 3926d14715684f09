"""The typed reads of vhostser.options that need more than a table of cases: a socket file's
mode, users and groups by name or number."""

from __future__ import annotations

import grp
import pwd

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostser.options import OptionError, Options

W = "vm.toml: port 1.backend"


def read_mode(value: object) -> int:
    return Options({"socket_mode": value}, W, {"socket_mode"}).socket_mode("socket_mode", 0o600)


def allowed(mode: int) -> bool:
    """Read and write for the owner, nothing for others, no setuid/setgid/sticky."""
    return mode & 0o600 == 0o600 and not mode & ~0o770


@given(st.integers(min_value=-1, max_value=0o7777 + 1))
def test_a_mode_is_taken_exactly_when_only_owner_and_group_bits_are_set(mode: int) -> None:
    if allowed(mode):
        assert read_mode(mode) == mode
    else:
        with pytest.raises(OptionError, match=r"^vm\.toml: port 1\.backend\.socket_mode: "
                           r"expected a file mode with read and write for the owner and no "
                           rf"bits for others, like 0o600 or 0o660, got {mode}$"):
            read_mode(mode)


@given(st.integers(min_value=0, max_value=0o777), st.sampled_from(["", "0", "0o"]))
def test_a_mode_may_be_written_as_an_octal_string(mode: int, prefix: str) -> None:
    text = f"{prefix}{mode:03o}"
    if allowed(mode):
        assert read_mode(text) == mode
    else:
        with pytest.raises(OptionError, match=rf"expected a file mode .*, got '{text}'$"):
            read_mode(text)


@pytest.mark.parametrize("value", [True, 6.0, "rw-rw----", "0x1b0", "00660", "66", [0o600],
                                   "0660\0"])
def test_what_is_no_mode(value: object) -> None:
    with pytest.raises(OptionError, match="expected a file mode"):
        read_mode(value)


def test_an_absent_mode_is_the_default() -> None:
    assert Options({}, W, ()).socket_mode("socket_mode", 0o640) == 0o640


def test_users_and_groups_by_name_or_number() -> None:
    root, nobody = pwd.getpwuid(0).pw_name, pwd.getpwuid(65534).pw_name
    nogroup = grp.getgrgid(65534).gr_name
    o = Options({"u": [root, 65534, 4242], "g": [nogroup, 36], "one": nogroup}, W,
                {"u", "g", "one"})
    assert o.users("u") == (0, 65534, 4242) and o.groups("g") == (65534, 36)
    assert o.group("one") == 65534 and o.group("none") is None
    assert o.users("none") == () and o.groups("none") == ()
    assert Options({"u": [nobody]}, W, {"u"}).users("u") == (65534,)


@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32 - 1), st.booleans(),
                 st.floats(), st.none(), st.just("no-such-user-or-group-here"),
                 st.just("root\0")))
def test_what_is_no_user_or_group(value: object) -> None:
    o = Options({"u": [value], "g": [value], "one": value}, W, {"u", "g", "one"})
    for read in (lambda: o.users("u"), lambda: o.groups("g"), lambda: o.group("one")):
        with pytest.raises(OptionError, match=r"\.(u|g|one): expected a number or the name "
                           r"of an existing user/group, got "):
            read()


def test_a_list_of_ids_must_be_a_list() -> None:
    with pytest.raises(OptionError, match=r"\.u: expected list, got 0$"):
        Options({"u": 0}, W, {"u"}).users("u")
