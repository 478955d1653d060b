"""The filters (SPEC §3) through apply_filters, on hand-made repodata with exact expectations and on
the real captured indexes in /work/shared/testdata/conda."""

from __future__ import annotations

import datetime as dt
import json

import orjson
import pytest
from rattler import MatchSpec, Version, VersionSpec

from mirrorgen.config import Filters
from mirrorgen.conda.matchspec import CondaEcosystem
from mirrorgen.conda.source import parse_repodata
from mirrorgen.errors import RepodataError
from mirrorgen.filters import FilterOutcome, apply_filters
from tests.support.records import channel, keys, keyset, real, real_bytes, rec

ECO = CondaEcosystem()
PYTORCH = "rattler_pytorch_linux-64_repodata.json"


def run(records, **filters) -> FilterOutcome:
    return apply_filters(records, Filters(**{k: tuple(v) if isinstance(v, list) else v
                                             for k, v in filters.items()}), ECO)


def kept(records, **filters) -> set[str]:
    return keyset(run(records, **filters).kept)


def epoch(*ymdhms: int) -> int:
    return int(dt.datetime(*ymdhms, tzinfo=dt.timezone.utc).timestamp())


def python_specs(record, fields=("depends",)) -> list[str]:
    return [d for f in fields for d in getattr(record, f) if MatchSpec(d).name.normalized == "python"]


# ---------------------------------------------------------------- python_versions

PY_CHANNEL = channel(
    rec("py39only", "1", depends=["python >=3.9,<3.10.0a0"]),
    rec("py38plus", "1", depends=["numpy", "python >=3.8"]),
    rec("py311star", "1", depends=["python 3.11.*"]),
    rec("abi312", "1", depends=["python_abi 3.12.* *_cp312"]),
    rec("abifirst", "1", depends=["python_abi 3.12.* *_cp312", "python >=3.12,<3.13.0a0"]),
    rec("nopy", "1", depends=["libzlib >=1.2"]),
    rec("bracket", "1", depends=["python[version='>=3.12']"]),
    rec("python", "3.11.5", "h1"), rec("python", "3.1.4", "h2"), rec("python", "3.12.0", "h3"),
    rec("python_abi", "3.12", "4_cp312"),
    rec("python_abi", "3.11", "4_cp311", constrains=["python 3.11.* *_cpython"]),
    rec("python_abi", "3.10", "4_cp310", constrains=["python 3.10.* *_cpython"]),
)


def test_python_versions_drops_records_whose_python_pin_admits_none_of_the_series():
    out = run(PY_CHANNEL, python_versions=["3.11"])
    assert keyset(out.kept) == keys("py38plus-1-0", "py311star-1-0", "abi312-1-0", "nopy-1-0",
                                    "python-3.11.5-h1", "python_abi-3.12-4_cp312",
                                    "python_abi-3.11-4_cp311")
    assert out.dropped["linux-64/py39only-1-0.tar.bz2"] == (
        "python_versions", "requires a python other than 3.11")
    assert {f for f, _ in out.dropped.values()} == {"python_versions"}


def test_python_versions_admits_a_record_if_any_configured_series_fits():
    assert kept(PY_CHANNEL, python_versions=["3.9", "3.12"]) == keys(
        "py39only-1-0", "py38plus-1-0", "abi312-1-0", "abifirst-1-0", "nopy-1-0", "bracket-1-0",
        "python-3.12.0-h3", "python_abi-3.12-4_cp312")  # a pin in `constrains` counts too


def test_the_python_package_itself_keeps_only_the_configured_series():
    # "3.1" must not select 3.11/3.12 by string prefix.
    py = [r for r in PY_CHANNEL if r.name == "python"]
    assert kept(py, python_versions=["3.1"]) == keys("python-3.1.4-h2")
    assert kept(py, python_versions=["3.11", "3.12"]) == keys("python-3.11.5-h1", "python-3.12.0-h3")


@pytest.mark.parametrize("dep", ["python>=3.12", "python=2.7", "python<3"])
def test_python_pin_written_without_a_space_is_still_a_python_pin(dep):
    records = channel(rec("tight", "1", depends=[dep]))
    assert kept(records, python_versions=["3.11"]) == set()


