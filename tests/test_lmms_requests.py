"""Reading lmms-eval requests and the wrapper's settings: torch- and lmms-eval-free, so these run in
every install. What a vlbridge model cannot answer is refused with the task's name and what is missing."""

from __future__ import annotations

import pytest
from PIL import Image

from vlbridge.lmms.options import LmmsEvalSpec, WrapperOptions
from vlbridge.lmms.requests import TaskRefused, clean_text, generation_settings, one_image, read_likelihood, stop_at

IMAGE = Image.new("RGB", (8, 8))


def test_one_image_per_request_and_the_rest_refused_by_name():
    assert one_image("t", 0, [IMAGE]).size == (8, 8)
    assert one_image("t", 0, ["/data/a.png"]) == "/data/a.png"
    with pytest.raises(TaskRefused, match=r"'mmmu_val' \(doc 3\) gives 2 images in one request.*multi-image"):
        one_image("mmmu_val", 3, [IMAGE, IMAGE])
    with pytest.raises(TaskRefused, match=r"'textonly' \(doc 0\) gives no image.*text-only"):
        one_image("textonly", 0, [])
    with pytest.raises(TaskRefused, match=r"gives a video \(clip.mp4\)"):
        one_image("videomme", 1, ["clip.mp4"])


def test_unconditional_likelihoods_are_refused_naming_the_metric():
    with pytest.raises(TaskRefused, match="acc_mutual_info"):
        read_likelihood(("", " choice"), lambda task, split: [])


def test_generation_settings_map_lmms_evals_kwargs():
    until, options, ignored = generation_settings("t", {"until": "\n", "max_new_tokens": 7, "temperature": 0, "top_p": 1.0,
                                                        "num_beams": 3, "image_aspect_ratio": "pad"}, 32)
    assert until == ["\n"] and ignored == ["image_aspect_ratio"]
    assert options == {"max_new_tokens": 7, "num_beams": 3, "do_sample": False}  # temperature 0: greedy/beam, no nucleus
    assert generation_settings("t", {"temperature": 0.7}, 5)[1] == {"max_new_tokens": 5, "num_beams": 1, "do_sample": True,
                                                                    "temperature": 0.7}
    with pytest.raises(TaskRefused, match="temperature 0.0"):
        generation_settings("t", {"do_sample": True, "temperature": 0}, 5)
    with pytest.raises(TaskRefused, match=r"generation_kwargs \['frequency_penalty'\]"):
        generation_settings("t", {"frequency_penalty": 1.0}, 5)


def test_stop_strings_and_image_tags():
    assert stop_at("red circle\nQuestion: what", ["\n", "Question:"]) == "red circle"
    assert stop_at("abc", []) == "abc"
    assert clean_text("<image>\nWhat colour?") == "What colour?"


def test_model_args_say_what_is_wrong():
    with pytest.raises(ValueError, match="exactly one of them"):
        WrapperOptions(checkpoint="a", assembly="tiny-qformer-opt")
    with pytest.raises(ValueError, match="exactly one of them"):
        WrapperOptions()
    with pytest.raises(ValueError, match="did you mean 'cuda'"):
        WrapperOptions(assembly="tiny-qformer-opt", device="gpu")
    with pytest.raises(ValueError, match="dtype 'half' is not one of auto, fp32, bf16, fp16"):
        WrapperOptions(assembly="tiny-qformer-opt", dtype="half")
    with pytest.raises(ValueError, match=r"prompt must hold '\{\}' exactly once"):
        WrapperOptions(assembly="tiny-qformer-opt", prompt="Question: Short answer:")
    with pytest.raises(ValueError, match="weights= goes with assembly="):
        WrapperOptions(checkpoint="ckpt", weights="w.safetensors")


def test_a_compare_block_needs_somewhere_to_find_its_tasks(tmp_path):
    with pytest.raises(ValueError, match="include_defaults: false leaves no task"):
        LmmsEvalSpec(tasks=["vqav2_val_lite"], include_defaults=False)
    (tmp_path / "t.yaml").write_text("task: t\n", encoding="utf-8")
    spec = LmmsEvalSpec(tasks=["t"], include_path=str(tmp_path), include_defaults=False)
    assert spec.local_files() == [str(tmp_path / "t.yaml")]
