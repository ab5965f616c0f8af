"""`tidal label tasks DIR --config CFG --from SOURCE ...`: labeling tasks sampled from models.

M prompts of the config's prompt data (data.prompts, or the built-in task's) each get responses
from every source, drawn through the same rollout pool the RL stage uses:

    NAME=RUN_DIR      the final policy of a finished run (as `tidal eval --run`), or an HF folder
    sft               the SFT model: --sft, else the sft stage output of a run named with --from,
                      else model.policy
    references        the prompt file's reference answers (one per prompt)

Model sources give K responses per prompt (--responses); each response records its source
(NAME:FOLDER) and the weight version that wrote it, so exported labels say which model lost.
The tasks are added to the feedback folder DIR (created if missing; tasks already there stay).
Argument and data errors are one line and exit code 2, found before Ray starts.
"""

from __future__ import annotations

from pathlib import Path

from tidal.commands.args import LabelTasksArgs
from tidal.common.config import ConfigError, load_config

REFERENCES = "references"


def plan_sources(sources: list[str], k: int) -> list[tuple[str, str | None]]:
    """(name, spec) per --from value, checked; spec None for sft/references (resolved later).
    The responses per task (K per model source, 1 for references) must fit a task (2..9)."""
    from tidal.feedback.store import MAX_K, MIN_K

    if not sources:
        raise ConfigError("give at least one --from (NAME=RUN_DIR, sft or references).")
    if k < 1:
        raise ConfigError(f"--responses {k}: use K >= 1 responses per model source.")
    planned, names = [], set()
    for spec in sources:
        if spec in ("sft", REFERENCES):
            name, path = spec, None
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--from {spec!r}: write NAME=RUN_DIR (a run or an HF folder), sft or references.")
        if name in names:
            raise ConfigError(f"--from {spec!r}: the name {name!r} is used twice; give each source its own name.")
        names.add(name)
        planned.append((name, path))
    per_task = sum(1 if name == REFERENCES else k for name, _ in planned)
    if not MIN_K <= per_task <= MAX_K:
        raise ConfigError(f"{per_task} responses per task ({len(planned)} sources, --responses {k}); a task needs "
                          f"{MIN_K} to {MAX_K}: change --responses or the --from list.")
    return planned


def tasks_from_cli(args: LabelTasksArgs) -> int:
    """Entry point of `tidal label tasks`; returns the exit status."""
    from tidal.driver.runtime import ray_session
    from tidal.feedback.store import FeedbackStore, NewTask

    cfg = load_config(args.config, list(args.overrides))
    if args.prompts < 1:
        raise ConfigError(f"--prompts {args.prompts}: use M >= 1 prompts.")
    if args.overlap is not None and not 0.0 <= args.overlap <= 1.0:
        raise ConfigError(f"--overlap {args.overlap}: a share between 0 and 1.")
    planned = plan_sources(list(args.sources), args.responses)
    models, batch, prompts = _models_and_prompts(cfg, args, planned)
    store = FeedbackStore(args.dir, create=True)
    with ray_session(cfg.cluster, min_cpus=cfg.rollout.num_workers, verbose=args.verbose,
                     logs_to=Path(args.dir) / "logs" / "ray"):
        responses = _responses(cfg, planned, models, batch, prompts, args.responses)
    ids = store.add_tasks([NewTask(p, rows) for p, rows in zip(prompts, responses)], overlap_fraction=args.overlap,
                          seed=cfg.seed, duplicates="drop")  # samples may repeat; a ranking row may not
    print(f"added {len(ids)} tasks ({len(responses[0])} responses each) to {args.dir}; "
          f"serve them with `tidal label serve {args.dir}`")
    return 0


def _models_and_prompts(cfg, args: LabelTasksArgs, planned: list[tuple[str, str | None]]):
    """({source name: HF folder}, PromptBatch, the prompts as written), checked before Ray starts."""
    from tidal.commands.evaluate import resolve_policy
    from tidal.driver.collect import prompt_batch
    from tidal.driver.heldout import Seeds
    from tidal.driver.job import prepare_data
    from tidal.driver.run_folder import sft_of

    runs = [f"{name}={path}" for name, path in planned if path is not None]
    try:
        models = {name: resolve_policy(f"{name}={path}")[1] for name, path in planned if path is not None}
    except ConfigError as e:  # its message names eval's flag
        raise ConfigError(str(e).replace("--run ", "--from ", 1)) from None
    if any(name == "sft" for name, _ in planned):
        models["sft"] = sft_of(runs, args.sft, cfg)
    data = prepare_data(cfg)
    if data.prompts is None:
        raise ConfigError("no prompts: set data.prompts (or data.task: sentiment).")
    tokenizer = next(iter(models.values()), None) or sft_of(runs, args.sft, cfg)
    batch, prompts = prompt_batch(cfg, tokenizer, Path(data.prompts), args.prompts, seed=Seeds(cfg.seed).label_order)
    if any(name == REFERENCES for name, _ in planned):
        missing = [i for i, ref in zip(batch.index, batch.reference) if not ref]
        if missing:
            raise ConfigError(f"--from references: prompt row {missing[0] + 1} of {data.prompts} has no 'reference'; "
                              "add one to every row or drop --from references.")
    return models, batch, prompts


def _responses(cfg, planned, models: dict[str, str], batch, prompts: list, k: int) -> list[list]:
    """Per prompt, the responses of every source in --from order."""
    from tidal.driver.collect import sample_responses
    from tidal.driver.heldout import Seeds
    from tidal.feedback.store import TaskResponse

    responses: list[list[TaskResponse]] = [[] for _ in prompts]
    for s, (name, _) in enumerate(planned):
        if name == REFERENCES:
            for rows, ref in zip(responses, batch.reference):
                rows.append(TaskResponse(ref, source=REFERENCES))
            continue
        print(f"tidal: sampling {len(prompts)} prompts x {k} from {name} ({models[name]})", flush=True)
        for rows, new in zip(responses, sample_responses(cfg, models[name], batch, k, Seeds(cfg.seed).label_sampling(s),
                                                         source=f"{name}:{models[name]}")):
            rows.extend(new)
    return responses