@pytest.mark.parametrize("relpath, series", [
    ("davhau_intel_linux-64_2023-08-28.json", "3.9"),
    ("conda_r_linux-64_repodata.json", "3.9"),
    ("davhau_main_noarch_2021-07-01.json", "3.9"),
    (PYTORCH, "3.11"),
])
def test_python_versions_on_real_indexes_agrees_with_rattler_version_specs(relpath, series):
    records = real(relpath).records
    out = run(records, python_versions=[series])
    probes = [Version(series)] + [Version(f"{series}.{i}") for i in range(40)]

    def admits(dep: str) -> bool:
        version = MatchSpec(dep).version
        return not version or any(VersionSpec(version).matches(p) for p in probes)

    dropped = {k for k, (f, _) in out.dropped.items() if f == "python_versions"}
    assert dropped and len(out.kept) + len(dropped) == len(records)
    for r in out.kept:
        if r.name == "python":
            assert r.version.split(".")[:2] == series.split(".")
        assert all(admits(d) for d in python_specs(r)), (r.fn, python_specs(r))
    for r in records:
        if r.key in dropped and r.name != "python":
            assert not all(admits(d) for d in python_specs(r, ("depends", "constrains"))), r.fn
    # Nothing that needs python 2.7 (and nothing else) survives.
    only27 = [r for r in records if python_specs(r) and
              all(not admits(d) and VersionSpec(MatchSpec(d).version).matches(Version("2.7.18"))
                  for d in python_specs(r))]
    assert not {r.key for r in only27} & keyset(out.kept)
    if relpath.startswith("davhau_intel_linux"):
        assert len(only27) > 300


# ---------------------------------------------------------------- dates

JAN_2024 = dict(date_from=dt.date(2024, 1, 1), date_to=dt.date(2024, 1, 31))
DATED = channel(
    rec("start_ms", "1", timestamp=epoch(2024, 1, 1) * 1000),
    rec("end_s", "1", timestamp=epoch(2024, 1, 31, 23, 59, 59)),
    rec("mid_s_float", "1", timestamp=epoch(2024, 1, 15) + 0.5),
    rec("before_ms", "1", timestamp=epoch(2024, 1, 1) * 1000 - 1),
    rec("after_s", "1", timestamp=epoch(2024, 2, 1)),
    rec("undated", "1"),
)


def test_date_window_is_inclusive_on_both_ends_in_seconds_and_milliseconds():
    out = run(DATED, **JAN_2024)
    assert keyset(out.kept) == keys("start_ms-1-0", "end_s-1-0", "mid_s_float-1-0")
    assert out.dropped == {
        "linux-64/before_ms-1-0.tar.bz2": ("dates", "built before 2024-01-01"),
        "linux-64/after_s-1-0.tar.bz2": ("dates", "built after 2024-01-31"),
        "linux-64/undated-1-0.tar.bz2": ("dates", "has no timestamp"),
    }


def test_open_ended_date_windows():
    assert kept(DATED, date_from=dt.date(2024, 1, 16)) == keys("end_s-1-0", "after_s-1-0")
    assert kept(DATED, date_to=dt.date(2023, 12, 31)) == keys("before_ms-1-0")


def test_date_window_on_real_index_with_missing_timestamps():
    relpath = "davhau_intel_linux-64_2023-08-28.json"
    records = real(relpath).records
    raw = json.loads(real_bytes(relpath))["packages"]
    out = run(records, date_from=dt.date(2019, 1, 1), date_to=dt.date(2020, 12, 31))
    low, high = epoch(2019, 1, 1), epoch(2021, 1, 1)
    expect = set()
    for fn, r in raw.items():
        ts = r.get("timestamp")
        if ts is not None and low <= (ts / 1000 if ts > 1e11 else ts) < high:
            expect.add(f"linux-64/{fn}")
    assert keyset(out.kept) == expect and 0 < len(expect) < len(records)
    undated = {k for k, v in out.dropped.items() if v == ("dates", "has no timestamp")}
    assert undated == {f"linux-64/{fn}" for fn, r in raw.items() if "timestamp" not in r}
    assert len(undated) == 987


# ---------------------------------------------------------------- only / exclude

SPECS = channel(
    rec("numpy", "1.25.2", "py311_0"), rec("numpy", "1.26.0", "py311_0"), rec("numpy", "2.0.0", "py311_0"),
    rec("numpy-base", "1.26.0", "py311_0"),
    rec("libfoo", "1.0"), rec("libbar", "2.0"), rec("glib", "2.78"), rec("zlib", "1.3"),
    rec("pytorch", "2.1.0", "cpu_0"), rec("pytorch", "2.1.0", "cuda_0"), rec("pytorch", "2.2.0", "cpu_0"),
)


