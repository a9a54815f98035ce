"""Pretrain the CPU stand-in for CLIP: a small Hugging Face ``CLIPModel`` trained contrastively on a
synthetic web-like corpus, written as a CLIP folder that ``model.pretrained=DIR`` reads.

    python -m experiments.pretrain_standin --out DIR [--seed N] [--steps S] [--corpus-size N]

The folder holds what a real CLIP checkpoint folder holds: ``config.json`` and
``model.safetensors`` (``CLIPModel.save_pretrained``) and OpenAI's 49,408-token BPE
(``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``; see
``experiments/clip_bpe.py``), so ``CLIPModel.from_pretrained(DIR)``,
``AutoTokenizer.from_pretrained(DIR)`` and the trainer's ``model.pretrained=DIR`` load it with
no other change. It also holds ``standin.json``: the settings, their digest, a summary of the
run and the sha256 of every other file.

How it is built (every default in :class:`StandinSettings`):

* corpus: ``experiments/standin_corpus.py`` (people, product shots and shapes on many
  backgrounds, lightings, blur and noise levels and aspect ratios, colours named from the XKCD
  and CSS4 tables), images of a few sizes, several captions per image, tokenized by the
  project's own CLIP tokenizer class from the folder being written;
* model: ViT and text transformer of ``hidden_size`` x ``num_layers``, a square
  ``image_size`` position table that each batch resamples to its own image size (bicubic, as
  ``gckd_ray.model.encoders`` does once at build time), text positions 77;
* training: CLIP's symmetric InfoNCE with a learned temperature (identical captions in a
  batch count as positives of each other), AdamW, linear warm-up then cosine decay, gradient
  clipping, horizontal flips; ``torch.use_deterministic_algorithms`` and seeded generators, so
  a seed gives the same weights on the same machine and thread count (``--threads``).

Cache: a second call with the same settings finds ``DIR/standin.json``, verifies every file's
sha256 and returns at once (one line). A folder written by this command that fails the check
(another seed or setting, a missing or changed file, an unreadable manifest) is rebuilt after
one ``warning:`` line. A folder that holds something else is refused with one
``data error:`` line (exit 2), never overwritten. The build writes into a temporary sibling
folder and renames it into place, so an interrupted build leaves ``DIR`` as it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from experiments import clip_bpe
from experiments.standin_corpus import CORPUS_VERSION, make_item
from gckd_ray.checkpoint_format import file_sha256
from gckd_ray.errors import InputError, one_line

FORMAT = "gckd_ray.standin"
VERSION = 1          # bump when the training recipe changes the weights for the same settings
MANIFEST = "standin.json"
TEXT_POSITIONS = 77  # CLIP's context length
HELDOUT_SPLIT = 1    # corpus split of the held-out items (training items are split 0)


class StandinError(InputError):
    kind = "data"


def _opt(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class StandinSettings:
    """Everything that decides the stand-in's weights (the cache key), with the defaults of
    ``python -m experiments.pretrain_standin``."""

    seed: int = _opt(0, "seed of the corpus, the initialisation and the batch order")
    corpus_size: int = _opt(16000, "training images")
    heldout_size: int = _opt(500, "held-out images for the final retrieval check")
    captions_per_image: int = _opt(3, "distinct captions per image (one drawn per visit)")
    steps: int = _opt(1200, "optimizer steps")
    batch_size: int = _opt(128, "image-caption pairs per step")
    lr: float = _opt(5e-4, "peak AdamW learning rate")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)")
    warmup_steps: int = _opt(100, "linear warm-up steps before the cosine decay")
    hidden_size: int = _opt(128, "transformer width of both towers")
    num_layers: int = _opt(4, "layers per tower")
    num_heads: int = _opt(4, "attention heads")
    projection_dim: int = _opt(64, "joint embedding size")
    image_size: int = _opt(64, "side of the square position table (pixels)")
    patch_size: int = _opt(8, "ViT patch size (pixels)")

    def digest(self) -> str:
        """sha256 of the settings plus the corpus and recipe versions."""
        key = {**dataclasses.asdict(self), "corpus_version": CORPUS_VERSION, "version": VERSION}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- corpus


@dataclass
class Bucket:
    """The corpus items of one image size."""

    images: torch.Tensor        # (N, 3, H, W) uint8
    input_ids: torch.Tensor     # (N, K, 77) int64, [bos] ... [eos] pad
    attention_mask: torch.Tensor
    text_ids: torch.Tensor      # (N, K) int64: equal captions share an id
    items: torch.Tensor         # (N,) corpus index of each row


def build_corpus(settings: StandinSettings, split: int, size: int, tokenizer,
                 log: Callable[[str], None] | None = None) -> dict[tuple[int, int], Bucket]:
    """Render ``size`` items of ``split`` and tokenize their captions, grouped by image size."""
    start, groups = time.perf_counter(), {}
    every = max(1, size // 5)
    for index in range(size):
        item = make_item(settings.seed, split, index, settings.captions_per_image)
        captions = (item.captions * settings.captions_per_image)[:settings.captions_per_image]
        groups.setdefault(tuple(item.image.shape[1:]), []).append((index, item.image, captions))
        if log and (index + 1) % every == 0:
            elapsed = time.perf_counter() - start
            log(f"corpus: {index + 1}/{size} images, {elapsed:.0f} s")
    text_index: dict[str, int] = {}
    buckets = {}
    for shape in sorted(groups):
        rows = groups[shape]
        texts = [c for _, _, caps in rows for c in caps]
        ids, mask, _ = tokenizer.encode(texts, TEXT_POSITIONS)
        k = settings.captions_per_image
        buckets[shape] = Bucket(
            images=torch.from_numpy(np.stack([img for _, img, _ in rows])),
            input_ids=ids.view(len(rows), k, -1), attention_mask=mask.view(len(rows), k, -1),
            text_ids=torch.tensor([text_index.setdefault(t, len(text_index)) for t in texts]
                                  ).view(len(rows), k),
            items=torch.tensor([i for i, _, _ in rows]))
    return buckets


# ---------------------------------------------------------------- model and training


def clip_config(settings: StandinSettings, tokenizer):
    """The stand-in's CLIPConfig (4x MLP, quick_gelu as CLIP, CLIP's special token ids)."""
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    shared = dict(hidden_size=settings.hidden_size, intermediate_size=4 * settings.hidden_size,
                  num_hidden_layers=settings.num_layers,
                  num_attention_heads=settings.num_heads)
    text = CLIPTextConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=TEXT_POSITIONS,
                          bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                          pad_token_id=tokenizer.pad_id, **shared)
    vision = CLIPVisionConfig(image_size=settings.image_size, patch_size=settings.patch_size,
                              **shared)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=settings.projection_dim)


def embed_images(model, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised -> (B, D) unit-norm; the position table is resampled to the
    batch's (H/p, W/p) grid (bicubic, what the project's encoder does once at build time)."""
    pooled = model.vision_model(pixel_values=pixels, interpolate_pos_encoding=True).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def embed_texts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) -> (B, D) unit-norm, pooled at the first eos (config eos id != 2)."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              text_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch. image_emb, text_emb (B, D); text_ids (B,): rows with
    the same caption text are each other's positives (uniform soft targets)."""
    logits = logit_scale.exp() * image_emb @ text_emb.t()  # (B, B) image -> text
    same = (text_ids[:, None] == text_ids[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def _trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    length = int(mask.sum(dim=1).max())
    return ids[:, :length], mask[:, :length]


class BatchStream:
    """Seeded batches: a bucket drawn in proportion to its size, rows from that bucket's
    shuffled order (reshuffled when used up), one of each row's captions, random flips."""

    def __init__(self, buckets: dict[tuple[int, int], Bucket], batch_size: int, seed: int):
        self.buckets = [buckets[s] for s in sorted(buckets)]
        sizes = torch.tensor([len(b.items) for b in self.buckets], dtype=torch.float64)
        self.weights = sizes / sizes.sum()
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order = [torch.randperm(len(b.items), generator=self.gen) for b in self.buckets]
        self.pos = [0] * len(self.buckets)

    def next(self) -> dict[str, torch.Tensor]:
        from gckd_ray.data.transforms import normalize

        k = int(torch.multinomial(self.weights, 1, generator=self.gen))
        bucket, n = self.buckets[k], min(self.batch_size, len(self.buckets[k].items))
        if self.pos[k] + n > len(self.order[k]):
            self.order[k] = torch.randperm(len(bucket.items), generator=self.gen)
            self.pos[k] = 0
        rows = self.order[k][self.pos[k]:self.pos[k] + n]
        self.pos[k] += n
        caption = torch.randint(bucket.input_ids.shape[1], (n,), generator=self.gen)
        images = bucket.images[rows]
        flip = torch.rand(n, generator=self.gen) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        ids, mask = _trim(bucket.input_ids[rows, caption], bucket.attention_mask[rows, caption])
        return {"pixels": normalize(images), "input_ids": ids, "attention_mask": mask,
                "text_ids": bucket.text_ids[rows, caption]}


def learning_rate(step: int, settings: StandinSettings) -> float:
    """Linear warm-up to ``lr``, then cosine decay to 0 at ``steps``."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model, settings: StandinSettings) -> torch.optim.Optimizer:
    """AdamW as CLIP: decay on weight matrices only (not gains, biases, embeddings, scale)."""
    decay, rest = [], []
    for name, param in model.named_parameters():
        no_decay = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        (rest if no_decay else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=settings.lr, betas=(0.9, 0.98), eps=1e-6)


def train(model, stream: BatchStream, settings: StandinSettings,
          log: Callable[[str], None]) -> dict[str, float]:
    """The pretraining loop; returns the mean loss of the last 10% of steps and the time."""
    optimizer = _optimizer(model, settings)
    model.train()
    every = max(1, settings.steps // 30)
    losses, start, window = [], time.perf_counter(), []
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        batch = stream.next()
        loss = clip_loss(embed_images(model, batch["pixels"]),
                         embed_texts(model, batch["input_ids"], batch["attention_mask"]),
                         model.logit_scale, batch["text_ids"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # CLIP caps the temperature at 1/100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        window.append(losses[-1])
        if (step + 1) % every == 0 or step + 1 == settings.steps:
            elapsed = time.perf_counter() - start
            rate = (step + 1) / elapsed
            eta = (settings.steps - step - 1) / rate
            log(f"step {step + 1}/{settings.steps} loss {sum(window) / len(window):.3f} "
                f"lr {learning_rate(step, settings):.2e} "
                f"scale {model.logit_scale.exp().item():.1f} {rate:.2f} it/s "
                f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
            window = []
    tail = losses[-max(1, len(losses) // 10):]
    return {"final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


@torch.no_grad()
def heldout_retrieval(model, buckets: dict[tuple[int, int], Bucket]) -> dict[str, float]:
    """Text-to-image and image-to-text R@1 (%) on the held-out items, first caption each."""
    from gckd_ray.data.transforms import normalize
    from gckd_ray.evaluate import retrieval_metrics

    model.eval()
    images, texts, items = [], [], []
    for shape in sorted(buckets):
        b = buckets[shape]
        for rows in torch.arange(len(b.items)).split(256):
            images.append(embed_images(model, normalize(b.images[rows])))
            texts.append(embed_texts(model, *_trim(b.input_ids[rows, 0],
                                                   b.attention_mask[rows, 0])))
        items.append(b.items)
    image_emb, text_emb, ids = torch.cat(images), torch.cat(texts), torch.cat(items)
    sim = text_emb @ image_emb.t()
    return {"t2i_R1": retrieval_metrics(sim, ids, ids)["R1"],
            "i2t_R1": retrieval_metrics(sim.t(), ids, ids)["R1"]}


# ---------------------------------------------------------------- folder, manifest, cache


def check_folder(folder: Path, settings: StandinSettings) -> str | None:
    """None when ``folder`` is a complete stand-in built with ``settings``, else the reason."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files, recorded = manifest["files"], manifest["settings"]
        ok = manifest["format"] == FORMAT and isinstance(files, dict)
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__})"
    if not ok:
        return f"{MANIFEST} is not a {FORMAT} manifest"
    if manifest.get("settings_sha256") != settings.digest():
        wanted = dataclasses.asdict(settings)
        changed = [f"{k} {recorded.get(k)} -> {v}" for k, v in wanted.items()
                   if isinstance(recorded, dict) and recorded.get(k) != v]
        return ("built with other settings (" + ", ".join(changed) + ")" if changed
                else "built by another version of the recipe or corpus")
    for name, digest in sorted(files.items()):
        path = folder / name
        if Path(name).name != name or not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} has changed (sha256 differs from {MANIFEST})"
    return None


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out``, replacing the stand-in there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(out: Path, settings: StandinSettings, bpe: str | None = None, threads: int = 2,
          log: Callable[[str], None] = print) -> dict:
    """Build the stand-in into ``out`` (replacing what is there); returns the manifest."""
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    from gckd_ray.data.tokenizer import CLIPBPETokenizer

    start = time.perf_counter()
    merges = clip_bpe.load_merges_text(bpe, log=log)
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        clip_bpe.write_tokenizer(tmp, merges)
        tokenizer = CLIPBPETokenizer(tmp)  # the class training reads the folder with
        corpus = build_corpus(settings, 0, settings.corpus_size, tokenizer, log)
        heldout = build_corpus(settings, HELDOUT_SPLIT, settings.heldout_size, tokenizer)
        corpus_seconds = time.perf_counter() - start
        log(f"corpus: {settings.corpus_size} images ("
            + ", ".join(f"{h}x{w}: {len(b.items)}" for (h, w), b in corpus.items())
            + f"), {settings.captions_per_image} captions each, "
            f"{settings.heldout_size} held out, {corpus_seconds:.0f} s")
        torch.manual_seed(settings.seed)
        model = CLIPModel._from_config(clip_config(settings, tokenizer),
                                       attn_implementation="sdpa")
        log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
            f"({settings.hidden_size} wide, {settings.num_layers} layers per tower, "
            f"{settings.image_size}x{settings.image_size} / {settings.patch_size} positions)")
        stats = train(model, BatchStream(corpus, settings.batch_size, settings.seed),
                      settings, log)
        heldout_r1 = heldout_retrieval(model, heldout)
        hf_logging.disable_progress_bar()  # one "Writing model shards" bar is noise here
        model.save_pretrained(tmp)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)  # a cache others read (safetensors writes 0600)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        import transformers

        manifest = {
            "format": FORMAT, "version": VERSION, "corpus_version": CORPUS_VERSION,
            "settings": dataclasses.asdict(settings), "settings_sha256": settings.digest(),
            "files": files,
            "summary": {"final_loss": round(stats["final_loss"], 4), "heldout": heldout_r1,
                        "corpus_seconds": round(corpus_seconds, 1),
                        "train_seconds": round(stats["seconds"], 1),
                        "total_seconds": round(time.perf_counter() - start, 1),
                        "threads": threads, "torch": torch.__version__,
                        "transformers": transformers.__version__}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)
    summary = manifest["summary"]
    log(f"stand-in written to {out} in {summary['total_seconds']:.0f} s (corpus "
        f"{summary['corpus_seconds']:.0f} s, training {summary['train_seconds']:.0f} s): final "
        f"loss {summary['final_loss']:.3f}, held-out R@1 text->image {heldout_r1['t2i_R1']:.1f} "
        f"image->text {heldout_r1['i2t_R1']:.1f}")
    return manifest


