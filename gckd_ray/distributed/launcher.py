"""Driver side of a training run: prepare data and tokenizer, start the Ray Train job, write
the final model.

Runs in the driver process only. Data preparation (SynthPEDES generation, the run's tokenizer,
the pretrained folder's sha256) happens here once, before any worker starts, so workers never
race to create them; a resume that would continue from another pretrained folder or tokenizer
is refused here, before Ray starts.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from gckd_ray.checkpoint_format import (TOKENIZER_DIR, CheckpointError, check_pretrained,
                                        folder_reference, folder_sha256, newest_checkpoint)
from gckd_ray.config import Config, ConfigError
from gckd_ray.data.datasets import (check_batches_fit, labelled_domain, load_records,
                                    target_pairs)
from gckd_ray.data.formats import Record
from gckd_ray.data.tokenizer import WordTokenizer, copy_tokenizer_files, write_word_aliases
from gckd_ray.data.vocab_bridge import bridge_words
from gckd_ray.distributed.memory import MemoryClient, memory_actor_name
from gckd_ray.distributed.metrics_log import ConsoleTail
from gckd_ray.distributed.runtime import (check_placement, init_ray, process_group_backend,
                                          process_group_listen_host)
from gckd_ray.model.encoders import embedding_dim
from gckd_ray.model.final_model import FINAL_MODEL_DIR, export_final_model
from gckd_ray.results import format_table, results_path, write_results


def prepare_tokenizer(cfg: Config, target_train: list[Record], expected: str | None = None
                      ) -> Path:
    """Write the run's tokenizer once, to ``<run.output_dir>/tokenizer/``, and return it: a
    local CLIP folder's tokenizer files (its weights stay where they are), or else a word
    vocabulary built from the training captions of both domains (captions only: no ids, no
    pairing); either with GCKD's lexical bridge for the target-only words.

    ``expected``: the sha256 of the tokenizer a resumed checkpoint was trained with; a
    tokenizer that differs is refused (CheckpointError) before it replaces the run's."""
    out = Path(cfg.run.output_dir) / TOKENIZER_DIR
    tmp = out.with_name(f".{out.name}-{secrets.token_hex(3)}")
    try:
        if cfg.model.pretrained:
            try:
                copy_tokenizer_files(cfg.model.pretrained, tmp)
            except FileNotFoundError as err:
                raise ConfigError(f"model.pretrained: {err}") from None
            if _bridges(cfg):
                write_word_aliases(tmp, _bridge_aliases(
                    _source_captions(cfg), [r.caption for r in target_train], cfg))
        else:
            _word_tokenizer(cfg, target_train).save(tmp)
        sha = folder_sha256(tmp)
        if expected is not None and sha != expected:
            raise CheckpointError(
                f"the tokenizer built for this run (sha256 {sha}) differs from the one the "
                f"checkpoint to resume was trained with (sha256 {expected}, in {out}): the "
                "training captions or model.pretrained changed; resume with the same data, "
                "or start a new run (run.resume=false or another run.output_dir)")
        if not (out.is_dir() and folder_sha256(out) == sha):
            old = out.with_name(f".{out.name}-old-{secrets.token_hex(3)}")
            if out.exists():
                out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _source_captions(cfg: Config) -> list[str]:
    return [r.caption for r in load_records(cfg, cfg.data.source, "train").records]


def _bridges(cfg: Config) -> bool:
    """Whether the run gets GCKD's lexical bridge (the baselines never read target captions)."""
    return cfg.method == "gckd" and cfg.gckd.vocab_bridge


def _bridge_aliases(source: list[str], target: list[str], cfg: Config) -> dict[str, str]:
    """GCKD's lexical bridge (data/vocab_bridge.py) from the captions alone, announced."""
    aliases = bridge_words(source, target, min_margin=cfg.gckd.bridge_margin)
    shown = ", ".join(f"{word}->{alias}" for word, alias in sorted(aliases.items()))
    print(f"vocabulary bridge: {len(aliases)} target-only words aliased to source words "
          f"({shown or 'none'})", flush=True)
    return aliases


def _word_tokenizer(cfg: Config, target_train: list[Record]) -> WordTokenizer:
    source, target = _source_captions(cfg), [r.caption for r in target_train]
    aliases = _bridge_aliases(source, target, cfg) if _bridges(cfg) else {}
    return WordTokenizer.build(source + target, aliases=aliases)


def pretrained_reference(cfg: Config) -> dict[str, str] | None:
    """Path and sha256 of ``model.pretrained`` (hashed once per run, here), or None."""
    if not cfg.model.pretrained:
        return None
    try:
        return folder_reference(cfg.model.pretrained)
    except FileNotFoundError:
        raise ConfigError(f"model.pretrained: {cfg.model.pretrained} is not a folder (a local "
                          "Hugging Face CLIP folder)") from None


def check_resume(cfg: Config, run_dir: Path, pretrained: dict[str, str] | None) -> str | None:
    """Before any worker starts: refuse to resume the run in ``run_dir`` from another
    pretrained folder than its newest checkpoint was trained from (CheckpointError). Returns
    the sha256 of the tokenizer that checkpoint recorded (None: nothing to compare)."""
    found = newest_checkpoint(run_dir) if cfg.run.resume else None
    if found is None:
        return None
    directory, state = found
    check_pretrained(directory, state, pretrained)
    return ((state.get("references") or {}).get("tokenizer") or {}).get("sha256")