def test_only_keeps_records_matching_a_versioned_matchspec():
    out = run(SPECS, only=["numpy >=1.26", "absent-package"])
    assert keyset(out.kept) == keys("numpy-1.26.0-py311_0", "numpy-2.0.0-py311_0")
    assert out.dropped["linux-64/numpy-1.25.2-py311_0.tar.bz2"] == ("only", "matches no 'only' spec")
    assert out.unused_specs == {"only": ["absent-package"]}


def test_only_accepts_a_glob_package_name():
    assert kept(SPECS, only=["lib*"]) == keys("libfoo-1.0-0", "libbar-2.0-0")


def test_exclude_drops_exactly_the_matching_records():
    out = run(SPECS, exclude=["pytorch", "numpy <1.26", "lib*"])
    gone = keys("pytorch-2.1.0-cpu_0", "pytorch-2.1.0-cuda_0", "pytorch-2.2.0-cpu_0",
                "numpy-1.25.2-py311_0", "libfoo-1.0-0", "libbar-2.0-0")
    assert keyset(out.kept) == keyset(SPECS) - gone
    assert set(out.dropped) == gone
    assert out.dropped["linux-64/numpy-1.25.2-py311_0.tar.bz2"] == ("exclude", "matches 'numpy <1.26'")


# ---------------------------------------------------------------- licenses

LICENSED = channel(
    rec("gpl3fam", "1", license_family="GPL3", license="GPL-3.0-only"),
    rec("gpl2fam", "1", license_family="GPL2"),
    rec("gplfam", "1", license_family="GPL"),
    rec("mitfam", "1", license_family="MIT", license="MIT"),
    rec("mit_custom", "1", license_family="MIT", license="Custom text nobody can place"),
    rec("gpl_spdx3", "1", license_family="GPL", license="GPL-3.0-only"),  # family and SPDX both count
    rec("bsdfam", "1", license_family="BSD"),
    rec("pdfam", "1", license_family="Public-Domain"),
    rec("apachefam", "1", license_family="APACHE"),
    rec("spdx_gpl3", "1", license="GPL-3.0-or-later"),
    rec("spdx_mit", "1", license="MIT"),
    rec("spdx_apache", "1", license="Apache-2.0"),
    rec("spdx_dual", "1", license="MIT OR GPL-3.0-only"),
    rec("nolicense", "1"),
)
ALL_LICENSED = {r.key for r in LICENSED}


def test_license_blocklist_drops_family_and_spdx_matches():
    out = run(LICENSED, licenses=["-gpl3"])
    assert keyset(out.kept) == ALL_LICENSED - keys("gpl3fam-1-0", "gpl_spdx3-1-0", "spdx_gpl3-1-0",
                                                   "spdx_dual-1-0")
    assert out.dropped["linux-64/spdx_gpl3-1-0.tar.bz2"] == ("licenses", "license family gpl3 is blocked")


def test_license_allowlist_keeps_only_those_families():
    mit = keys("mitfam-1-0", "mit_custom-1-0", "spdx_mit-1-0")
    assert kept(LICENSED, licenses=["mit"]) == mit
    assert kept(LICENSED, licenses=["MIT", "Apache", "none"]) == mit | keys(
        "apachefam-1-0", "spdx_apache-1-0", "nolicense-1-0")
    # A dual license is kept by an allow list only when every family in it is allowed.
    assert kept(LICENSED, licenses=["mit", "gpl3"]) == mit | keys("gpl3fam-1-0", "spdx_gpl3-1-0",
                                                                  "spdx_dual-1-0")


@pytest.mark.parametrize("spelling", ["-public_domain", "-Public-Domain", "-PUBLIC_DOMAIN"])
def test_license_families_compare_case_and_separator_insensitively(spelling):
    assert kept(LICENSED, licenses=[spelling]) == ALL_LICENSED - keys("pdfam-1-0")


@pytest.mark.parametrize("text", ["GPL 3", "GPL v3", "GPL (>= 3)"])
def test_license_blocklist_catches_common_non_spdx_gpl3_spellings(text):
    assert kept(channel(rec("x", "1", license=text)), licenses=["-gpl3"]) == set()


