"""Evaluating one trained model on one EvalSet: captions, VQA and (Q-Former) retrieval.

Retrieval on the world counts a retrieved caption as right when it was written for an image of the
identical scene (same objects, attributes and places): duplicate scenes are indistinguishable, so
their captions are equally correct.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from vlbridge.compare.config import CompareConfig, EvalSet

Say = Callable[[str], None]


def evaluate_set(config: CompareConfig, model, spec: EvalSet, say: Say, retrieval_model=None) -> dict[str, Any]:
    """Captioning and VQA with the trained (stage-2) model; retrieval with `retrieval_model`, the
    run's stage-1 model, when it has one."""
    from vlbridge import evaluate as ev

    out: dict[str, Any] = {}
    if spec.captions and "caption" in spec.tasks:
        say(f"  {spec.name}: captioning")
        groups = ev.load_caption_groups(spec.captions, spec.images, spec.limit)
        out["caption"] = ev.evaluate_captions(model, groups, {"prompt": config.caption_prompt or None, "generation": config.generation,
                                                              "meteor": False})
    if spec.questions and "vqa" in spec.tasks:
        say(f"  {spec.name}: VQA")
        pattern = {"image_pattern": spec.image_pattern} if spec.image_pattern else {}
        records = ev.load_vqa_records(spec.questions, spec.annotations, spec.images, spec.limit, **pattern)
        generation = {**config.generation, "max_new_tokens": 5}
        out["vqa"] = ev.evaluate_vqa(model, records, {"prompt": config.vqa_prompt, "generation": generation})
    if spec.captions and "retrieval" in spec.tasks and retrieval_model is not None:
        say(f"  {spec.name}: retrieval (stage-1 model)")
        groups = ev.load_caption_groups(spec.captions, spec.images, spec.retrieval_limit or spec.limit)
        out["retrieval"] = scene_retrieval(retrieval_model, groups, spec.scenes, k=spec.retrieval_k)
    return out


def scene_keys(groups: list, scenes_file: str | None) -> list[Any]:
    """One key per image: identical scenes share it; without scenes, every image is its own."""
    if not scenes_file:
        return [g.image_id for g in groups]
    scenes = {s["image_id"]: s for s in json.loads(Path(scenes_file).read_text(encoding="utf-8"))}
    keys = []
    for g in groups:
        objects = scenes[g.image_id]["objects"]
        keys.append(tuple(sorted(json.dumps(o, sort_keys=True) for o in objects)))
    return keys


def scene_retrieval(model, groups: list, scenes_file: str | None, k: int = 16) -> dict[str, Any]:
    """Recall@1/5/10 both ways from ITC and from ITM re-ranking, with scene-level correctness."""
    from vlbridge.data import flatten_groups
    from vlbridge.evaluate import image_inputs
    from vlbridge.metrics.retrieval import query_ranks, recall_at_k

    flat = flatten_groups(groups)
    keys = scene_keys(groups, scenes_file)
    same = {}
    for i, key in enumerate(keys):
        same.setdefault(key, []).append(i)
    image_pos = [sorted(t for j in same[keys[i]] for t in flat.img2txt[j]) for i in range(len(groups))]
    text_pos = [same[keys[flat.txt2img[t]]] for t in range(len(flat.texts))]
    result = model.retrieve(image_inputs([g.image for g in groups]), flat.texts, k=k)
    out: dict[str, Any] = {"num_images": len(groups), "num_texts": len(flat.texts), "distinct_scenes": len(same),
                           "notes": ["percent; a caption of an identical scene counts as right"]}
    for name, i2t, t2i in (("itc", result.itc, result.itc.t()), ("itm", result.i2t, result.t2i)):
        i2t_r = recall_at_k(query_ranks(i2t.float().cpu().numpy(), image_pos))
        t2i_r = recall_at_k(query_ranks(t2i.float().cpu().numpy(), text_pos))
        out[name] = {**{f"i2t_r{k_}": v for k_, v in i2t_r.items()}, **{f"t2i_r{k_}": v for k_, v in t2i_r.items()}}
    return out
