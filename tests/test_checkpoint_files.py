"""A checkpoint folder whose connector file is not the one its checkpoint.json was saved with (a
tensor lost or added by damage or by hand) is refused by name: a lost tensor read as one the saved
model never had, loaded without a word and refused only when used, as if an old vlbridge wrote it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

torch = pytest.importorskip("torch")
import vlbridge  # noqa: E402
from vlbridge.cli.main import main  # noqa: E402
from vlbridge.errors import MissingWeightsError, WeightsError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RED = str(Path(__file__).parents[1] / "examples" / "images" / "red-circle.png")
TEXT_SIDE = "embeddings.word.weight"  # a stage-2 model never runs it for captions


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "stage2"
    vlbridge.build("tiny-qformer-opt").save(folder)
    return folder


def _edited(saved, tmp_path, change) -> str:
    folder = tmp_path / "edited"
    shutil.copytree(saved, folder)
    tensors = load_file(folder / "connector.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "connector.safetensors"))
    return str(folder)


def test_a_lost_tensor_is_named_not_read_as_absent(saved, tmp_path, capsys):
    folder = _edited(saved, tmp_path, lambda tensors: tensors.pop(TEXT_SIDE))
    recorded = json.loads((saved / "checkpoint.json").read_text())["tensors"]
    with pytest.raises(WeightsError, match=rf"holds {recorded - 1} tensors where .*checkpoint.json records {recorded}: the file "
                                           rf"has lost 1; of this connector's tensors it lacks {TEXT_SIDE}"):
        vlbridge.load(folder)
    assert main(["caption", "-c", folder, "--num-beams", "1", "--max-new-tokens", "2", RED]) == 2
    assert "has lost 1" in capsys.readouterr().err


def test_an_added_tensor_is_named(saved, tmp_path):
    folder = _edited(saved, tmp_path, lambda tensors: tensors.update(extra=torch.zeros(2)))
    with pytest.raises(WeightsError, match=r"the file has 1 more \(extra\), so it is not the one saved with that checkpoint.json"):
        vlbridge.load(folder)


def test_a_checkpoint_without_the_count_still_loads_what_it_has(saved, tmp_path):
    folder = _edited(saved, tmp_path, lambda tensors: tensors.pop(TEXT_SIDE))  # as an older vlbridge wrote them
    meta_path = tmp_path / "edited" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    del meta["tensors"], meta["connector"]
    meta_path.write_text(json.dumps(meta))
    assert vlbridge.load(folder).caption([RED], num_beams=1, max_new_tokens=2)


def test_a_misshaped_tensor_its_stage_never_trained_is_named_as_such_when_needed(saved, tmp_path):
    """It was left out (as the LLM projection of a stage-1 checkpoint for another LLM is) and then
    blamed on a checkpoint that lacked it, saved by an older vlbridge."""
    folder = _edited(saved, tmp_path, lambda tensors: tensors.update({TEXT_SIDE: torch.zeros(7, 3)}))
    model = vlbridge.load(folder)
    assert model.caption([RED], num_beams=1, max_new_tokens=2)  # captions never run the text side
    with pytest.raises(MissingWeightsError, match=rf"holds {TEXT_SIDE} \(\(7, 3\) in the file, \(\d+, \d+\) here\) in another "
                                                  "shape than this connector's") as caught:
        model.retrieve([RED], ["a red circle"], k=1)
    assert "saved before vlbridge kept the whole connector" not in str(caught.value)
