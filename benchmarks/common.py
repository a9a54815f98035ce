"""Setup shared by the benchmarks: CLIP sizes, the GCKD module at a size, random batches and
memory views of the configured shapes, a local loopback Ray, a (filled) memory actor, and
timing helpers.

Importing this module imports neither Ray nor DeepSpeed (the memory-actor helper imports Ray
when called), so the single-worker benchmarks (``mfu``) run on a machine without them.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator

import torch

from gckd_ray.config import Config
from gckd_ray.data.tokenizer import WordTokenizer
from gckd_ray.model.gckd import GCKDDistiller, MemoryView, build_gckd, target_groups

# (text width, layers, heads, vocab, length), (vision width, layers, heads, image, patch),
# projection dim, training image size (H, W). "config" (not listed) = the config's own tiny
# CLIP (model.*, data.image_*, data.text_length), the SynthPEDES default.
CLIP_SIZES = {
    "vit-b/16": ((512, 12, 8, 49408, 77), (768, 12, 12, 224, 16), 512, (384, 128)),
    "smoke": ((32, 1, 2, 100, 16), (32, 1, 2, 32, 8), 16, (32, 16)),
}
SIZE_CHOICES = ("config", *CLIP_SIZES)
# Identities behind the random source labels and target rows (4 items per identity).
NUM_IDS = 500


def clip_config(size: str, tokenizer: WordTokenizer | None = None):
    """(CLIPConfig, training image size, text length) of a named size; with ``tokenizer`` the
    vocabulary holds its ids and the special tokens are its own."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    (tw, tl, th, vocab, length), (vw, vl, vh, image, patch), dim, image_size = CLIP_SIZES[size]
    special = {}
    if tokenizer is not None:
        vocab = max(vocab, tokenizer.vocab_size)
        special = dict(pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
                       eos_token_id=tokenizer.eos_id)
    text = CLIPTextConfig(vocab_size=vocab, hidden_size=tw, intermediate_size=4 * tw,
                          num_hidden_layers=tl, num_attention_heads=th,
                          max_position_embeddings=length, **special)
    vision = CLIPVisionConfig(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl,
                              num_attention_heads=vh, image_size=image, patch_size=patch)
    return (CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                       projection_dim=dim), image_size, length)


def size_overrides(size: str) -> list[str]:
    """Config overrides that make data shapes and embedding size match a named CLIP size."""
    if size == "config":
        return []
    (*_, length), _, dim, (height, width) = CLIP_SIZES[size]
    return [f"data.image_height={height}", f"data.image_width={width}",
            f"data.text_length={length}", f"model.embed_dim={dim}"]


def benchmark_tokenizer() -> WordTokenizer:
    return WordTokenizer([f"w{i}" for i in range(200)])


def build_model(cfg: Config, size: str, tokenizer: WordTokenizer) -> GCKDDistiller:
    """The GCKD module (student, EMA teacher, propagation net, matching head) around a random
    CLIP of ``size`` (``"config"``: the config's own tiny CLIP)."""
    if size == "config":
        return build_gckd(cfg, tokenizer, num_classes=NUM_IDS)
    from transformers import CLIPModel

    from gckd_ray.model.encoders import DualEncoder
    from gckd_ray.model.losses import SourceLoss

    clip_cfg, image_size, length = clip_config(size, tokenizer)
    clip = CLIPModel._from_config(clip_cfg, attn_implementation="sdpa")
    student = DualEncoder(clip, eos_id=tokenizer.eos_id, text_length=length,
                          image_size=image_size)
    return GCKDDistiller(student, SourceLoss(cfg.loss, student.embed_dim, NUM_IDS), cfg)