def test_license_blocklist_on_real_index_drops_every_gpl3_family_record():
    records = real("conda_r_linux-64_repodata.json").records
    out = run(records, licenses=["-gpl3"])
    gpl3 = {r.key for r in records if (r.license_family or "").lower() == "gpl3"}
    assert len(gpl3) > 500
    assert gpl3 <= set(out.dropped)
    # Whatever names no GPL anywhere (family or license text) is untouched.
    clean = {r.key for r in records if "gpl" not in f"{r.license_family} {r.license}".lower()}
    assert len(clean) > 1000 and clean <= keyset(out.kept)
    assert {f for f, _ in out.dropped.values()} == {"licenses"}


# ---------------------------------------------------------------- seed 000 precedence

SEED = channel(
    rec("readline", "8.2", license_family="GPL3"), rec("pyqt", "5.15.9", license_family="GPL3"),
    rec("rsync", "3.2.7", license_family="GPL3"), rec("git", "2.42.0", license_family="GPL2"),
    rec("accelerate", "1.18", license_family="Proprietary"), rec("astropy", "5.3", license_family="BSD"),
    rec("pygments", "2.16", license_family="BSD"), rec("numpy", "1.26.0", license_family="BSD"),
    rec("libgcc", "13.2", license_family="GPL"),
)
ALL_SEED = {r.key for r in SEED}


def test_include_spec_restores_a_license_blocked_package():
    out = run(SEED, licenses=["-gpl2", "-gpl3"], include=["readline"])
    assert keyset(out.kept) == ALL_SEED - keys("pyqt-5.15.9-0", "rsync-3.2.7-0", "git-2.42.0-0")
    assert out.restored == ["linux-64/readline-8.2-0.tar.bz2"]
    assert "linux-64/readline-8.2-0.tar.bz2" not in out.dropped


def test_license_blocklist_is_evaluated_before_the_blocklist():
    out = run(SEED, licenses=["-gpl2"], exclude=["pyqt", "git"])
    assert keyset(out.kept) == ALL_SEED - keys("pyqt-5.15.9-0", "git-2.42.0-0")
    assert out.dropped == {"linux-64/git-2.42.0-0.tar.bz2": ("licenses", "license family gpl2 is blocked"),
                           "linux-64/pyqt-5.15.9-0.tar.bz2": ("exclude", "matches 'pyqt'")}


def test_include_spec_restores_a_blocklisted_package():
    out = run(SEED, exclude=["accelerate", "astropy", "pygments"], include=["accelerate"])
    assert keyset(out.kept) == ALL_SEED - keys("astropy-5.3-0", "pygments-2.16-0")
    assert out.restored == ["linux-64/accelerate-1.18-0.tar.bz2"]


def test_include_with_a_version_spec_restores_only_that_version():
    out = run(SPECS, exclude=["pytorch"], include=["pytorch ==2.1.0"])
    assert keyset(out.kept) == keyset(SPECS) - keys("pytorch-2.2.0-cpu_0")
    assert sorted(out.restored) == sorted(keys("pytorch-2.1.0-cpu_0", "pytorch-2.1.0-cuda_0"))


def test_include_with_a_version_spec_on_the_real_pytorch_channel():
    records = real(PYTORCH).records
    out = run(records, exclude=["pytorch"], include=["pytorch ==2.1.0"])
    torch = [r for r in out.kept if r.name == "pytorch"]
    assert {r.version for r in torch} == {"2.1.0"} and len(torch) == 12
    assert sorted(out.restored) == sorted(r.key for r in torch)
    assert len(out.kept) == len([r for r in records if r.name != "pytorch"]) + 12


@pytest.mark.parametrize("narrowing", [
    dict(only=["numpy"]),
    dict(python_versions=["3.11"]),
    dict(date_from=dt.date(2024, 1, 1)),
])
def test_include_does_not_restore_what_only_python_or_dates_removed(narrowing):
    records = channel(rec("numpy", "1.26.0", depends=["python >=3.11"], timestamp=epoch(2024, 2, 1)),
                      rec("oldpkg", "1.0", depends=["python 2.7.*"], timestamp=epoch(2015, 1, 1)))
    out = run(records, include=["oldpkg"], **narrowing)
    assert keyset(out.kept) == keys("numpy-1.26.0-0")
    assert out.restored == []
    assert out.dropped["linux-64/oldpkg-1.0-0.tar.bz2"][0] in {"only", "python_versions", "dates"}


