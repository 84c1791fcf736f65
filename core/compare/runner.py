"""Running a comparison: feature caches, training per run and seed, evaluation, timing, results.

Every step writes under `output_dir` and is reused when found, so an interrupted comparison
resumes where it stopped (training itself resumes from its last checkpoint). Runs whose stage 1
would be trained identically (same assembly, connector options, steps, lr, seed, data, objective)
share one: it lives under `output_dir/stage1/<key>`, with the retrieval scores of its model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from vlbridge.assemblies.assembly import load_assembly
from vlbridge.errors import VLBridgeError
from vlbridge.files.atomic import atomic_write_text
from vlbridge.compare.config import CompareConfig, EvalSet, RunSpec
from vlbridge.compare.progress import PhaseProgress
from vlbridge.plugin.resources import presets, shipped_folders

Say = Callable[[str], None]


def resolve_assembly(run: RunSpec) -> dict[str, Any]:
    """The run's assembly as a mapping, with its connector option overrides applied."""
    if run.checkpoint is not None:
        from vlbridge.files.checkpoint import checkpoint_assembly

        return load_assembly(checkpoint_assembly(run.checkpoint)).config.model_dump(mode="json")
    if isinstance(run.assembly, dict):
        raw = copy.deepcopy(run.assembly)
    elif run.assembly in presets():
        raw = copy.deepcopy(presets()[run.assembly])
    else:
        raw = copy.deepcopy(load_assembly(run.assembly).config.model_dump(mode="json"))
    raw["name"] = run.name
    connector = raw.setdefault("connector", {})
    connector["options"] = {**connector.get("options", {}), **run.connector_options}
    return raw


def data_sources(config: CompareConfig) -> list[dict[str, Any]]:
    """Every distinct DataConfig the comparison trains on (stage 1, and each run's stage 2)."""
    sources = ([config.stage2_data] if config.stage2_data else []) + [r.stage2_data for r in config.runs if r.stage2_data] + \
        ([config.stage1_data] if config.stage1_data else [])
    unique = {json.dumps(s, sort_keys=True, default=str): s for s in sources}
    return list(unique.values())


def training_paths(config: CompareConfig) -> list[str]:
    """The training data files (what the feature cache encodes)."""
    return [p for data in data_sources(config) for p in data.get("paths", [])]


def _paths(*datas: dict[str, Any] | None) -> list[str]:
    return [p for data in datas if data for p in data.get("paths", [])]


def files_in(folder: str | Path) -> list[str]:
    """The files directly in a checkpoint folder: what weights a run evaluates or starts from."""
    return [str(path) for path in sorted(Path(folder).glob("*")) if path.is_file()]


