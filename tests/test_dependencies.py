"""The installed packages fit together: a bad resolution is named, not a stack trace.

A resolver can pick a set of releases that each satisfy this package's ranges and yet do
not work together (the newest dask beside a years-old distributed that cannot import).
These tests read what is installed (``importlib.metadata``) and fail with the packages,
their versions and the command that installs a set that fits. A test is skipped only
when the optional package it checks is not installed at all.
"""

import importlib
import importlib.metadata as metadata
import subprocess
import sys

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import Version


def _version(name):
    """The installed version of distribution ``name``, or None if it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _requires(name):
    """The Requires-Dist lines of installed distribution ``name``."""
    return metadata.requires(name) or []


def _requirement_on(requires, dependency, extra=""):
    """The requirement in ``requires`` on ``dependency`` that applies with ``extra``, or None."""
    for line in requires:
        req = Requirement(line)
        if _canonical(req.name) != _canonical(dependency):
            continue
        if req.marker is None or req.marker.evaluate(dict(default_environment(), extra=extra)):
            return req
    return None


def _canonical(name):
    return name.lower().replace("_", "-").replace(".", "-")


def _pair_problems(package, dependency, extra="", version=_version, requires=_requires):
    """How the installed ``dependency`` misses what installed ``package`` asks of it.

    Empty if either is not installed or ``package`` asks nothing of ``dependency``.
    """
    have_package, have_dependency = version(package), version(dependency)
    if have_package is None or have_dependency is None:
        return []
    req = _requirement_on(requires(package), dependency, extra)
    if req is None or req.specifier.contains(have_dependency, prereleases=True):
        return []
    needs = f"{package}[{extra}]" if extra else package
    return [f"{needs} {have_package} requires {req.name}{req.specifier}, but {dependency} "
            f"{have_dependency} is installed"]


def dask_problems(version=_version, requires=_requires, import_module=importlib.import_module):
    """Why the installed dask and distributed do not work together (empty if they do).

    dask and distributed are released together and each pins the other's release
    (distributed X requires dask==X, dask[distributed] X requires distributed==X), so the
    only pair that works is one release of both, and distributed must import.
    """
    dask, distributed = version("dask"), version("distributed")
    if dask is None or distributed is None:
        return []
    problems = []
    if Version(dask) != Version(distributed):
        problems.append(f"dask {dask} and distributed {distributed} are different releases")
    problems += _pair_problems("distributed", "dask", version=version, requires=requires)
    problems += _pair_problems("dask", "distributed", "distributed", version, requires)
    if not problems:
        try:
            import_module("distributed")
        except Exception as exc:  # the defect this test exists for: an ImportError inside it
            problems.append(f"distributed {distributed} does not import beside dask {dask}: "
                            f"{type(exc).__name__}: {exc}")
    if problems:
        # distributed X pins dask==X, so release X of both exists; dask's own
        # distributed extra makes the resolver keep the two on one release.
        problems.append(f'fix: pip install "dask[array,distributed]=={distributed}" '
                        '(or pip install -U "sklearn_lib[scale]")')
    return problems


def zarr_problems(version=_version, requires=_requires, import_module=importlib.import_module):
    """Why the installed zarr and numcodecs do not make a cache (empty if they do)."""
    zarr, numcodecs = version("zarr"), version("numcodecs")
    if zarr is None:
        return []
    problems = []
    if Version(zarr).major < 3:
        problems.append(f"zarr {zarr} is installed; the activation cache writes zarr v3 "
                        "and needs zarr>=3")
    if numcodecs is None:
        problems.append(f"zarr {zarr} is installed without numcodecs")
    else:
        problems += _pair_problems("zarr", "numcodecs", version=version, requires=requires)
        if not problems:
            try:  # what sklearn_lib._chunk_read imports itself
                import_module("numcodecs").Zstd
            except Exception as exc:
                problems.append(f"numcodecs {numcodecs} has no working Zstd beside zarr "
                                f"{zarr}: {type(exc).__name__}: {exc}")
    if problems:
        problems.append('fix: pip install -U "sklearn_lib[cache]" '
                        '(zarr>=3 with the numcodecs it asks for)')
    return problems


def bound_problems(version=_version, requires=_requires):
    """Installed packages named by sklearn_lib's requirements that are outside its ranges."""
    problems = []
    for line in requires("sklearn_lib"):
        req = Requirement(line)
        have = version(req.name)
        if _canonical(req.name) == "sklearn-lib" or have is None:
            continue
        if not req.specifier.contains(have, prereleases=True):
            problems.append(f"sklearn_lib requires {req.name}{req.specifier}, but {req.name} "
                            f"{have} is installed")
    return problems