# ---------------------------------------------------------------- latest

VERSIONS = channel(
    rec("foo", "1.9", "py39_0"), rec("foo", "1.10", "py39_0"), rec("foo", "1.10", "py310_0"),
    rec("foo", "1.10", "py39_1", build_number=1), rec("foo", "1.8", "py39_9", build_number=9),
    rec("bar", "1.0rc1"), rec("bar", "1.0"), rec("bar", "0.9"),
    rec("baz", "1.0"), rec("baz", "1.0.0", "1"), rec("baz", "0.9"),
) + channel(rec("foo", "1.2", "pyhd_0"), rec("foo", "1.1", "pyhd_0"), subdir="noarch")


def test_latest_keeps_newest_versions_per_name_and_subdir_in_conda_order():
    out = run(VERSIONS, latest=1)
    assert keyset(out.kept) == keys("foo-1.10-py39_0", "foo-1.10-py310_0", "foo-1.10-py39_1",
                                    "bar-1.0-0", "baz-1.0-0", "baz-1.0.0-1") | {"noarch/foo-1.2-pyhd_0.tar.bz2"}
    assert out.dropped["linux-64/foo-1.9-py39_0.tar.bz2"] == ("latest", "not among the newest 1 version")


def test_latest_counts_versions_not_builds():
    # foo 1.8 has the highest build_number but is the third version; 1.0 and 1.0.0 are one version.
    assert kept(VERSIONS, latest=2) == keyset(VERSIONS) - keys("foo-1.8-py39_9", "bar-0.9-0")


def test_latest_applies_after_exclude_include_and_licenses():
    records = channel(rec("pytorch", "2.1.0"), rec("pytorch", "2.2.0"), rec("pytorch", "2.0.0"),
                      rec("gsl", "2.7", license_family="GPL3"), rec("gsl", "2.6", license_family="BSD"))
    out = run(records, exclude=["pytorch"], include=["pytorch ==2.1.0"], licenses=["-gpl3"], latest=1)
    assert keyset(out.kept) == keys("pytorch-2.1.0-0", "gsl-2.6-0")


# ---------------------------------------------------------------- include_dependencies

def test_dependencies_are_added_transitively_from_the_pool():
    records = channel(rec("a", "1", depends=["b >=1", "__glibc >=2.17"]), rec("b", "1", depends=["c"]),
                      rec("c", "1"), rec("d", "1", depends=["a"]))
    out = run(records, only=["a"], include_dependencies=True)
    assert keyset(out.kept) == keys("a-1-0", "b-1-0", "c-1-0")
    assert out.dependencies.added == ["linux-64/b-1-0.tar.bz2", "linux-64/c-1-0.tar.bz2"]
    assert out.dependencies.needs["a"] == ["b >=1"]  # __glibc is virtual: not a dependency
    assert out.dependencies.unresolved == {} and set(out.dropped) == keys("d-1-0")


def test_dependency_removed_by_exclude_or_licenses_is_blocked_not_added():
    records = channel(rec("a", "1", depends=["b", "c", "missing >=2"]), rec("b", "1"),
                      rec("c", "1", license_family="GPL3"))
    out = run(records, exclude=["b"], licenses=["-gpl3"], include_dependencies=True)
    assert keyset(out.kept) == keys("a-1-0")
    dep = out.dependencies
    assert dep.added == []
    assert dep.unresolved == {"b": ["a 1"], "c": ["a 1"], "missing >=2": ["a 1"]}
    assert dep.blocked == {"b": "exclude: matches 'b'", "c": "licenses: license family gpl3 is blocked"}


def test_include_lets_the_closure_add_an_excluded_dependency():
    records = channel(rec("a", "1", depends=["b"]), rec("b", "1.0"), rec("b", "2.0"))
    out = run(records, exclude=["b"], include=["b 1.*"], include_dependencies=True)
    assert keyset(out.kept) == keys("a-1-0", "b-1.0-0")
    assert out.dependencies.blocked == {}