def start_memory(cfg: Config, run_name: str, records: list[Record]) -> MemoryClient:
    """The client of the run's memory actor, created by the driver so it outlives any one
    worker; it restores its queues from ``<output_dir>/memory`` when that holds a saved state.
    ``records`` are the target training records (only their counts are used)."""
    return MemoryClient.create(
        memory_actor_name(run_name), dim=embedding_dim(cfg.model),
        queue_size=cfg.gckd.queue_size,
        num_target_images=len({r.image_key for r in records}), num_target_texts=len(records),
        restore_from=str(Path(cfg.run.output_dir) / "memory" / run_name),
        pseudo_k=cfg.gckd.pseudo_k, pseudo_threshold=cfg.gckd.pseudo_threshold,
        pseudo_center=cfg.gckd.pseudo_center, pseudo_image_k=cfg.gckd.pseudo_image_k,
        target_pairs=target_pairs(records) if cfg.data.target.paired else None,
        faiss_threads=cfg.gckd.refresh_threads, refresh_lag=cfg.gckd.refresh_lag,
        pseudo_probes=cfg.gckd.pseudo_probes, pseudo_exact_pairs=cfg.gckd.pseudo_exact_pairs,
        max_restarts=cfg.gckd.memory_max_restarts, seed=cfg.run.seed)


def start_line(cfg: Config) -> str:
    """What the run will do and where its outputs go, in one line."""
    adapt = cfg.train.epochs - cfg.gckd.warmup_epochs if cfg.method == "gckd" else 0
    schedule = (f"{cfg.train.epochs} epochs ({cfg.train.epochs - adapt} source + {adapt} "
                f"adaptation)" if adapt else f"{cfg.train.epochs} epochs")
    return (f"gckd-ray: method {cfg.method}, {cfg.protocol}, {schedule}, "
            f"{cfg.train.num_workers} worker(s) x {cfg.train.cpus_per_worker:g} CPU"
            f"{' + 1 GPU' if cfg.train.use_gpu else ''}, ZeRO-{cfg.deepspeed.zero_stage}; "
            f"outputs in {cfg.run.output_dir}")


def _run_name(cfg: Config, storage: Path) -> str:
    """A fresh name per run; ``run.resume`` reuses the last one so Ray Train restores it.
    Nothing is written: ``run_training`` records it once the workers can be placed."""
    latest = storage / "LATEST"
    if cfg.run.resume and latest.is_file():
        return latest.read_text().strip()
    # The suffix keeps runs started in the same second (Tune trials) and their memory actors
    # apart.
    return time.strftime("train-%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def run_training(cfg: Config, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Run ``cfg`` as a Ray Train job; write and return results.json.

    ``callbacks``: Ray Train ``UserCallback``s (a Tune trial passes Tune's report callback)."""
    cfg = cfg.with_absolute_paths()  # workers run in another working directory
    labelled = load_records(cfg, labelled_domain(cfg), "train")
    check_batches_fit(cfg, labelled)
    output = Path(cfg.run.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    storage = output / "ray"
    run_name = _run_name(cfg, storage)
    pretrained = pretrained_reference(cfg)
    resumed_tokenizer = check_resume(cfg, storage / run_name, pretrained)
    print(start_line(cfg), flush=True)
    target = load_records(cfg, cfg.data.target, "train")
    for records in {id(r): r for r in (labelled, target) if r.records}.values():
        print(records.summary(), flush=True)
    target_train = target.records
    tokenizer_dir = prepare_tokenizer(cfg, target_train, expected=resumed_tokenizer)
    # Checkpoints name the tokenizer relative to where Ray Train puts them, so a run folder
    # moved as a whole keeps working.
    references = {"tokenizer": folder_reference(tokenizer_dir,
                                                 relative_to=storage / run_name / "checkpoint"),
                  "pretrained": pretrained}
    init_ray(verbose=cfg.run.verbose)
    check_placement(cfg.train)
    storage.mkdir(parents=True, exist_ok=True)
    (storage / "LATEST").write_text(run_name)
    from ray.train import (CheckpointConfig, FailureConfig, LoggingConfig, RunConfig,
                           ScalingConfig, TrainingFailedError)

    from gckd_ray.distributed.failures import Trainer, input_error_of
    from gckd_ray.distributed.process_group import BoundStoreTorchConfig
    from gckd_ray.distributed.worker import train_loop_per_worker

    loop_config = {"cfg": cfg.to_dict(), "tokenizer_dir": str(tokenizer_dir.resolve()),
                   "references": references}
    memory = None
    if cfg.uses_memory:
        memory = start_memory(cfg, run_name, target_train)
        loop_config["memory_actor"] = memory_actor_name(run_name)
    trainer = Trainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=BoundStoreTorchConfig(backend=process_group_backend(cfg.train),
                                           listen_host=process_group_listen_host()),
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name, storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints or None),
            callbacks=list(callbacks),
            # Train's per-report INFO lines would drown the progress output.
            logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        with ConsoleTail(output):
            result = trainer.fit()
    except TrainingFailedError as err:
        # A data or config error in a worker: its own one line, not a worker-group traceback.
        if (cause := input_error_of(err)) is not None:
            raise cause from None
        raise
    finally:
        if memory is not None:
            memory.shutdown()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint under {storage}")
    final_model = None
    with result.checkpoint.as_directory() as ckpt_dir:
        state = json.loads((Path(ckpt_dir) / "state.json").read_text())
        if state["epoch"] >= cfg.train.epochs:  # the whole schedule ran: the student, once
            final_model = export_final_model(ckpt_dir, output / FINAL_MODEL_DIR,
                                             info={"epochs": state["epoch"]})
    # skipped_images: in the state of a data.on_bad_image=skip run only
    results = write_results(cfg, state["history"], state.get("skipped_images"))
    print(format_table(results), flush=True)
    print(f"results: {results_path(cfg)}\ncheckpoint: {result.checkpoint.path}", flush=True)
    if final_model is not None:
        print(f"final model (Hugging Face CLIP folder): {final_model}", flush=True)
    return results
