"""The command line, in-process: outputs, JSON shapes, and exit code 2 with a readable message on
every usage or config error (never a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vlbridge.cli.main import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_json_lists_builtins(capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    data = json.loads(out)
    assert code == 0
    names = {p["name"]: p for p in data["plugins"]}
    assert names["vlbridge.plugins.connectors.qformer"]["components"] == ["connector:qformer"]
    assert all(p["builtin"] and p["status"] == "loaded" for p in data["plugins"])
    assert data["duplicates"] == []


def test_components_json_has_option_schemas(capsys):
    code, out, _ = run(capsys, "components", "--kind", "connector", "--json")
    data = json.loads(out)
    assert code == 0 and [c["name"] for c in data] == ["linear", "mlp", "qformer"]
    qformer = data[2]
    assert qformer["options"]["properties"]["num_query_tokens"]["default"] == 32
    assert qformer["options"]["additionalProperties"] is False


def test_components_text_shows_descriptions(capsys):
    code, out, _ = run(capsys, "components", "--kind", "encoder")
    assert code == 0 and "encoder eva-vit-g" in out and "image_size = None: input resolution" in out


def test_presets_lists_blip2_and_tiny(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and "blip2-flan-t5-xxl" in out and "tiny-qformer-opt" in out


@pytest.mark.parametrize("preset", ["blip2-opt-2.7b", "blip2-flan-t5-xl", "llava-linear-opt-2.7b", "tiny-mlp-opt"])
def test_validate_preset_prints_plan(capsys, preset):
    code, out, _ = run(capsys, "validate", preset)
    assert code == 0 and out.strip().endswith("valid") and "tokens" in out


def test_validate_json(capsys):
    code, out, _ = run(capsys, "validate", "blip2-opt-2.7b", "--json")
    data = json.loads(out)
    assert code == 0 and data["valid"] and data["plan"]["trainable_params"]["2"] == 107_133_696


BAD_ASSEMBLIES = {
    "unknown-part": ("name: a\nencoder: {use: eva-vit-gg}\nconnector: {use: qformer}\nllm: {use: opt}\n",
                     "unknown encoder 'eva-vit-gg'. Did you mean 'eva-vit-g'?"),
    "wrong-option-type": ("name: a\nencoder: {use: eva-vit-g}\nconnector: {use: qformer, options: {num_query_tokens: many}}\nllm: {use: opt}\n",
                          "connector.options.num_query_tokens: Input should be a valid integer"),
    "unknown-option": ("name: a\nencoder: {use: eva-vit-g}\nconnector: {use: qformer}\nllm: {use: opt, options: {size: 7b}}\n",
                       "llm.options.size: unknown option; valid options are: variant, model, dtype"),
    "mismatched-widths": ("name: a\nencoder: {use: clip-vit-l}\nconnector: {use: mlp, options: {encoder_width: 1408}}\nllm: {use: opt}\n",
                          "projector expects encoder width 1408 (connector.options.encoder_width) but the encoder gives 1024"),
    "too-many-tokens": ("name: a\nencoder: {use: clip-vit-l, options: {variant: tiny, image_size: 168}}\nconnector: {use: linear}\nllm: {use: opt, options: {variant: tiny}}\n",
                        "too many tokens"),
    "malformed-yaml": ("name: a\nencoder: [unclosed\n", "malformed YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_ASSEMBLIES))
def test_validate_errors_exit_2_with_a_message(capsys, tmp_path, case):
    text, expected = BAD_ASSEMBLIES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    code, out, err = run(capsys, "validate", str(path))
    assert code == 2
    assert expected in err
    assert "Traceback" not in err and out == ""
    code, out, _ = run(capsys, "validate", str(path), "--json")
    assert code == 2 and any(expected in p for p in json.loads(out)["problems"])


def test_validate_missing_file_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "validate", str(tmp_path / "missing.yaml"))
    assert code == 2 and "file not found" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["components", "--kind", "decoder"])
    assert exc.value.code == 2
    assert "invalid choice: 'decoder'" in capsys.readouterr().err
    assert main([]) == 2


def test_python_m_vlbridge_is_the_same_command():
    result = subprocess.run([sys.executable, "-m", "vlbridge", "validate", "tiny-qformer-opt", "--json"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["plan"]["connector_out"] == {"num_tokens": 8, "width": 64}