def test_dependency_closure_never_adds_an_excluded_package_outside_only():
    # b and c are outside `only`, yet exclude/licenses still rule on them for the closure.
    records = channel(rec("a", "1", depends=["b", "c", "d"]), rec("b", "1"), rec("d", "1"),
                      rec("c", "1", license_family="GPL3", timestamp=epoch(2010, 1, 1)))
    out = run(records, only=["a"], exclude=["b", "d"], licenses=["-gpl3"], include=["d"],
              include_dependencies=True)
    assert keyset(out.kept) == keys("a-1-0", "d-1-0")
    assert set(out.dependencies.blocked) == {"b", "c"}
    assert out.restored == []  # d was put back for the closure, not as a kept package
    # The same for a dependency that the date window removed.
    records = channel(rec("a", "1", depends=["c"], timestamp=epoch(2024, 1, 1)),
                      rec("c", "1", license_family="GPL3", timestamp=epoch(2010, 1, 1)))
    out = run(records, date_from=dt.date(2020, 1, 1), licenses=["-gpl3"], include_dependencies=True)
    assert keyset(out.kept) == keys("a-1-0")
    assert out.dependencies.blocked == {"c": "licenses: license family gpl3 is blocked"}


def test_with_latest_a_dependency_adds_only_its_newest_matching_versions():
    records = channel(rec("a", "1", depends=["b >=1"]), rec("a", "2", depends=["b <3"]),
                      *(rec("b", v) for v in ("0.5", "1.0", "2.0", "2.1", "3.0")))
    out = run(records, only=["a"], latest=1, include_dependencies=True)
    assert keyset(out.kept) == keys("a-2-0", "b-2.1-0")
    out = run(records, only=["a"], latest=2, include_dependencies=True)
    assert keyset(out.kept) == keys("a-1-0", "a-2-0", "b-3.0-0", "b-2.1-0", "b-2.0-0")


def test_a_platform_record_takes_dependencies_from_noarch_but_not_another_platform():
    records = (channel(rec("a", "1", depends=["n", "m"]))
               + channel(rec("n", "1", depends=["m"]), subdir="noarch")
               + channel(rec("m", "1"), subdir="osx-64"))
    out = run(records, only=["a"], include_dependencies=True)
    # noarch n may take osx-64 m: a noarch package installs on every platform.
    assert keyset(out.kept) == keys("a-1-0") | {"noarch/n-1-0.tar.bz2", "osx-64/m-1-0.tar.bz2"}
    assert out.dependencies.unresolved == {"m": ["a 1"]}


def test_dependencies_respect_python_versions():
    records = channel(rec("a", "1", depends=["p", "python >=3.8"]),
                      rec("p", "1.0", depends=["python 2.7.*"]), rec("p", "2.0", depends=["python >=3.8"]),
                      rec("python", "2.7.18"), rec("python", "3.11.5"), rec("python", "3.12.1"))
    out = run(records, only=["a"], python_versions=["3.11"], include_dependencies=True)
    assert keyset(out.kept) == keys("a-1-0", "p-2.0-0", "python-3.11.5-0")


# ---------------------------------------------------------------- data fidelity and malformed input

ODD_RECORD = (b'{ "zzz_unknown" : {"nested": [1, 2.50, null]},\n  "version":"1.0", "name" : "odd",'
              b'"build":"0","build_number":0,"depends":[ ],"summary":"caf\\u00e9 \xe2\x98\x95",'
              b'"license_family":"MIT","timestamp":1.7e12}')


def test_records_keep_their_raw_bytes_exactly_through_the_filters():
    data = (b'{"info":{"subdir":"linux-64"},"packages":{"odd-1.0-0.tar.bz2":' + ODD_RECORD
            + b'},"packages.conda":{"odd-1.0-0.conda":' + ODD_RECORD + b'}}')
    index = parse_repodata(data, "linux-64", 0, "test://odd")
    out = run(index.records, licenses=["mit"], date_from=dt.date(2023, 1, 1), latest=1)
    assert sorted(r.fn for r in out.kept) == ["odd-1.0-0.conda", "odd-1.0-0.tar.bz2"]
    assert [bytes(r.raw) for r in out.kept] == [ODD_RECORD, ODD_RECORD]
    assert [r.is_conda for r in out.kept] == [False, True]


@pytest.mark.parametrize("relpath", ["davhau_intel_linux-64_2023-08-28.json",
                                     "subchannel-demo/linux-64/repodata.json", PYTORCH])