def data_fingerprint(paths: list[str]) -> list[list[Any]]:
    """(path, size, mtime) of each file: a regenerated dataset changes it."""
    rows = []
    for path in sorted({str(p) for p in paths if p}):
        stat = Path(path).stat() if Path(path).exists() else None
        rows.append([path, stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    return rows


_IMAGE_DIGESTS: dict[str, str] = {}  # per process: what a set of images' files looked like when first asked


def forget_image_digests() -> None:
    _IMAGE_DIGESTS.clear()


def images_digest(refs: Any) -> str:
    """sha256 over each image file's path, size and modification time (a tar member: its shard's),
    as the feature cache stamps them: a picture replaced under the same name changes it."""
    from vlbridge.train.cache import file_stamp
    from vlbridge.train.cache_dataset import stamped_file

    digest = hashlib.sha256()
    for stamped in sorted({f for f in (stamped_file(ref) for ref in refs) if f is not None}):
        try:
            digest.update(f"{stamped}|{file_stamp(stamped)};".encode())
        except OSError:
            digest.update(f"{stamped}|missing;".encode())
    return digest.hexdigest()


def training_images(data: dict[str, Any] | None) -> str | None:
    """The digest of the images a training data config reads (None without data)."""
    if not data:
        return None
    label = json.dumps(data, sort_keys=True, default=str)
    if label not in _IMAGE_DIGESTS:
        from vlbridge.data.config import load_data_config
        from vlbridge.data.records import Skipped
        from vlbridge.train.cache_dataset import iter_samples

        try:
            samples = list(iter_samples(load_data_config(data, "data"), "data", keep_bytes=False))
        except VLBridgeError as exc:  # the run that reads it says what is wrong; the key only has to differ
            _IMAGE_DIGESTS[label] = f"unreadable: {exc}"
        else:
            _IMAGE_DIGESTS[label] = images_digest(s.image for s in samples if not isinstance(s, Skipped))
    return _IMAGE_DIGESTS[label]


def evaluation_images(spec: EvalSet) -> str:
    """The digest of the images an evaluation split scores (captioning, retrieval and VQA images)."""
    label = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    if label not in _IMAGE_DIGESTS:
        from vlbridge.compare.evaluation import vqa_records
        from vlbridge.evaluation.tasks import load_caption_groups

        try:
            refs = [g.image for g in load_caption_groups(spec.captions, spec.images, None)] if spec.captions else []
            refs += [r.image for r in vqa_records(spec)] if spec.questions else []
        except VLBridgeError as exc:  # the evaluation that reads it says what is wrong
            _IMAGE_DIGESTS[label] = f"unreadable: {exc}"
        else:
            _IMAGE_DIGESTS[label] = images_digest(refs)
    return _IMAGE_DIGESTS[label]


def _encoder_key(assembly: dict[str, Any], config: CompareConfig) -> str:
    """The cache folder's name: the encoder (name, options) and the training data it was run on."""
    text = json.dumps([assembly["encoder"]["use"], load_assembly(assembly).plan.encoder.options,
                       data_fingerprint(training_paths(config))], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def feature_cache(config: CompareConfig, assembly: dict[str, Any], say: Say) -> str | None:
    """A frozen-feature cache of the training images for this assembly's encoder (built once)."""
    if not config.features:
        return None
    from vlbridge.train.cache import read_manifest
    from vlbridge.train.cache_build import build_cache

    directory = Path(config.output_dir) / "features" / _encoder_key(assembly, config)
    try:
        read_manifest(directory)
    except Exception:
        say(f"caching frozen encoder features -> {directory}")
        build_cache(assembly, data_sources(config), directory)
        return str(directory)
    changed = changed_images(config, directory)
    if changed:  # this folder is compare's own: rebuilt, not left for the user to delete
        say(f"{len(changed)} training image(s) changed since {directory} was cached (e.g. {changed[0]}); caching them again")
        build_cache(assembly, data_sources(config), directory, overwrite=True)
    return str(directory)


def changed_images(config: CompareConfig, directory: Path) -> list[str]:
    """The training images whose files differ from when the cache in `directory` encoded them."""
    from vlbridge.data.config import load_data_config
    from vlbridge.data.records import Skipped
    from vlbridge.train.cache_dataset import FeatureStore, iter_samples
    from vlbridge.train.cache_tars import cached_samples

    store = FeatureStore(directory)
    changed: list[str] = []
    for i, data in enumerate(data_sources(config)):
        read, checked = cached_samples(list(iter_samples(load_data_config(data, f"data[{i}]"), f"data[{i}]", keep_bytes=False)),
                                       store.manifest)  # checked: in a moved shard whose bytes were compared
        samples = [s for n, s in enumerate(read) if n not in checked and not isinstance(s, Skipped)
                   and (s.image_id in store.rows or s.image_id in store.skipped)]
        changed += store.changed_images(samples, [store.rows[s.image_id][:2] if s.image_id in store.rows else None for s in samples])
    return changed


def train_config_of(config: CompareConfig, run: RunSpec, assembly: dict, stage: int, steps: int, seed: int,
                    out: Path, init_from: str | None, features: str | None) -> dict[str, Any]:
    data = config.stage1_data if stage == 1 else config.stage2_data_of(run)
    return {
        "assembly": assembly, "stage": stage, "init_from": init_from, "steps": steps, "seed": seed,
        "data": {"train": data, "features": features}, "batch_size": config.batch_size,
        "optimizer": {"lr": run.lr or config.lr}, "schedule": {"warmup_steps": min(config.warmup_steps, steps - 1)},
        "output_dir": str(out), "log_every": max(1, steps // 10), "device": config.device, "tensorboard": False,
        # a checkpoint every tenth of the run (the newest kept): an interrupted comparison loses at most that much of a stage
        "save_every": max(1, steps // 10), "keep_last": 1,
        "objective": config.stage1_objective if stage == 1 else config.stage2_objective,
        **({"prompt": ""} if stage == 2 else {}),
    }


def stage1_key(config: CompareConfig, run: RunSpec, seed: int) -> str:
    """What a stage-1 training depends on; runs with the same key share one stage 1."""
    assembly = resolve_assembly(run)
    assembly.pop("name", None)
    text = json.dumps({"assembly": assembly, "steps": run.stage1_steps, "lr": run.lr or config.lr, "seed": seed,
                       "data": config.stage1_data, "objective": config.stage1_objective, "batch_size": config.batch_size,
                       "warmup_steps": config.warmup_steps, "features": config.features, "device": config.device,
                       "fingerprint": data_fingerprint(_paths(config.stage1_data)), "images": training_images(config.stage1_data)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def stage1_folder(config: CompareConfig, run: RunSpec, seed: int) -> Path:
    return Path(config.output_dir) / "stage1" / stage1_key(config, run, seed)[:16]


def stage1_trainers(config: CompareConfig) -> set[tuple[str, int]]:
    """(run, seed) pairs that train a stage 1 themselves: the first of each shared key."""
    seen, owners = set(), set()
    for seed in config.seeds:
        for run in config.runs:
            if run.stage1_steps and (key := stage1_key(config, run, seed)) not in seen:
                seen.add(key)
                owners.add((run.name, seed))
    return owners


STAGE1_SUMMARY = "summary.json"


def train_stage1(config: CompareConfig, run: RunSpec, seed: int, assembly: dict, features: str | None, say: Say,
                 progress: PhaseProgress | None = None) -> tuple[Path, dict[str, Any]]:
    """The run's stage 1, trained once per key (a finished one is reused, a partial one resumed)."""
    from vlbridge.train.trainer import run as train

    folder = stage1_folder(config, run, seed)
    done = folder / STAGE1_SUMMARY
    if done.is_file():
        say(f"{run.name} (seed {seed}): stage 1 done before, reusing {folder}")
        return folder, {**json.loads(done.read_text(encoding="utf-8")), "reused": True}
    _claim_run_folder(folder, stage1_key(config, run, seed), say)
    if progress is not None:
        progress.start(f"{run.name} seed {seed}: stage 1")
    say(f"{run.name} (seed {seed}): stage 1, {run.stage1_steps} steps -> {folder}")
    start = time.perf_counter()
    result = train(train_config_of(config, run, assembly, 1, run.stage1_steps, seed, folder, None, features), resume=_resumable(folder),
                   quiet=True, tell_cuts=False, on_step=_steps_to(progress))  # the report states the cut texts
    summary = {"steps": result.step, "loss": result.train.get("loss"), "nonfinite": result.nonfinite, "texts_cut": result.texts,
               "seconds": time.perf_counter() - start, "folder": str(folder)}
    atomic_write_text(done, json.dumps(summary, indent=1, default=str))
    return folder, {**summary, "reused": False}


def train_run(config: CompareConfig, run: RunSpec, seed: int, say: Say, progress: PhaseProgress | None = None) -> tuple[Path, dict[str, Any]]:
    """Stage 1 (if any, shared) then stage 2, resumable; returns the final checkpoint and the training summary."""
    from vlbridge.train.checkpointing import latest_checkpoint
    from vlbridge.train.trainer import run as train

    if run.checkpoint is not None:
        say(f"{run.name} (seed {seed}): evaluating checkpoint {run.checkpoint} as it is")
        return Path(run.checkpoint), {"checkpoint": run.checkpoint}
    assembly = resolve_assembly(run)
    features = feature_cache(config, assembly, say)
    root = Path(config.output_dir) / "runs" / run.name / f"seed-{seed}"
    summary: dict[str, Any] = {}
    init_from = run.init_from  # a stage-1 checkpoint trained elsewhere (e.g. the world's shipped ones), or None
    if init_from is not None:
        summary["stage1"] = {"from_checkpoint": init_from}
    start = time.perf_counter()
    if run.stage1_steps:
        folder, summary["stage1"] = train_stage1(config, run, seed, assembly, features, say, progress)
        init_from = str(folder)
    out = root / "stage2"
    if progress is not None:
        progress.start(f"{run.name} seed {seed}: stage 2")
    say(f"{run.name} (seed {seed}): stage 2, {run.stage2_steps} steps")
    result = train(train_config_of(config, run, assembly, 2, run.stage2_steps, seed, out, init_from, features), resume=_resumable(out),
                   quiet=True, tell_cuts=False, on_step=_steps_to(progress))  # compare's progress line and report cover it
    summary["stage2"] = {"steps": result.step, "loss": result.train.get("loss"), "nonfinite": result.nonfinite,
                         "texts_cut": result.texts}  # the report states it: the quiet trainer does not warn
    summary["train_seconds"] = time.perf_counter() - start
    return latest_checkpoint(out), summary


def _steps_to(progress: PhaseProgress | None) -> Callable[[int], None] | None:
    """The training's step reports for the progress line (which times them), if there is one."""
    return None if progress is None else progress.step


def _resumable(folder: Path) -> bool:
    """Resume only a training that left a checkpoint (a fresh one would say "no checkpoint yet" for nothing)."""
    from vlbridge.train.checkpointing import latest_checkpoint

    return latest_checkpoint(folder) is not None


@torch.no_grad()
def llm_cost(model, batch: int = 8, text_tokens: int = 16, reps: int = 10) -> dict[str, float]:
    """Visual tokens fed to the LLM and the LLM's forward time on them plus a short text (ms; the
    fastest of `reps` after a warm-up: the least disturbed by other work on the machine)."""
    plan = model.plan
    visual = torch.zeros(batch, plan.connector_out.num_tokens, plan.connector_out.width, device=model.device)
    pad = getattr(getattr(model.llm, "tokenizer", None), "pad_token_id", None)  # a plugin LLM need not have a tokenizer attribute
    ids = torch.full((batch, text_tokens), pad or 0, device=model.device)
    mask = torch.ones_like(ids)
    times = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        kwargs = {"labels": ids} if model.llm.is_encoder_decoder else {}
        model.llm(visual, ids, mask, **kwargs)
        times.append(time.perf_counter() - start)
    return {"visual_tokens": plan.connector_out.num_tokens, "llm_forward_ms": 1000 * min(times[1:])}


def evaluate_run(config: CompareConfig, model, evals: list[EvalSet], say: Say, encoded=None) -> dict[str, Any]:
    """Captioning and VQA on every evaluation split with the trained (stage-2) model; `encoded`
    (an EncodedImages) reuses encoder outputs of earlier runs with the same encoder."""
    from vlbridge.compare.evaluation import evaluate_set

    return {e.name: evaluate_set(config, model, e, say, encoded) for e in evals}


def stage1_source(config: CompareConfig, run: RunSpec, seed: int) -> tuple[Path, Path] | None:
    """The run's stage-1 model (a checkpoint directory) and the folder its retrieval scores are
    stored in; None for runs without one (projectors, the no-stage-1 ablation)."""
    from vlbridge.train.checkpointing import latest_checkpoint

    if run.stage1_steps:
        folder = stage1_folder(config, run, seed)
        return latest_checkpoint(folder), folder
    if run.init_from is not None:  # stored in the output folder: the checkpoint's may be read-only (an installed package)
        text = json.dumps(data_fingerprint(files_in(run.init_from)))
        return Path(run.init_from), Path(config.output_dir) / "stage1" / f"from-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    return None


# How stored retrieval scores were computed; a change of the rule makes earlier stores stale, so the
# rule is part of their key. 2: ITM R@K breaks the -100 ties outside the shortlist by ITC (scores
# stored under rule 1 counted them against the query and would be reused beside new runs' scores).
RETRIEVAL_SCORING = 2


def retrieval_store(store: Path, spec: EvalSet) -> Path:
    """The file a stage 1's retrieval scores on `spec` are kept in: named by what they depend on."""
    spec_text = json.dumps([spec.model_dump(mode="json"), data_fingerprint([spec.captions, spec.scenes]), evaluation_images(spec),
                            RETRIEVAL_SCORING], sort_keys=True)
    return store / f"retrieval-{spec.name}-{hashlib.sha256(spec_text.encode()).hexdigest()[:12]}.json"


def shared_retrieval(config: CompareConfig, checkpoint: Path, store: Path, spec: EvalSet, say: Say) -> dict[str, Any]:
    """Retrieval by the stage-1 model `checkpoint`, computed once per stage 1 and evaluation split
    and kept in `store` (runs sharing a stage 1 share its retrieval scores)."""
    from vlbridge.compare.evaluation import retrieval_set

    stored = retrieval_store(store, spec)
    if stored.is_file():
        say(f"  {spec.name}: retrieval scored before by this stage 1 ({stored.name})")
        return json.loads(stored.read_text(encoding="utf-8"))
    from vlbridge.modeling import factory

    # retrieval is the stage-1 model's job (ITC/ITM heads and the text side, which stage 2 neither trains nor saves)
    model = factory.load(checkpoint, stage=1, device=None if config.device == "auto" else config.device)
    result = retrieval_set(model, spec, say)
    store.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stored, json.dumps(result, default=str))
    return result


RESULT_FILE = "result.json"


EVALUATION_ONLY = {"evals", "caption_prompt", "vqa_prompt", "generation", "vqa_max_new_tokens"}  # settings that shape scores, not training


def _location_free(value: Any, folders: dict[str, str] | None = None) -> Any:
    """`value` with the folders shipped inside the package put back as their preset placeholders
    ("{world}"): the world presets name their parts by where vlbridge is installed, and a reinstall
    elsewhere must not retrain every run. Any other path stays whole: two models in folders of the
    same name (.../run1/final, .../run2/final) are different models."""
    folders = shipped_folders() if folders is None else folders
    if isinstance(value, dict):
        return {key: _location_free(item, folders) for key, item in value.items()}
    if isinstance(value, list):
        return [_location_free(item, folders) for item in value]
    if isinstance(value, str):
        for name, folder in folders.items():
            if value == folder or value.startswith(folder + os.sep):
                return "{" + name + "}" + value[len(folder):]
    return value


def training_key(config: CompareConfig, run: RunSpec, seed: int) -> str:
    """What a run's trained checkpoints depend on: the run, its seed, the shared training settings and
    the data and weights it trains from (not the evaluation, the other runs, the folder or the title)."""
    unused = set() if run.stage1_steps else {"stage1_data", "stage1_objective"}  # a run without stage 1 is not retrained for them
    if run.stage2_data is not None or run.checkpoint is not None:
        unused.add("stage2_data")
    shared = config.model_dump(mode="json", exclude={"runs", "seeds", "name", "output_dir", "jobs", *EVALUATION_ONLY, *unused})
    trained = _paths(config.stage1_data if run.stage1_steps else None, config.stage2_data_of(run) if run.checkpoint is None else None)
    for weights in (run.checkpoint, run.init_from):  # the weights it evaluates or starts from: new ones are trained afresh
        if weights is not None:
            trained += files_in(weights)
    images = [training_images(config.stage1_data if run.stage1_steps else None),
              training_images(config.stage2_data_of(run) if run.checkpoint is None else None)]
    # the assembly as loaded, not its name: an edited assembly YAML (or preset) trains afresh (a checkpoint's is in its files)
    assembly = _location_free(resolve_assembly(run)) if run.checkpoint is None else None
    text = json.dumps({"run": run.model_dump(mode="json"), "seed": seed, "shared": shared, "data": data_fingerprint(trained),
                       "images": images, "assembly": assembly}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def run_key(config: CompareConfig, run: RunSpec, seed: int) -> str:
    """What a run's stored result depends on: its training (`training_key`) and the evaluation
    settings and files that score it; a changed evaluation re-scores the checkpoints it kept."""
    evaluation = config.model_dump(mode="json", include=EVALUATION_ONLY)
    evaluated = [path for e in config.evals for path in e.evaluated_files()]
    text = json.dumps({"training": training_key(config, run, seed), "evaluation": evaluation,
                       "data": data_fingerprint(evaluated), "images": [evaluation_images(e) for e in config.evals]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _stored_result(path: Path, key: str) -> dict[str, Any] | None:
    """The result a finished run stored, if it was made under the same key."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stored.get("result") if isinstance(stored, dict) and stored.get("key") == key else None


def _trained_before(path: Path, training: str) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint, training summary) of a run already trained under the same training key, whose
    result is stale only in its evaluation: it is scored again without training again."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        checkpoint = Path(stored["checkpoint"])
        summary = stored["result"]["train"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if stored.get("training_key") != training or not (checkpoint / "checkpoint.json").is_file():
        return None
    return checkpoint, summary


def _claim_run_folder(folder: Path, key: str, say: Say) -> None:
    """Checkpoints in `folder` resume a run only if made for the same key; stale ones are removed."""
    key_file = folder / "key.txt"
    if folder.exists() and (not key_file.is_file() or key_file.read_text(encoding="utf-8").strip() != key):
        say(f"{folder} holds a run made with other settings or data; starting it afresh")
        shutil.rmtree(folder)
    if not key_file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(key_file, key + "\n")


def train_and_evaluate(config: CompareConfig, say: Say = print, progress: PhaseProgress | None = None,
                       only: set[tuple[str, int]] | None = None, collected: frozenset[tuple[str, int]] = frozenset()) -> dict[str, list[dict[str, Any]]]:
    """Train and evaluate every run for every seed in this process (a stored result is reused), or
    only the (run, seed) pairs of `only`; returns run name -> one result per seed done. The pairs of
    `collected` were just stored by worker processes (whose phases `progress` followed): reading them
    back is not announced as reuse."""
    from vlbridge.modeling import factory
    from vlbridge.compare.evaluation import EncodedImages

    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    per_seed: dict[str, list[dict[str, Any]]] = {run.name: [] for run in config.runs}
    total, done = len(config.runs) * len(config.seeds), 0
    encoded: dict[str, Any] = {}  # encoder key -> EncodedImages of the evaluation images
    if only is not None:
        total = len(only)
    for seed in config.seeds:
        for run in config.runs:
            if only is not None and (run.name, seed) not in only:
                continue
            done += 1
            result_file = out / "runs" / run.name / f"seed-{seed}" / RESULT_FILE
            key = run_key(config, run, seed)
            stored = _stored_result(result_file, key)
            if stored is not None and (run.name, seed) in collected:
                per_seed[run.name].append(stored)
                continue
            if stored is not None:
                say(f"[{done}/{total}] {run.name}, seed {seed}: reusing its results ({result_file})")
                if progress is not None:
                    progress.skip(run.name, seed)
                per_seed[run.name].append(stored)
                continue
            say(f"[{done}/{total}] {run.name}, seed {seed}")
            training = training_key(config, run, seed)
            _claim_run_folder(result_file.parent, training, say)  # its checkpoints, if still right
            kept = _trained_before(result_file, training)
            checkpoint, summary = kept if kept is not None else train_run(config, run, seed, say, progress)
            if progress is not None:
                progress.start(f"{run.name} seed {seed}: evaluate")
            device = None if config.device == "auto" else config.device
            model = factory.load(checkpoint, device=device)
            result = {"seed": seed, "group": run.group, "train": summary, "cost": llm_cost(model), "plan": {
                "trainable_params": model.plan.trainable_params, "visual_tokens": model.plan.connector_out.num_tokens}}
            encoder = _encoder_key(resolve_assembly(run), config)
            result["eval"] = evaluate_run(config, model, config.evals, say, encoded.setdefault(encoder, EncodedImages()))
            del model
            source = stage1_source(config, run, seed)  # projectors and the no-stage-1 ablation have no trained ITC/ITM heads
            if source is not None:
                for spec in (e for e in config.evals if e.captions and "retrieval" in e.tasks):
                    result["eval"][spec.name]["retrieval"] = shared_retrieval(config, *source, spec, say)
            atomic_write_text(result_file, json.dumps({"key": key, "training_key": training, "checkpoint": str(checkpoint),
                                                       "result": result}, indent=1, default=str))
            per_seed[run.name].append(result)
    return per_seed
