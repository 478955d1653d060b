"""Configuration files no one writes on purpose (found by fuzzing the parser): each is refused with
one line naming the file, and never with a traceback, a hang or an unbounded amount of memory."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirrorgen.config import parse_config, valid_mirror_name
from mirrorgen.errors import ConfigError

CFG = Path("/etc/mirrorgen/mirrorgen.yaml")


def mirror(**lines: str) -> str:
    """A valid one-mirror file, with ``lines`` (key: YAML text) added to or replacing the mirror's keys."""
    keys = {"name": "m", "type": "conda", "source": "https://conda.example/main", **lines}
    body = "".join(f"  {k}: {v}\n" for k, v in keys.items())
    return "root: /srv/mirror\nmirrors:\n- " + body[2:]


def bomb(levels: int, *, merge: bool) -> str:
    """Each level refers to the one before twice: 2**levels values once expanded."""
    out = ["a0: &a0 {k: v}" if merge else "a0: &a0 [x, y]"]
    for i in range(1, levels):
        ref = f"*a{i - 1}"
        out.append(f"a{i}: &a{i} {{<<: [{ref}, {ref}], k{i}: v}}" if merge else f"a{i}: &a{i} [{ref}, {ref}]")
    return "\n".join(out)


def flow_bomb(levels: int) -> str:
    """One flow value that holds 2**levels items once expanded: [&a2 [&a1 [&a0 [x], *a0], *a1], *a2]"""
    text = "&a0 [x]"
    for i in range(1, levels):
        text = f"&a{i} [{text}, *a{i - 1}]"
    return text


NASTY = {
    # characters YAML refuses outright
    "NUL": "root: /srv\x00\nmirrors: []\n",
    "lone surrogate": "root: /srv/\udcff\nmirrors: []\n",
    # nesting and expansion
    "deep flow list": "root: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep block mapping": "".join(" " * i + f"k{i}:\n" for i in range(2000)),
    "merge bomb": bomb(40, merge=True) + "\nroot: /srv\nmirrors: []\n",
    "list bomb as a key": bomb(40, merge=False) + "\n? *a39\n: x\nroot: /srv\n",
    "list bomb in an error message": mirror(concurrency=flow_bomb(40)),
    # tags forcing what a value cannot be
    "!!bool maybe": "root: !!bool maybe\n",
    "!!timestamp yesterday": "root: !!timestamp yesterday\n",
    "!!seq on a scalar": "root: !!seq x\n",
    "!!map on a scalar": "root: !!map x\n",
    "!!float past range": "root: !!float 1:" + "9" * 400 + "\n",
    "mapping key": "{a: b}: c\nroot: /srv\n",
    # values past any range
    # (sexagesimal, as YAML 1.1 allows: an int past the 4,300 digits Python will print)
    "concurrency of 5,000 digits": mirror(concurrency="1" + ":59" * 3000),
    "concurrency 10**9": mirror(concurrency="1000000000"),
    "retries 10**6": mirror(retries="1000000"),
    "timeout .inf": mirror(timeout=".inf"),
    "timeout .nan": mirror(timeout=".nan"),
    "timeout 10**400": mirror(timeout="1" + "0" * 400),
    "latest of 5,000 digits": mirror(filters="{latest: 1" + ":59" * 3000 + "}"),
    "a date of 5,000 digits": mirror(filters="{date_from: 1" + ":59" * 3000 + "}"),
    "a spec of 5,000 digits": mirror(filters="{only: [1" + ":59" * 3000 + "]}"),
    # paths and URLs
    "root with NUL escape": 'root: "/srv/\\0x"\nmirrors: []\n',
    "root of an unknown user": "root: ~no-such-user-here/x\nmirrors: []\n",
    "source of an unknown user": mirror(source="~no-such-user-here/x"),
    "source with a bad port": mirror(source="http://u:p@host:99999/x"),
    "source with an open bracket": mirror(source="'http://[::1/x'"),
    "source with a newline": mirror(source='"http://host/a\\nb"'),
    "source with user info but no host": mirror(source="'http://user@/x'"),
    "mirror name with a newline": mirror(name='"m\\n"'),
    # specs the parsers choke on
    "PEP 508 nested markers": mirror(type="pypi", filters="{only: ['x; " + "(" * 500 + "python_version>\"3\""
                                     + ")" * 500 + "']}"),
    "a key with a newline": 'root: /srv\n"bad\\nkey": 1\n',
    # rattler panics here, and its panic hook writes to stderr before Python sees it
    "MatchSpec build_number past 2**64": mirror(filters="{only: [\"a[build_number='>99999999999999999999']\"]}"),
}


@pytest.mark.parametrize("text", NASTY.values(), ids=NASTY.keys())
def test_a_hostile_file_is_one_line_naming_the_file(text: str) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        parse_config(text, CFG)
    message = str(info.value)
    assert message.startswith(f"{CFG}") and "\n" not in message and len(message) < 2500, message
    assert time.monotonic() - started < 10  # the bombs are refused, not expanded


@pytest.mark.parametrize("name", ["merge bomb", "concurrency of 5,000 digits", "NUL", "source with a newline",
                                  "MatchSpec build_number past 2**64"])
def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path: Path, name: str) -> None:
    path = tmp_path / "mirrorgen.yaml"
    path.write_text(NASTY[name], encoding="utf-8", errors="surrogateescape")
    proc = subprocess.run([sys.executable, "-m", "mirrorgen.cli", "sync", "--dry-run", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert str(path) in proc.stderr


def test_a_merge_of_shared_parts_well_under_the_limit_still_works() -> None:
    text = ("root: /srv/mirror\nmirrors:\n- &base {type: conda, source: 'https://conda.example/main', name: a}\n"
            "- {<<: *base, name: b}\n")
    assert [m.name for m in parse_config(text, CFG).mirrors] == ["a", "b"]


@pytest.mark.parametrize("name", ["m\n", "m\n\n", "\nm", "m/..", ".mirrorgen"])
def test_a_mirror_name_with_a_newline_or_a_path_is_not_valid(name: str) -> None:
    # "$" matches before a final newline: the check once took "m\n" for a name.
    assert not valid_mirror_name(name)


def test_a_token_url_pasted_where_it_does_not_belong_is_not_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(mirror(type="'https://user:s3cr3t@conda.example/t/TOKEN123/main'"), CFG)
    assert "s3cr3t" not in str(info.value) and "TOKEN123" not in str(info.value)
    assert "unknown mirror type" in str(info.value)


def test_a_symlink_loop_under_root_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ConfigError) as info:
        parse_config("root: loop/x\nmirrors: []\n", tmp_path / "mirrorgen.yaml")
    assert "not a usable path" in str(info.value) and "cannot expand" not in str(info.value)
