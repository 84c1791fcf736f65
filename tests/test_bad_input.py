"""Files users hand us that cannot be read: binary, not UTF-8, UTF-16, empty, truncated, the wrong
format. Each is a clear error naming the file and what would be right (exit 2 from the CLI, one
paragraph), never an internal error or a decoder's traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vlbridge
from vlbridge.cli.main import main
from vlbridge.data.coco import read_coco_captions
from vlbridge.data.jsonl import read_jsonl
from vlbridge.data.records import DataError
from vlbridge.data.vqa import read_vqa
from vlbridge.errors import VLBridgeError, WeightsError
from vlbridge.files.weights import read_tensors

# name -> (file bytes, a phrase the reason must contain)
UNREADABLE = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary data"),
    "latin-1": ("name: caf\xe9\nencoder: {use: eva-vit-g}\n".encode("latin-1"), "not UTF-8 (byte 0xe9"),
    "utf-16": ("name: a\n".encode("utf-16"), "UTF-16 text, not UTF-8"),
    "empty": (b"", "empty"),
}


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def assert_user_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    assert "internal error" not in err and "Traceback" not in err and "UnicodeDecodeError" not in err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_validate_an_unreadable_file_exits_2_with_the_reason(tmp_path, capsys, case):
    data, reason = UNREADABLE[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(data)
    code, err = cli(capsys, "validate", str(path))
    assert_user_error(code, err, str(path), reason)
    code, out = main(["validate", str(path), "--json"]), capsys.readouterr().out
    assert code == 2 and any(reason in problem for problem in json.loads(out)["problems"])


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_train_config_unreadable(tmp_path, capsys, case):
    data, reason = UNREADABLE[case]
    path = tmp_path / "train.yaml"
    path.write_bytes(data)
    assert_user_error(*cli(capsys, "train", str(path)), str(path), reason)


def test_compare_config_unreadable(tmp_path, capsys):
    path = tmp_path / "compare.yaml"
    path.write_bytes(UNREADABLE["latin-1"][0])
    assert_user_error(*cli(capsys, "compare", str(path)), "comparison config", "not UTF-8")


def test_a_yaml_list_where_a_mapping_belongs(tmp_path, capsys):
    path = tmp_path / "train.yaml"
    path.write_text("- stage: 2\n", encoding="utf-8")
    assert_user_error(*cli(capsys, "train", str(path)), "expected a mapping of settings, got list")


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    return tmp_path


def test_jsonl_bad_encoding_names_the_line(image_dir):
    path = image_dir / "train.jsonl"
    path.write_bytes(b'{"image": "a.png", "text": "red"}\n{"image": "a.png", "text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl.*line 2: not UTF-8 \(byte 0xe9 at byte offset \d+\)"):
        read_jsonl(path)


def test_jsonl_binary_file(image_dir):
    path = image_dir / "train.jsonl"
    path.write_bytes(UNREADABLE["binary"][0])
    with pytest.raises(DataError, match=r"train\.jsonl.*line 1: (not UTF-8|binary data)"):  # read line by line
        read_jsonl(path)


def test_coco_captions_not_utf8(image_dir):
    path = image_dir / "captions.json"
    path.write_bytes(b'[{"image": "a.png", "caption": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"captions\.json.*not UTF-8"):
        read_coco_captions(path)


def test_vqa_questions_binary_and_malformed(image_dir):
    path = image_dir / "questions.json"
    path.write_bytes(UNREADABLE["binary"][0])
    with pytest.raises(DataError, match=r"questions\.json.*binary data"):
        read_vqa(path)
    path.write_text('{"questions": [', encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON at line 1"):
        read_vqa(path)


def test_data_config_file_with_bad_encoding_is_a_cli_error(image_dir, capsys):
    path = image_dir / "data.yaml"
    path.write_bytes(UNREADABLE["utf-16"][0])
    code, err = cli(capsys, "cache-features", "-a", "tiny-qformer-opt", "--data", str(path), "--out", str(image_dir / "cache"))
    assert_user_error(code, err, "UTF-16")


def test_a_tokenizer_directory_with_broken_json_names_the_file(tmp_path):
    """A local OPT directory whose tokenizer.json was cut short: the error names that file."""
    import transformers

    from vlbridge.plugins.tiny_assets import tokenizer_dir

    config = transformers.OPTConfig(vocab_size=300, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                    word_embed_proj_dim=16, max_position_embeddings=64)
    out = tmp_path / "opt"
    transformers.OPTForCausalLM(config).save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir("opt"))).save_pretrained(out)
    tokenizer_file = out / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_file.read_text(encoding="utf-8")[:200], encoding="utf-8")
    spec = vlbridge.get_registry().resolve("llm", "opt").spec
    with pytest.raises(VLBridgeError, match=r"tokenizer\.json.*malformed JSON"):
        llm = spec.load_factory()(spec.options(model=str(out)))
        llm.tokenize(["a"])  # a lazily loaded tokenizer fails here


def test_garbage_weight_files(tmp_path):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        read_tensors(fake)
    pth = tmp_path / "model.pth"
    pth.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(WeightsError, match="is not a PyTorch checkpoint.*written by torch.save"):
        read_tensors(pth)
    truncated = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(WeightsError, match="truncated"):
        read_tensors(truncated)


def test_a_checkpoint_with_broken_files_is_refused_by_load_and_the_cli(tmp_path, capsys):
    model = vlbridge.build("tiny-qformer-opt", stage=2)
    ckpt = tmp_path / "ckpt"
    model.save(ckpt)
    meta = ckpt / "checkpoint.json"
    original = meta.read_bytes()
    meta.write_bytes(b"\xff\xfe{")
    with pytest.raises(VLBridgeError, match=r"checkpoint\.json.*UTF-16"):
        vlbridge.load(ckpt)
    meta.write_text("[]", encoding="utf-8")
    with pytest.raises(VLBridgeError, match="expected an object at the top level, found an array"):
        vlbridge.load(ckpt)
    meta.write_bytes(original)
    weights = next(ckpt.glob("*.safetensors"))
    weights.write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        vlbridge.load(ckpt)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    assert_user_error(*cli(capsys, "caption", "-c", str(ckpt), str(tmp_path / "a.png")), weights.name, "not a safetensors file")