def pip_check():
    """(exit status, output) of ``python -m pip check`` in this interpreter's environment."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                            text=True, timeout=300)
    return result.returncode, (result.stdout + result.stderr).strip()


def _require_installed(*names):
    missing = [name for name in names if _version(name) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def _explain(problems):
    return "installed versions do not fit together:\n  " + "\n  ".join(problems)


# --------------------------------------------------------------------------- the installed set
def test_dask_and_distributed_are_one_release_and_distributed_imports():
    _require_installed("dask", "distributed")
    problems = dask_problems()
    assert not problems, _explain(problems)


def test_zarr_is_v3_with_a_numcodecs_it_accepts():
    _require_installed("zarr")
    problems = zarr_problems()
    assert not problems, _explain(problems)


# Pairs where one optional package pins or bounds the other: the requirement of the
# first on the second holds for the installed versions. With an extra, the bound is one
# of the first package's extras that pip does not enforce unless asked, yet the first
# package imports the second whenever it is installed (transformers 5.9.0 imports any
# kernels and fails to import beside kernels 0.19.1, which its kernels extra excludes).
# (dask and distributed have a test of their own, above.)
PAIRS = [
    ("zarr", "numcodecs", ""),
    ("transformer_lens", "transformers", ""),
    ("transformer_lens", "torch", ""),
    ("nnsight", "transformers", ""),
    ("transformers", "tokenizers", ""),
    ("transformers", "huggingface-hub", ""),
    ("transformers", "kernels", "kernels"),
    ("tokenizers", "huggingface-hub", ""),
    ("pydata-sphinx-theme", "sphinx", ""),
    ("numpydoc", "sphinx", ""),
    ("sphinx-gallery", "sphinx", ""),
    ("sphinx", "docutils", ""),
]


@pytest.mark.parametrize(("package", "dependency", "extra"), PAIRS)
def test_pinned_pair_fits(package, dependency, extra):
    _require_installed(package, dependency)
    problems = _pair_problems(package, dependency, extra)
    if problems:
        req = _requirement_on(_requires(package), dependency, extra)
        problems.append(f'fix: pip install "{dependency}{req.specifier}" (what {package} '
                        f"{_version(package)} accepts), or upgrade {package} to a release "
                        f"that accepts {dependency} {_version(dependency)}")
    assert not problems, _explain(problems)


def test_installed_packages_are_within_sklearn_libs_ranges():
    _require_installed("sklearn_lib")
    problems = bound_problems()
    assert not problems, _explain(problems) + '\n  fix: pip install -e ".[test]"'


def test_pip_check_finds_no_broken_requirements():
    status, output = pip_check()
    if "No module named pip" in output:
        pytest.skip("pip is not installed in this environment")
    assert status == 0, f"`{sys.executable} -m pip check` reports broken requirements:\n{output}"


# --------------------------------------------------------------------------- the checks fail
def _fake(versions, requires):
    return (lambda name: versions.get(_canonical(name)),
            lambda name: requires.get(_canonical(name), []))


def _no_import(name):
    raise AssertionError(f"{name} must not be imported when versions already disagree")


def test_a_newest_dask_beside_an_old_distributed_is_named():
    # What a resolver did when dask 2026.11.0 had no distributed of its release.
    version, requires = _fake({"dask": "2026.11.0", "distributed": "2021.4.1"},
                              {"dask": ['distributed<2026.11.1,>=2026.11.0; extra == "distributed"'],
                               "distributed": ["dask==2021.04.1"]})
    problems = dask_problems(version, requires, _no_import)
    text = "\n".join(problems)
    assert "dask 2026.11.0 and distributed 2021.4.1 are different releases" in text
    assert "distributed 2021.4.1 requires dask==2021.04.1, but dask 2026.11.0" in text
    assert "dask[distributed] 2026.11.0 requires distributed<2026.11.1,>=2026.11.0" in text
    assert 'pip install "dask[array,distributed]==2021.4.1"' in text
    with pytest.raises(AssertionError, match="installed versions do not fit together"):
        assert not problems, _explain(problems)


def test_a_distributed_that_does_not_import_is_named():
    version, requires = _fake({"dask": "2026.8.0", "distributed": "2026.8.0"},
                              {"distributed": ["dask<2026.8.1,>=2026.8.0"]})

    def broken(name):
        raise ImportError("cannot import name 'collections_to_dsk' from 'dask.base'")

    (problem, fix) = dask_problems(version, requires, broken)
    assert problem.startswith("distributed 2026.8.0 does not import beside dask 2026.8.0: "
                              "ImportError: cannot import name 'collections_to_dsk'")
    assert fix.startswith('fix: pip install "dask[array,distributed]==2026.8.0"')
    assert dask_problems(version, requires, lambda name: None) == []


def test_a_zarr_2_or_a_numcodecs_zarr_refuses_is_named():
    version, requires = _fake({"zarr": "2.18.7", "numcodecs": "0.16.6"}, {})
    assert "zarr 2.18.7 is installed; the activation cache writes zarr v3" in zarr_problems(
        version, requires, _no_import)[0]
    version, requires = _fake({"zarr": "3.1.6", "numcodecs": "0.13.1"},
                              {"zarr": ["numcodecs>=0.14", "numpy>=2.0"]})
    problems = zarr_problems(version, requires, _no_import)
    assert problems[0] == "zarr 3.1.6 requires numcodecs>=0.14, but numcodecs 0.13.1 is installed"
    assert problems[-1].startswith('fix: pip install -U "sklearn_lib[cache]"')
    version, requires = _fake({"zarr": "3.1.6"}, {})
    assert zarr_problems(version, requires, _no_import)[0] == (
        "zarr 3.1.6 is installed without numcodecs")


def test_a_package_below_sklearn_libs_range_is_named():
    version, requires = _fake({"dask": "2023.12.1", "zarr": "3.1.6"},
                              {"sklearn-lib": ['dask[array,distributed]>=2024.1; extra == "scale"',
                                               'zarr>=3; extra == "cache"',
                                               'nnsight>=0.4; extra == "models"']})
    assert bound_problems(version, requires) == [
        "sklearn_lib requires dask>=2024.1, but dask 2023.12.1 is installed"]


def test_pip_check_names_a_broken_requirement(tmp_path, monkeypatch):
    # An installed distribution whose requirement is missing: pip check must fail on it.
    info = tmp_path / "sklearn_lib_broken_probe-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sklearn-lib-broken-probe\n"
                                   "Version: 1.0\nRequires-Dist: sklearn-lib-missing-probe>=1\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    status, output = pip_check()
    if "No module named pip" in output:
        pytest.skip("pip is not installed in this environment")
    assert status != 0
    assert ("sklearn-lib-broken-probe 1.0 requires sklearn-lib-missing-probe, "
            "which is not installed.") in output
