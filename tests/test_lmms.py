"""vlbridge models inside lmms-eval: its real evaluator runs local tasks (written here, no hub) on a
tiny random assembly and on tiny imported transformers BLIP-2s (OPT and FlanT5); answers equal
`model.answer` / `model.generate` on the same inputs, and loglikelihoods equal a token-by-token
computation with the model. Skipped where the lmms-eval extra is not installed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason='needs the lmms-eval extra: pip install -e ".[test,lmms-eval]"')

import torch  # noqa: E402

import vlbridge  # noqa: E402
from tests import hf_tiny  # noqa: E402
from tests.lmms_tasks import MC_TASK, SHAPES, VQA_TASK, examples, scene, vqa_inputs, write_tasks  # noqa: E402
from vlbridge.errors import VLBridgeError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "Question: {} Short answer:"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path_factory.mktemp("lmms")
    os.environ["HF_DATASETS_CACHE"] = str(folder / "hf-datasets")  # never the user's cache
    return write_tasks(folder / "tasks")


@pytest.fixture(scope="module", params=["tiny-qformer-opt", "hf-blip2-opt", "hf-blip2-t5"])
def model(request, tmp_path_factory):
    if request.param.startswith("hf-blip2"):
        root = tmp_path_factory.mktemp(request.param)
        hf_tiny.make_generation_model(root / "hf", request.param.rsplit("-", 1)[1])
        return vlbridge.load(vlbridge.import_hf_blip2(root / "hf", root / "ours"))
    return vlbridge.build(request.param)


def evaluate(model, tasks: Path, names: list[str], **settings):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlbridge.lmms.model import VLBridgeLMM

    manager = TaskManager("WARNING", include_path=str(tasks), include_defaults=False)
    wrapper = VLBridgeLMM.wrap(model, **settings)
    return simple_evaluate(model=wrapper, tasks=names, task_manager=manager, log_samples=True, bootstrap_iters=0,
                           verbosity="WARNING")


def direct_logprob(model, image, prompt: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation) one token at a time (chain rule), each step a fresh forward pass of the
    LLM's transformers model on the visual prompt: no labels, no batching, no shared code with the wrapper."""
    llm = model.llm
    text = llm.format_prompt(prompt)
    with torch.no_grad():
        visual = model.visual_tokens(model.pixel_values([image]), instructions=[prompt])
        ids, mask = llm.tokenize([text])
        if llm.is_encoder_decoder:
            target = llm.tokenizer(continuation, add_special_tokens=False).input_ids
            embeds, emask = llm.visual_prompt(visual, ids, mask)
            start = llm.model.config.decoder_start_token_id
            steps = [llm.model(inputs_embeds=embeds, attention_mask=emask, decoder_input_ids=torch.tensor([[start, *target[:k]]])
                               ).logits[0, -1] for k in range(len(target))]
        else:
            whole = llm.tokenize([text + continuation])[0][0].tolist()
            target = whole[ids.shape[1]:]
            steps = []
            for k in range(len(target)):
                prefix = torch.tensor([whole[:ids.shape[1] + k]])
                embeds, emask = llm.visual_prompt(visual, prefix, torch.ones_like(prefix))
                steps.append(llm.model(inputs_embeds=embeds, attention_mask=emask).logits[0, -1])
    logprob = sum(torch.log_softmax(step.float(), -1)[token].item() for step, token in zip(steps, target))
    return logprob, all(step.argmax().item() == token for step, token in zip(steps, target))


def test_lmms_eval_finds_vlbridge_through_its_entry_point():
    from lmms_eval.models import get_model

    from vlbridge.lmms.model import VLBridgeLMM

    assert get_model("vlbridge") is VLBridgeLMM


def test_answers_equal_model_answer(model, tasks):
    results = evaluate(model, tasks, [VQA_TASK], prompt=PROMPT, batch_size=4)
    samples = sorted(results["samples"][VQA_TASK], key=lambda s: s["doc_id"])
    images, questions = vqa_inputs(tasks)
    expected = model.answer(images, questions, prompt=PROMPT, num_beams=1, max_new_tokens=6)
    assert [s["filtered_resps"][0] for s in samples] == expected
    assert any(expected), "the tiny models should say something"
    answers = [colour for colour, _ in examples(len(images))]
    assert results["results"][VQA_TASK]["exact_match,none"] == sum(e.lower() == a for e, a in zip(expected, answers)) / len(answers)