def test_real_records_keep_raw_bytes_and_unknown_keys(relpath):
    data = real_bytes(relpath)
    doc = json.loads(data)
    index = real(relpath)
    assert len(index.records) == len(doc["packages"]) + len(doc.get("packages.conda", {}))
    assert not index.rejected
    assert orjson.loads(bytes(index.info["subdir"])) == index.subdir
    for r in index.records:
        raw = bytes(r.raw)
        assert orjson.loads(raw) == doc["packages.conda" if r.is_conda else "packages"][r.fn]
        # The exact slice of the file, at the position of its own file name.
        assert f'"{r.fn}": '.encode() + raw in data, r.fn
    if relpath.startswith("davhau_intel"):
        assert all(b'"binstar"' in bytes(r.raw) for r in index.records)
        no_sha = [r for r in index.records if r.files.sha256 is None]
        assert len(no_sha) == 4548 - 547
        assert sum(b'"features"' in bytes(r.raw) for r in index.records) == 914


def test_subchannel_metadata_is_used_as_info():
    index = real("subchannel-demo/linux-64/repodata.json")
    assert orjson.loads(bytes(index.info["base_url"])) == "https://conda.anaconda.org/conda-forge"
    assert {r.channel_subdir for r in index.records} == {"linux-64"}


def test_malformed_records_and_unsafe_file_names_are_rejected_not_fatal():
    good = rec("good", "1")
    packages = {"good-1-0.tar.bz2": good,
                "strdeps-1-0.tar.bz2": {**rec("strdeps", "1"), "depends": "python"},
                "nullbn-1-0.tar.bz2": {**rec("nullbn", "1"), "build_number": None},
                "noname-1-0.tar.bz2": {"version": "1", "build": "0"},
                "../evil-1-0.tar.bz2": good, "sub/evil-1-0.tar.bz2": good, "evil.tar.bz2": good,
                "..-1-0.conda": good}
    data = json.dumps({"info": {"subdir": "noarch"}, "packages": packages}).encode()
    index = parse_repodata(data, "noarch", 0, "test://bad")
    assert [r.fn for r in index.records] == ["good-1-0.tar.bz2"]
    assert set(index.rejected) == {f"noarch/{fn}" for fn in packages if fn != "good-1-0.tar.bz2"}
    for fn in ("strdeps-1-0.tar.bz2", "nullbn-1-0.tar.bz2", "noname-1-0.tar.bz2"):
        assert index.rejected[f"noarch/{fn}"].startswith("malformed record")
    for fn in ("../evil-1-0.tar.bz2", "sub/evil-1-0.tar.bz2", "evil.tar.bz2", "..-1-0.conda"):
        assert index.rejected[f"noarch/{fn}"] == "unsafe or unexpected file name"


@pytest.mark.parametrize("data", [b"{not json", b"[]", b'{"packages": []}'])
def test_an_unparseable_index_is_a_repodata_error(data):
    with pytest.raises(RepodataError):
        parse_repodata(data, "noarch", 0, "test://broken")


@pytest.mark.parametrize("relpath, filters", [
    ("conda_r_linux-64_repodata.json", dict(licenses=["-gpl3", "-agpl"])),
    ("conda_r_linux-64_repodata.json", dict(licenses=["mit", "bsd"])),
    ("conda_r_linux-64_repodata.json", dict(licenses=["-gpl3"], exclude=["r-base"])),
    ("davhau_intel_linux-64_2023-08-28.json", dict(licenses=["-bsd"], python_versions=["3.9"])),
])
def test_the_policy_short_cut_gives_what_the_general_path_gives(relpath, filters):
    # With nothing to restore and nothing narrowed, apply_filters skips the identity passes of
    # the general path (_apply_policy); both must keep and drop exactly the same records.
    from mirrorgen.filters import pipeline
    from mirrorgen.filters.licenses import filter_licenses
    from mirrorgen.filters.specs import SpecSet, filter_exclude

    records = real(relpath).records
    out = run(records, **filters)
    py_ok = [r for r in records if r.key not in out.dropped
             or out.dropped[r.key][0] != "python_versions"]
    policy: dict = {}
    passed = filter_exclude(filter_licenses(py_ok, tuple(filters["licenses"]), ECO, policy),
                            SpecSet(tuple(filters.get("exclude", ())), ECO), policy)
    dropped = {k: v for k, v in out.dropped.items() if v[0] == "python_versions"}
    restored, after = pipeline._apply_policy(py_ok, list(py_ok), passed, SpecSet((), ECO), policy, dropped)
    assert policy and after and not restored
    assert [r.key for r in out.kept] == [r.key for r in after]
    assert out.dropped == dropped