def random_batches(cfg: Config, tokenizer: WordTokenizer, generator: torch.Generator,
                   device: torch.device | str = "cpu") -> tuple[dict, dict]:
    """Random source and target batches of the configured shapes (normalised-range images,
    tokenised random captions, identity-balanced source labels, target rows)."""
    b, h, w, length = (cfg.train.batch_size, cfg.data.image_height, cfg.data.image_width,
                       cfg.data.text_length)

    def captions():
        words = torch.randint(len(tokenizer.words), (b, length - 2), generator=generator)
        return tokenizer.encode([" ".join(tokenizer.words[i] for i in row) for row in words],
                                length)[:2]

    ids, mask = captions()
    source = {"images": torch.randn(b, 3, h, w, generator=generator), "input_ids": ids,
              "attention_mask": mask,
              "pids": torch.randint(0, NUM_IDS, (b // 2,), generator=generator).repeat(2)}
    ids, mask = captions()
    target = {"images": torch.randn(b, 3, h, w, generator=generator), "input_ids": ids,
              "attention_mask": mask,
              "image_rows": torch.randint(0, 4 * NUM_IDS, (b,), generator=generator),
              "text_rows": torch.randint(0, 4 * NUM_IDS, (b,), generator=generator)}
    return ({k: v.to(device) for k, v in source.items()},
            {k: v.to(device) for k, v in target.items()})


def random_memory_view(cfg: Config, dim: int, generator: torch.Generator,
                       device: torch.device | str = "cpu") -> MemoryView:
    """A full memory snapshot as the step sees it (``adaptation.memory_view``'s shapes), from
    random unit features: queues of ``gckd.queue_size`` per modality, half source (labels),
    half target (pseudo-ids), and C = ``gckd.memory_nodes`` graph nodes per group."""
    q, c = cfg.gckd.queue_size, cfg.gckd.memory_nodes

    def features(n: int) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1)

    def groups() -> torch.Tensor:
        labels = torch.randint(0, NUM_IDS, (q,), generator=generator)
        return torch.cat([labels[: q // 2], target_groups(labels[q // 2:])])

    pseudo = torch.randint(-1, NUM_IDS, (4 * NUM_IDS,), generator=generator)
    view = MemoryView(image=features(q), image_groups=groups(), text=features(q),
                      text_groups=groups(), graph_nodes=features(4 * c),
                      target_image_pseudo=pseudo, target_text_pseudo=pseudo.clone())
    return MemoryView(**{k: v.to(device) for k, v in vars(view).items()})


def fill_memory(client, cfg: Config, dim: int) -> None:
    """Fill both queues of a memory actor to ``gckd.queue_size``, half source, half target."""
    from gckd_ray.model.centring import SOURCE, TARGET

    chunk = max(cfg.train.batch_size, min(256, cfg.gckd.queue_size // 2))
    for start in range(0, cfg.gckd.queue_size, chunk):
        n = min(chunk, cfg.gckd.queue_size - start)
        domain = SOURCE if (start // chunk) % 2 == 0 else TARGET
        labels = (torch.randint(0, 100, (n,)) if domain == SOURCE
                  else torch.full((n,), -1, dtype=torch.int64))
        for modality in ("image", "text"):
            client.push(modality, torch.randn(n, dim), domain, labels,
                        torch.randint(0, 4 * NUM_IDS, (n,)))
    client.flush()


@contextlib.contextmanager
def local_ray() -> Iterator:
    """A local loopback Ray (2 logical CPUs, no dashboard), started here unless one is running
    (then that one is used and left running); shut down on exit if started here."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback, before import
    import ray

    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1",
                 include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        if own_ray:
            ray.shutdown()


@contextlib.contextmanager
def memory_actor(cfg: Config, dim: int, name: str, num_target_images: int,
                 num_target_texts: int) -> Iterator:
    """The ``MemoryClient`` of a real, empty memory actor with the config's memory settings, in
    ``local_ray``; killed (and Ray shut down, if started here) on exit."""
    with local_ray():
        from gckd_ray.distributed.memory import MemoryClient

        client = None
        try:
            client = MemoryClient.create(
                name, dim=dim, queue_size=cfg.gckd.queue_size,
                num_target_images=num_target_images, num_target_texts=num_target_texts,
                restore_from="", pseudo_k=cfg.gckd.pseudo_k,
                pseudo_threshold=cfg.gckd.pseudo_threshold,
                pseudo_center=cfg.gckd.pseudo_center, pseudo_image_k=cfg.gckd.pseudo_image_k,
                faiss_threads=cfg.gckd.refresh_threads,
                refresh_lag=cfg.gckd.refresh_lag, pseudo_probes=cfg.gckd.pseudo_probes,
                pseudo_exact_pairs=cfg.gckd.pseudo_exact_pairs,
                max_restarts=cfg.gckd.memory_max_restarts, seed=cfg.run.seed)
            yield client
        finally:
            if client is not None:
                client.shutdown()


@contextlib.contextmanager
def filled_memory_actor(cfg: Config, dim: int, name: str) -> Iterator:
    """The ``MemoryClient`` of a real memory actor (``memory_actor``), its queues filled to
    ``gckd.queue_size``."""
    with memory_actor(cfg, dim, name, 4 * NUM_IDS, 4 * NUM_IDS) as client:
        fill_memory(client, cfg, dim)
        yield client


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
