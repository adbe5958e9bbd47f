"""The known-bad version table (xlstm_jax.compat) and the installed-versions probe."""

import jax
import pytest

from xlstm_jax import compat

GOOD_03 = dict(jax_version="0.11.2", triton_version="3.6.0", jax_triton_version="0.3.1", compute_capability=(8, 0))
GOOD_04 = dict(jax_version="0.11.0", triton_version="3.7.1", jax_triton_version="0.4.0", compute_capability=(9, 0))


def _severities(**kwargs):
    return [severity for severity, _ in compat.version_problems(**kwargs)]


@pytest.mark.parametrize("combo", [GOOD_03, GOOD_04, {**GOOD_04, "jax_triton_version": "0.4.2"},
                                   {**GOOD_04, "jax_triton_version": "0.4.1", "triton_version": "3.6.0",
                                    "compute_capability": (8, 0)}])
def test_supported_combinations_have_no_problems(combo):
    assert compat.version_problems(**combo) == []


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"jax_triton_version": "0.4.0", "triton_version": "3.5.1", "jax_version": "0.11.0"}, "triton >= 3.6"),
        ({"jax_triton_version": "0.4.0", "triton_version": "3.7.1", "jax_version": "0.10.2"}, "jax >= 0.11"),
        ({"jax_triton_version": "0.3.0", "triton_version": "3.5.1"}, "jax-triton#365"),
        ({"jax_triton_version": "0.3.1", "triton_version": "3.5.0"}, "needs triton >= 3.6"),
        ({"jax_triton_version": "0.3.1", "jax_version": "0.8.1"}, "jax >= 0.8.2"),
        ({"jax_triton_version": "0.2.0", "triton_version": "3.6.0"}, "not supported"),
        ({"jax_triton_version": None, "triton_version": "3.5.0"}, "triton >= 3.6"),
        ({"jax_triton_version": None, "triton_version": "3.6.0rc1"}, "triton >= 3.6"),
    ],
)
def test_refused_combinations_are_errors(change, needle):
    problems = compat.version_problems(**{**GOOD_03, **change})
    errors = [message for severity, message in problems if severity == "error"]
    assert errors, problems
    assert any(needle in message for message in errors), errors


@pytest.mark.parametrize(
    "triton_version, cc, warned",
    [
        ("3.6.0", (9, 0), True),
        ("3.7.0", (9, 0), True),
        ("3.7.1rc1", (9, 0), True),
        ("3.7.1", (9, 0), False),
        ("3.8.0", (9, 0), False),
        ("3.6.0", (8, 0), False),
        ("3.6.0", (10, 0), False),
        ("3.6.0", None, False),
    ],
)
def test_hopper_trans_miscompile_warning(triton_version, cc, warned):
    jt = "0.3.1" if triton_version.startswith("3.6") else "0.4.0"
    problems = compat.version_problems(
        jax_version="0.11.2", triton_version=triton_version, jax_triton_version=jt, compute_capability=cc
    )
    warnings = [message for severity, message in problems if severity == "warning" and "fla#640" in message]
    assert bool(warnings) == warned, problems
    assert all(severity != "error" for severity, _ in problems), problems


def test_untested_versions_warn_but_run():
    assert _severities(**{**GOOD_03, "jax_triton_version": "0.3.0"}) == ["warning"]
    assert _severities(**{**GOOD_04, "jax_triton_version": "0.5.0"}) == ["warning"]


def test_missing_packages_are_not_version_problems():
    assert compat.version_problems(
        jax_version="0.10.2", triton_version=None, jax_triton_version=None, compute_capability=None
    ) == []


@pytest.mark.parametrize(
    "installed, minimum, expected",
    [
        ("3.6.0", "3.6", True),
        ("3.6", "3.6.0", True),
        ("3.10.0", "3.7.1", True),
        ("3.7.0+git1a2b3c", "3.7.1", False),
        ("3.7.1+git1a2b3c", "3.7.1", True),
        ("v3.7.1-custom", "3.7.1", True),
        ("0.8.1.dev20250101", "0.8.2", False),
    ],
)
def test_version_comparison_is_tolerant(installed, minimum, expected):
    assert compat.version_at_least(installed, minimum) is expected


def test_unparseable_version_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot read a version"):
        compat.version_at_least("nightly", "3.6")


@pytest.mark.parametrize("value, expected", [("9.0", (9, 0)), (8.6, (8, 6)), ((12, 0), (12, 0)), (None, None)])
def test_parse_compute_capability(value, expected):
    assert compat.parse_compute_capability(value) == expected


