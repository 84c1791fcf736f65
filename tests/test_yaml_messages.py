"""Malformed YAML is reported by the file's name and the line and column, without PyYAML's name for
the text it parsed ('in "<unicode string>"'), which names nothing the user has."""

from __future__ import annotations

import pytest

from vlbridge.errors import InputFileError
from vlbridge.files.userfiles import read_yaml


@pytest.mark.parametrize("text, expected", [
    ("stage: 1\ndata:\n\ttrain: {}\n", "found character '\\t' that cannot start any token at line 3, column 1"),
    ("a: [1, 2\nb: 3\n", "while parsing a flow sequence at line 1, column 4"),
])
def test_malformed_yaml_names_the_line_not_a_unicode_string(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputFileError) as info:
        read_yaml(path, "training config")
    message = str(info.value)
    assert message.startswith(f"training config {str(path)!r}: malformed YAML: ") and expected in message
    assert "<unicode string>" not in message