def zero_shot(folder: Path, domains: list[str], overrides: list[str] = ()) -> dict[str, dict]:
    """Text-to-image metrics of the stand-in, untrained on the task, on each SynthPEDES (or
    configured) domain's test split, read through the trainer's own config, tokenizer and
    encoder (``model.pretrained=DIR``, 64x32 images by default, text length 77)."""
    from gckd_ray.config import load_config
    from gckd_ray.data.datasets import load_split
    from gckd_ray.data.tokenizer import load_tokenizer
    from gckd_ray.evaluate import evaluate_split
    from gckd_ray.model.retriever import build_encoder

    cfg = load_config(None, [f"model.pretrained={folder}",
                             f"data.text_length={TEXT_POSITIONS}", *overrides])
    tokenizer = load_tokenizer(folder)
    encoder = build_encoder(cfg, tokenizer).eval()
    results = {}
    for name in domains:
        domain = dataclasses.replace(cfg.data.target, name=name)
        split = load_split(cfg, domain, "test", tokenizer)
        results[name] = evaluate_split(encoder, split, torch.device("cpu"), domain=None)
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.pretrain_standin",
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog="Cache: a second call with the same settings verifies DIR/standin.json and the "
               "sha256 of every file and returns at once. A stand-in folder that fails the "
               "check (other settings, a missing or changed file) is rebuilt after one "
               "'warning:' line; a DIR holding anything else is refused ('data error:', exit "
               "2) and left untouched. Default settings: 12 min 53 s measured on 2 idle CPU "
               "cores (corpus 34 s, 1,200 steps at ~0.61 s).")
    parser.add_argument("--out", required=True, type=Path, help="output folder (DIR)")
    for f in dataclasses.fields(StandinSettings):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default),
                            default=f.default, help=f"{f.metadata['help']} (default {f.default})")
    parser.add_argument("--bpe", default=None,
                        help="OpenAI's merges file: an open-clip-torch wheel or "
                             "bpe_simple_vocab_16e6.txt.gz (default: cached copy, installed "
                             "open_clip, or pip download of the version in constraints.txt)")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (default 2; weights are reproducible for a fixed "
                             "count)")
    parser.add_argument("--zero-shot", nargs="+", default=[], metavar="DOMAIN",
                        help="afterwards print zero-shot text-to-image metrics on these "
                             "domains' test splits (e.g. synth-cuhk synth-icfg)")
    return parser


def _build_unwinding_on_sigterm(*args) -> None:
    """``build``, with SIGTERM (a job's time limit) unwinding like Ctrl-C so the temporary
    folder goes; the previous handler is restored afterwards."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        build(*args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = StandinSettings(**{f.name: getattr(args, f.name)
                                  for f in dataclasses.fields(StandinSettings)})
    out: Path = args.out
    try:
        if (out / MANIFEST).is_file():
            reason = check_folder(out, settings)
            if reason is None:
                print(f"stand-in cached: {out} (seed {settings.seed}; every file verified)",
                      flush=True)
            else:
                print(f"warning: {out}: {reason}; rebuilding", file=sys.stderr, flush=True)
        elif out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise StandinError(f"{out} exists and is not a stand-in folder (no {MANIFEST}); "
                               "choose another --out")
        else:
            reason = "missing"
        if reason is not None:
            _build_unwinding_on_sigterm(out, settings, args.bpe, args.threads)
        for name, metrics in (zero_shot(out, args.zero_shot) if args.zero_shot else {}).items():
            print(json.dumps({"zero_shot": name, "split": "test", **metrics}), flush=True)
    except InputError as err:
        print(one_line(err), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
