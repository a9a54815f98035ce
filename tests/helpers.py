"""Small builders shared by several test modules (importable as ``helpers``)."""

from __future__ import annotations

import json
import math
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from gckd_ray.checkpoint_format import (CHECKPOINT_FORMAT, atomic_torch_save, atomic_write_text,
                                        write_manifest)
from gckd_ray.config import Config, save_config

# Small SynthPEDES for fast end-to-end tests (id counts x SYNTH_SCALE).
SYNTH_SCALE = 0.1

# Two GCKD epochs from the first step (no warm-up), so the memory's queues and pseudo-ids are
# part of what a resume must restore. Runs stopped after epoch 1 keep the 2-epoch LR schedule.
# With deepspeed.zero_stage=3: the ZeRO tests' runs and the session's zero3_whole checkpoint.
# 12 steps per epoch: the refresh started at step 8 is applied at step 12, after the epoch-1
# checkpoint, so a resume must carry it (the default 20-step lag would apply none in 24 steps).
ZERO3_GCKD = ("method=gckd", "train.epochs=2", "gckd.warmup_epochs=0", "gckd.queue_size=512",
              "gckd.memory_nodes=16", "gckd.snapshot_every=2", "gckd.pseudo_every=4",
              "gckd.refresh_lag=4", "graph.k=5", "matching.rerank_top_k=0")


def write_tiny_clip_tokenizer(directory: Path, eos_last: bool = True) -> None:
    """A CLIP BPE vocabulary over printable ASCII (+ '</w>' forms) and a few merges; the
    specials come last, eos the largest id as in OpenAI CLIP unless ``eos_last`` is False."""
    chars = [chr(i) for i in range(33, 127)]  # bytes_to_unicode maps these to themselves
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    merges = ["r e", "re d</w>", "m a", "ma n</w>"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>")[::1 if eos_last else -1]:
        vocab[special] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def write_tiny_clip(directory: Path, image_size: int = 32, text_length: int = 16,
                    seed: int = 1):
    """A Hugging Face CLIP folder with random weights (hidden 32, one layer, patch 8,
    projection 24) and the tiny CLIP tokenizer, as `save_pretrained` writes one; returns the
    CLIPModel."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from gckd_ray.data.tokenizer import load_tokenizer

    write_tiny_clip_tokenizer(directory)
    tok = load_tokenizer(directory)
    shared = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    config = CLIPConfig(
        text_config=CLIPTextConfig(vocab_size=tok.vocab_size, max_position_embeddings=text_length,
                                   pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                                   eos_token_id=tok.eos_id, **shared),
        vision_config=CLIPVisionConfig(image_size=image_size, patch_size=8, **shared),
        projection_dim=24)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(directory)
    return model


def unit(rows: list[list[float]]) -> torch.Tensor:
    """Rows as L2-normalised float64 vectors."""
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def softmax(row: list[float]) -> list[float]:
    """A plain-Python softmax for hand-computed expectations."""
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_rank(rank: int, fn: Callable, port: int, world: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.save(fn(rank), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_gloo_ranks(fn: Callable, world: int) -> list:
    """``fn(rank)`` in each of ``world`` spawned processes of one gloo group (rendezvous on
    127.0.0.1); their results (tensors, containers, numbers) in rank order. ``fn`` must be a
    module-level function."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_gloo_rank, args=(fn, free_port(), world, out_dir), nprocs=world, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]


def write_checkpoint(directory: Path, epoch: int = 1, world: int = 2, legacy: bool = False,
                     model: object = None, references: dict | None = None) -> Path:
    """A checkpoint laid out as `save_checkpoint` writes one: each rank writes its part in its
    own folder with its manifest last, then the folders are merged (as Ray Train does).
    Without ``references`` it carries its own ``tokenizer/`` (format 2 and older); with them
    (state.json's tokenizer and pretrained references) it names them instead."""
    parts = directory.with_name(directory.name + ".parts")
    for rank in range(world):
        part = parts / str(rank)
        part.mkdir(parents=True)
        atomic_torch_save({"optimizer": {"step": torch.tensor(epoch + rank)}},
                          part / f"rank{rank:03d}.pt")
        if rank == 0:
            atomic_torch_save({"w": torch.arange(64.0)} if model is None else model,
                              part / "model.pt")
            save_config(Config(), part / "config.yaml")
            meta = {"epoch": epoch, "history": [], "world_size": world, "zero_stage": 0}
            if references is None:
                (part / "tokenizer").mkdir()
                (part / "tokenizer" / "vocab.json").write_text('{"a": 0}')
            else:
                meta["references"] = references
            if not legacy:
                meta["format"] = CHECKPOINT_FORMAT if references is not None else 2
            atomic_write_text(part / "state.json", json.dumps(meta))
        if not legacy:
            write_manifest(part, rank)
        shutil.copytree(part, directory, dirs_exist_ok=True)
    shutil.rmtree(parts)
    return directory


def flip_byte(path: Path) -> None:
    """Invert the middle byte of a file (same size, different sha256)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