def test_multiple_choice_loglikelihoods_equal_a_direct_computation(model, tasks):
    results = evaluate(model, tasks, [MC_TASK], batch_size=3)
    for sample in results["samples"][MC_TASK]:
        colour, shape = examples(6)[sample["doc_id"]]
        direct = [direct_logprob(model, scene(colour, shape), "Which shape is it?", " " + choice) for choice in SHAPES]
        returned = sample["filtered_resps"]  # lmms-eval's convention: (-log P, greedy), the smaller the likelier
        assert [-nll for nll, _ in returned] == pytest.approx([lp for lp, _ in direct], abs=1e-4)
        assert [greedy for _, greedy in returned] == [greedy for _, greedy in direct]
        best = max(range(len(SHAPES)), key=lambda i: direct[i][0])
        assert sample["acc"] == float(best == SHAPES.index(shape))


def test_beam_search_stop_strings_and_the_instruction(tasks):
    """generate_until called as lmms-eval calls it: beams equal model.generate's, `until` cuts the
    answer, and the connector is handed the task text (what an InstructBLIP Q-Former reads)."""
    from lmms_eval.api.instance import Instance

    from vlbridge.lmms.model import VLBridgeLMM

    model = vlbridge.build("tiny-qformer-opt")
    docs = [{"image": scene(c, s)} for c, s in examples(3)]
    wrapper = VLBridgeLMM.wrap(model, prompt=PROMPT, batch_size=2)
    wrapper.task_dict = {"t": {"test": docs}}

    def ask(kwargs: dict) -> list[str]:
        return wrapper.generate_until([Instance("generate_until", ("What is it?", dict(kwargs), lambda d: [d["image"]], i, "t", "test"),
                                                idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}) for i in range(3)])

    images = [d["image"] for d in docs]
    beams = ask({"num_beams": 3, "max_new_tokens": 8, "until": []})
    assert beams == model.generate(images, prompt=PROMPT.format("What is it?"), num_beams=3, max_new_tokens=8)
    full = ask({"max_new_tokens": 8, "until": []})
    stop = full[0][len(full[0]) // 2]
    cut = ask({"max_new_tokens": 8, "until": [stop]})
    assert cut[0] == full[0][:full[0].index(stop)] and len(cut[0]) < len(full[0])

    seen: list = []
    original = model.visual_tokens
    model.visual_tokens = lambda *args, **kwargs: seen.append(kwargs.get("instructions")) or original(*args, **kwargs)
    ask({"max_new_tokens": 2})
    assert seen == [[PROMPT.format("What is it?")] * 2, [PROMPT.format("What is it?")]]


def test_multi_round_requests_are_one_generation_per_round():
    from lmms_eval.api.instance import Instance

    from vlbridge.lmms.model import VLBridgeLMM

    model = vlbridge.build("tiny-qformer-opt")
    image = scene("red", "circle")
    wrapper = VLBridgeLMM.wrap(model, batch_size=2)
    wrapper.task_dict = {"chat": {"test": [{"image": image}]}}

    def next_round(doc, previous_output, round_idx, previous_round_info):
        return [doc["image"]], f"And after {previous_output[-1]!r}?", round_idx == 2, [previous_output], None

    args = ("What is it?", {"max_new_tokens": 4}, lambda d: [d["image"]], next_round, 0, "chat", "test")
    rounds = wrapper.generate_until_multi_round([Instance("generate_until_multi_round", args, idx=0,
                                                          metadata={"task": "chat", "doc_id": 0, "repeats": 1})])[0]
    first = model.generate([image], prompt="What is it?", max_new_tokens=4)[0]
    assert rounds == (first, model.generate([image], prompt=f"And after {first!r}?", max_new_tokens=4)[0])


def test_rank_and_world_size_come_from_the_launcher(monkeypatch):
    from vlbridge.lmms.model import VLBridgeLMM

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    wrapper = VLBridgeLMM(assembly="tiny-linear-opt", device="cpu", batch_size="4")
    assert (wrapper.rank, wrapper.world_size, wrapper.batch_size) == (1, 2, 4)
    with pytest.raises(VLBridgeError, match="bad --model_args.*exactly one of them"):
        VLBridgeLMM(batch_size=1)
    with pytest.raises(VLBridgeError, match="not lmms-eval's auto sizing"):
        VLBridgeLMM(assembly="tiny-linear-opt", batch_size="auto")


def test_python_m_lmms_eval_runs_a_checkpoint_on_local_tasks(tasks, tmp_path):
    vlbridge.build("tiny-qformer-opt").save(tmp_path / "ckpt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "vlbridge", "--model_args", f"checkpoint={tmp_path / 'ckpt'},device=cpu",
               "--tasks", f"{VQA_TASK},{MC_TASK}", "--include_path", str(tasks), "--limit", "2", "--batch_size", "2",
               "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [found] = list((tmp_path / "out").rglob("*_results.json"))
    results = json.loads(found.read_text())["results"]
    assert set(results) == {VQA_TASK, MC_TASK}
    assert not math.isnan(results[MC_TASK]["acc,none"])


def test_a_context_ending_in_whitespace_scores_the_whole_continuation():
    """A context's trailing space is scored with the continuation's first word, as BPE merges them in
    the text (lm-eval moves the space there for this reason). Counted as the context's own token, it
    took the first word's place, so 'Which shape is it? ' + 'square' scored only the word's later
    tokens (or refused the request as adding no token). A trailing newline, a token of its own in the
    text too (as a chat template's last one), stays the context's."""
    from lmms_eval.api.instance import Instance

    from vlbridge.lmms.model import VLBridgeLMM

    model = vlbridge.build("tiny-linear-opt")
    image = scene("red", "square")
    wrapper = VLBridgeLMM.wrap(model, batch_size=2)
    wrapper.task_dict = {"t": {"test": [{"image": image}]}}
    pairs = [("Which shape is it? ", "square"), ("Which shape is it?\n", "a red square")]
    scored = wrapper.loglikelihood([Instance("loglikelihood", (context, choice, lambda d: [d["image"]], 0, "t", "test"), idx=i,
                                             metadata={"task": "t", "doc_id": 0, "repeats": 1})
                                    for i, (context, choice) in enumerate(pairs)])
    direct = [direct_logprob(model, image, "Which shape is it?", " square"), direct_logprob(model, image, "Which shape is it?\n", "a red square")]
    assert [-result.text[0] for result in scored] == pytest.approx([logprob for logprob, _ in direct], abs=1e-4)


def test_an_unknown_model_arg_is_named_with_the_ones_there_are():
    from vlbridge.lmms.model import VLBridgeLMM

    with pytest.raises(VLBridgeError, match=r"chekpoint: Extra inputs.*takes prompt, batch_size, max_new_tokens, checkpoint, assembly"):
        VLBridgeLMM(assembly="tiny-linear-opt", chekpoint="runs/x")
    with pytest.raises(VLBridgeError, match=r"promt: Extra inputs.*takes prompt, batch_size, max_new_tokens\)"):
        VLBridgeLMM.wrap(object(), promt="Question: {}")


def test_a_request_past_the_llm_context_is_refused_by_length():
    """An lmms-eval context longer than OPT's positions failed inside its forward with a bare IndexError."""
    from lmms_eval.api.instance import Instance

    from vlbridge.lmms.model import VLBridgeLMM

    model = vlbridge.build("tiny-linear-opt")  # OPT with 128 positions
    wrapper = VLBridgeLMM.wrap(model, batch_size=2)
    wrapper.task_dict = {"t": {"test": [{"image": scene("red", "square")}]}}
    request = Instance("loglikelihood", ("word " * 200, " square", lambda d: [d["image"]], 0, "t", "test"), idx=0,
                       metadata={"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(VLBridgeError, match=r"tokens long .* past the LLM's context of 128 positions"):
        wrapper.loglikelihood([request])