def test_installed_versions_on_this_machine():
    versions = compat.installed_versions()
    assert versions["jax"] == jax.__version__
    assert versions["platform"] == jax.devices()[0].platform
    assert set(versions) >= {"python", "jax", "jaxlib", "triton", "jax_triton", "gpu", "compute_capability"}
    if versions["platform"] != "gpu":
        assert versions["gpu"] is None and versions["compute_capability"] is None
    assert isinstance(compat.installed_problems(versions), list)


def test_fallback_parser_without_packaging(monkeypatch):
    combos = [GOOD_03, GOOD_04, {**GOOD_04, "triton_version": "3.6.0"}, {**GOOD_03, "jax_triton_version": "0.2.0"}]
    expected = [compat.version_problems(**combo) for combo in combos]
    monkeypatch.setattr(compat, "Version", None)
    assert compat.version_at_least("3.6.0+git1", "3.6")
    assert not compat.version_at_least("3.5.1", "3.6")
    assert [compat.version_problems(**combo) for combo in combos] == expected


@pytest.mark.parametrize("version, takes", [("0.3.1", True), ("0.4.1", False), ("0.4.1.dev20261201", False),
                                            ("0.5.0", False)])
def test_aliasing_follows_the_jax_triton_version(version, takes):
    """jax-triton 0.3 gives an aliased output a kernel parameter of its own, 0.4 does not (our kernels take every
    output as a parameter; passed as they are, the fused step failed on the GPU: 'out_type has 3 unaliased
    outputs, but 4 kernel parameters are missing an argument'; the launch layer rearranges them, test_launch.py)."""
    from types import SimpleNamespace

    from xlstm_jax.kernels.launch import _aliased_outputs_take_parameters

    assert _aliased_outputs_take_parameters(SimpleNamespace(__version__=version)) is takes


def _versions(cc, jax_triton, triton="3.6.0", jax="0.11.2", encodes=True):
    return {"compute_capability": cc, "jax_triton": jax_triton, "triton": triton, "jax": jax,
            "jaxlib_tma_descriptors": encodes}


@pytest.mark.parametrize("versions,available,says", [
    (_versions((9, 0), "0.4.1"), True, "jax-triton 0.4.1 with triton 3.6.0 on compute capability 9.0"),
    (_versions((10, 0), "0.4.1", "3.7.1"), True, "compute capability 10.0"),
    (_versions((8, 0), "0.4.1"), False, "compute capability >= 9.0 (Hopper), found 8.0"),
    (_versions(None, "0.4.1"), False, "compute capability >= 9.0 (Hopper)"),
    (_versions((9, 0), "0.3.1"), False, "jax-triton >= 0.4, found 0.3.1"),
    (_versions((9, 0), None), False, "jax-triton >= 0.4"),
    (_versions((9, 0), "0.4.1", jax="0.10.2"), False, "jax >= 0.11, found 0.10.2"),
    (_versions((9, 0), "0.4.1", triton="3.5.1"), False, "triton >= 3.6, found 3.5.1"),
    (_versions((9, 0), "0.4.1", encodes=False), False, "create_tma_descriptor_parameter"),
])
def test_tma_support_names_what_is_missing(versions, available, says):
    ok, why = compat.tma_support(versions)
    assert ok is available and says in why


def test_both_memory_fraction_variables_are_an_error_only_with_the_cuda_plugin():
    both = {"XLA_CLIENT_MEM_FRACTION": "0.9", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
    problems = compat.environment_problems(both, cuda_plugin=True)
    assert [severity for severity, _ in problems] == ["error"]
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" in problems[0][1] and "CPU" in problems[0][1]
    assert compat.environment_problems(both, cuda_plugin=False) == []
    assert compat.environment_problems({"XLA_CLIENT_MEM_FRACTION": "0.9"}, cuda_plugin=True) == []


@pytest.mark.parametrize("value", ["false", "False", "0"])
def test_no_preallocation_without_a_memory_fraction_warns_of_the_75_percent_limit(value):
    problems = compat.environment_problems({"XLA_PYTHON_CLIENT_PREALLOCATE": value}, cuda_plugin=True)
    assert [severity for severity, _ in problems] == ["warning"] and "75%" in problems[0][1]
    with_fraction = {"XLA_PYTHON_CLIENT_PREALLOCATE": value, "XLA_CLIENT_MEM_FRACTION": "0.94"}
    assert compat.environment_problems(with_fraction, cuda_plugin=True) == []


def test_the_cli_refuses_conflicting_memory_fractions_before_running_jax(monkeypatch, capsys):
    from xlstm_jax import cli

    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.9")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    monkeypatch.setattr(compat, "cuda_plugin_installed", lambda: True)
    assert cli.main(["train", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: XLA_CLIENT_MEM_FRACTION and the older")
