"""IRRA-compatible text-to-image retrieval metrics (DESIGN §6), split encoding, evaluate CLI.

For each query caption the gallery is ranked by score, descending, ties broken by gallery index
(lower index first, i.e. a stable sort). From the ranks of the correct gallery images (same
identity id) we report, in percent:

* ``R1``, ``R5``, ``R10``: share of queries with a correct image in the top K;
* ``mAP``: mean over queries of AP, the mean over correct positions of the precision there;
* ``mINP``: mean over queries of INP = #correct / (1-based rank of the last correct image).

Queries without any correct gallery image are left out of every mean and counted in
``num_queries_without_match`` (IRRA crashes on them). Queries are processed in chunks, so an
ICFG-size evaluation (19,848 x 19,848) runs in bounded memory; no Python loop runs over queries.

How a chunk is ranked without sorting it: each score is turned into a 64-bit key whose order is
exactly the ranking order (order-preserving integer image of the float32 score in the high 32
bits, ``G - 1 - gallery_index`` in the low 32 bits, so all keys differ and equal scores rank by
index). The 0-based rank of a correct image is then the number of gallery keys above its key; one
``searchsorted`` of every gallery key among the query's few correct keys plus one ``bincount``
gives all those counts at once. This is O(G log P) per query (P: correct images per query)
instead of the O(G log G) of a full sort, and the tests check it against a plain stable sort.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gckd_ray.data.transforms import normalize
from gckd_ray.model.centring import TARGET
from gckd_ray.model.collectives import all_gather_no_grad, all_gather_objects, rank_and_world
from gckd_ray.model.precision import compute_dtype

__all__ = ["mutual_nn_agreement", "retrieval_metrics", "retrieval_metrics_from_embeddings"]

TOP_K = (1, 5, 10)
_INT64_MAX = torch.iinfo(torch.int64).max
# Largest gallery for which index tie-breaks fit in the low 32 bits of a key.
_MAX_GALLERY = 2**31 - 1


def retrieval_metrics(
    similarity: Any, query_ids: Any, gallery_ids: Any, chunk_size: int = 1024
) -> dict[str, float]:
    """Text-to-image retrieval metrics from a query x gallery similarity matrix.

    Args:
        similarity: (Q, G) scores, torch tensor or numpy array (or nested lists); ranked in
            float32 on its device.
        query_ids: (Q,) integer identity of each query caption.
        gallery_ids: (G,) integer identity of each gallery image.
        chunk_size: queries ranked at once; working memory is about 16 bytes x chunk_size x G
            (about 320 MB for 1024 x 19,848) on top of the input.

    Returns:
        ``{"R1", "R5", "R10", "mAP", "mINP"}`` as floats in percent over the queries with at
        least one correct gallery image, plus ``num_queries`` (evaluated) and
        ``num_queries_without_match`` (excluded), as ints.

    Raises:
        ValueError: on inconsistent shapes, non-integer ids, NaN scores, or when no query has a
            correct gallery image.
    """
    sim = _as_tensor(similarity, "similarity")
    if sim.dim() != 2:
        raise ValueError(f"similarity must be 2-D (Q, G), got shape {tuple(sim.shape)}")
    num_q, num_g = sim.shape
    shapes = f"similarity of shape {tuple(sim.shape)}"
    ranker = _ChunkRanker(query_ids, gallery_ids, num_q, num_g, sim.device, chunk_size, shapes)
    for start, stop, scores in ranker.chunks():
        scores.copy_(sim[start:stop])  # casts to float32; also keeps the caller's tensor intact
        ranker.add(start, stop, scores)
    return ranker.result()


def retrieval_metrics_from_embeddings(
    query_emb: Any, gallery_emb: Any, query_ids: Any, gallery_ids: Any, chunk_size: int = 1024
) -> dict[str, float]:
    """Same result as ``retrieval_metrics(query_emb @ gallery_emb.T, ...)`` computed in float32,
    but the similarity is built chunk by chunk, never as the full (Q, G) matrix.

    Args:
        query_emb: (Q, D) query (text) embeddings, torch tensor or numpy array.
        gallery_emb: (G, D) gallery (image) embeddings; moved to ``query_emb``'s device.
        query_ids: (Q,) integer identity of each query caption.
        gallery_ids: (G,) integer identity of each gallery image.
        chunk_size: queries scored and ranked at once (see ``retrieval_metrics``).

    Returns:
        The same dict as ``retrieval_metrics``. Embeddings are not normalised here: pass
        normalised ones for cosine similarity.
    """
    query = _as_tensor(query_emb, "query_emb")
    gallery = _as_tensor(gallery_emb, "gallery_emb")
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(
            "embeddings must be (Q, D) and (G, D) with the same D, got query_emb "
            f"{tuple(query.shape)} and gallery_emb {tuple(gallery.shape)}"
        )
    query = query.to(torch.float32)
    gallery_t = gallery.to(device=query.device, dtype=torch.float32).T  # (D, G)
    num_q, num_g = query.shape[0], gallery.shape[0]
    shapes = f"query_emb {tuple(query.shape)} and gallery_emb {tuple(gallery.shape)}"
    ranker = _ChunkRanker(query_ids, gallery_ids, num_q, num_g, query.device, chunk_size, shapes)
    for start, stop, scores in ranker.chunks():
        torch.matmul(query[start:stop], gallery_t, out=scores)  # (c, G)
        ranker.add(start, stop, scores)
    return ranker.result()


def mutual_nn_agreement(texts: Any, images: Any, chunk_size: int = 4096) -> float:
    """Label-free cross-modal agreement: the share (percent) of captions whose nearest image
    has that caption as its own nearest caption, over min(#captions, #images), the most
    mutual pairs there can be. Needs no ids and no pairing.

    Args:
        texts: (N, D) caption embeddings; images: (M, D) image embeddings (normalised).
    """
    texts, images = _as_tensor(texts, "texts"), _as_tensor(images, "images")
    dtype = compute_dtype(texts, images)
    texts, images = texts.to(dtype), images.to(texts.device, dtype)
    if texts.dim() != 2 or images.dim() != 2 or texts.shape[1] != images.shape[1] or \
            not len(texts) or not len(images):
        raise ValueError(f"need non-empty (N, D) texts and (M, D) images, got "
                         f"{tuple(texts.shape)} and {tuple(images.shape)}")
    nearest_image = torch.cat([(texts[i:i + chunk_size] @ images.T).argmax(1)
                               for i in range(0, len(texts), chunk_size)])
    nearest_text = torch.cat([(images[i:i + chunk_size] @ texts.T).argmax(1)
                              for i in range(0, len(images), chunk_size)])
    mutual = nearest_text[nearest_image] == torch.arange(len(texts), device=texts.device)
    return 100.0 * float(mutual.sum()) / min(len(texts), len(images))


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    array = np.asarray(x)  # numpy arrays (shared, not copied); lists are accepted too
    if array.dtype == object:
        raise TypeError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
    return torch.from_numpy(array)


def _as_ids(x: Any, name: str, length: int, device: torch.device, shapes: str) -> torch.Tensor:
    ids = _as_tensor(x, name)
    if ids.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) for {shapes}, got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must hold integers, got dtype {ids.dtype}")
    return ids.to(device=device, dtype=torch.int64)


class _ChunkRanker:
    """Ranks chunks of query rows and keeps per-query results; one instance per call.

    Holds the per-identity table of correct gallery indices and reusable (chunk, G) buffers (fresh
    large allocations per chunk cost more than the ranking itself on CPU).
    """

    def __init__(self, query_ids, gallery_ids, num_q, num_g, device, chunk_size: int, shapes: str):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if num_g > _MAX_GALLERY:
            raise ValueError(f"gallery of {num_g} images is larger than {_MAX_GALLERY}")
        q_ids = _as_ids(query_ids, "query_ids", num_q, device, shapes)
        g_ids = _as_ids(gallery_ids, "gallery_ids", num_g, device, shapes)
        # table (U, P): gallery indices per identity; row_of (Q,): each query's table row
        self.table, self.row_of, self.num_pos = _positive_table(q_ids, g_ids)
        self.num_matched = int((self.num_pos > 0).sum())
        self.num_without_match = num_q - self.num_matched
        if self.num_matched == 0:
            raise ValueError(
                f"none of the {num_q} queries has a correct image among the {num_g} gallery "
                "images (query and gallery ids never coincide); nothing to evaluate"
            )
        # Bucket ids of a chunk, flattened, must fit in int32: rows * (P + 1) < 2**31.
        width = self.table.shape[1] + 1
        self.chunk = min(chunk_size, num_q, (2**31 - 1) // max(num_g, width))
        shape = (self.chunk, num_g)
        self.scores = torch.empty(shape, dtype=torch.float32, device=device)
        self.work = torch.empty(shape, dtype=torch.int32, device=device)
        self.keys = torch.empty(shape, dtype=torch.int64, device=device)
        # Low key bits: G - 1 - index, so that among equal scores the lower index ranks first.
        self.tie = torch.arange(num_g - 1, -1, -1, dtype=torch.int64, device=device)
        # Per-query results, reduced once at the end so that the chunk size cannot change the
        # floating-point summation order: best correct rank (0-based), AP, INP.
        self.first_rank = torch.zeros(num_q, dtype=torch.int64, device=device)
        self.ap = torch.zeros(num_q, dtype=torch.float64, device=device)
        self.inp = torch.zeros(num_q, dtype=torch.float64, device=device)
        self.saw_nan = torch.zeros((), dtype=torch.bool, device=device)

    def chunks(self):
        """Yield (start, stop, float32 buffer of shape (stop - start, G)) over all queries."""
        num_q = self.row_of.shape[0]
        for start in range(0, num_q, self.chunk):
            stop = min(start + self.chunk, num_q)
            yield start, stop, self.scores[: stop - start]

    @torch.no_grad()
    def add(self, start: int, stop: int, scores: torch.Tensor) -> None:
        """Rank queries [start, stop) given their scores (c, G) (overwritten); keep AP, INP and
        the best correct rank of each."""
        num_pos = self.num_pos[start:stop]  # (c,)
        # max propagates NaN; one cheap reduction, checked once at the end (no sync per chunk)
        self.saw_nan |= torch.isnan(scores.max())
        rows = stop - start
        pos = _positive_ranks(
            scores,
            self.table[self.row_of[start:stop]],  # (c, P) correct gallery indices, -1 padded
            num_pos,
            self.work[:rows],
            self.keys[:rows],
            self.tie,
        )
        # pos[:, r]: 0-based rank of the (r+1)-th best correct image; valid where r < num_pos.
        num = num_pos.clamp(min=1)  # queries without match get dummy values, dropped in result()
        r = torch.arange(pos.shape[1], device=pos.device)
        precision = (r + 1).to(torch.float64) / (pos + 1).to(torch.float64)  # (c, P)
        self.ap[start:stop] = torch.where(r < num[:, None], precision, 0.0).sum(1) / num
        last = pos.gather(1, (num - 1)[:, None]).squeeze(1)
        self.inp[start:stop] = num.to(torch.float64) / (last + 1).to(torch.float64)
        self.first_rank[start:stop] = pos[:, 0]

    def result(self) -> dict[str, float]:
        if bool(self.saw_nan):
            raise ValueError("similarity contains NaN; scores must be comparable to be ranked")
        matched = self.num_pos > 0
        first_rank = self.first_rank[matched]
        hits = [(first_rank < k).sum().to(torch.float64) for k in TOP_K]
        sums = torch.stack([*hits, self.ap[matched].sum(), self.inp[matched].sum()])
        values = (sums * (100.0 / self.num_matched)).tolist()
        out = {f"R{k}": value for k, value in zip(TOP_K, values)}
        out["mAP"], out["mINP"] = values[len(TOP_K)], values[len(TOP_K) + 1]
        out["num_queries"] = self.num_matched
        out["num_queries_without_match"] = self.num_without_match
        return out


def _positive_table(query_ids: torch.Tensor, gallery_ids: torch.Tensor):
    """Correct gallery indices of every query, stored once per identity (not per query: P can
    be as large as G).

    Returns:
        table: (U, P) int64 gallery indices of each gallery identity, ascending, padded with -1
            (U: distinct gallery ids, P: most gallery images of one identity);
        row_of: (Q,) int64 row of ``table`` holding the query's identity (any row if none);
        num_pos: (Q,) int64 number of correct gallery images (0 for a query without match).
    """
    num_q, device = query_ids.shape[0], query_ids.device
    if gallery_ids.numel() == 0:
        zeros = torch.zeros(num_q, dtype=torch.int64, device=device)
        return torch.full((1, 1), -1, dtype=torch.int64, device=device), zeros, zeros
    uniq, inverse, counts = torch.unique(gallery_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)  # gallery grouped by identity, index ascending
    group = inverse[order]
    slot = torch.arange(order.numel(), device=device) - (torch.cumsum(counts, 0) - counts)[group]
    table = torch.full((uniq.numel(), int(counts.max())), -1, dtype=torch.int64, device=device)
    table[group, slot] = order
    where = torch.searchsorted(uniq, query_ids).clamp(max=uniq.numel() - 1)
    matched = uniq[where] == query_ids
    num_pos = torch.where(matched, counts[where], 0)
    return table, where, num_pos


def _positive_ranks(scores, positives, num_pos, work, keys, tie) -> torch.Tensor:
    """0-based ranks of each query's correct gallery images, best first.

    Args:
        scores: (c, G) float32 scores of c queries, without NaN; overwritten (used as scratch).
        positives: (c, P) correct gallery indices, padded with -1; num_pos: (c,) valid counts.
        work: (c, G) int32 and keys: (c, G) int64 scratch buffers.
        tie: (G,) int64, ``G - 1 - gallery_index``.

    Returns:
        (c, P) int64; column r is the rank of the (r+1)-th best correct image (r < num_pos).
    """
    rows, num_g = scores.shape
    # Order-preserving int32 image of the float32 scores: flip the magnitude bits of negative
    # numbers (their raw bits sort backwards). "+ 0.0" first turns -0.0 into +0.0 (they tie).
    scores.add_(0.0)
    bits = scores.view(torch.int32)
    torch.bitwise_right_shift(bits, 31, out=work)  # -1 where negative, else 0
    work.bitwise_and_(0x7FFFFFFF)
    bits.bitwise_xor_(work)
    keys.copy_(bits)
    keys.mul_(2**32).add_(tie)  # (c, G), all distinct, larger = ranked first
    valid = torch.arange(positives.shape[1], device=positives.device) < num_pos[:, None]
    pos_keys = keys.gather(1, positives.clamp(min=0)).masked_fill_(~valid, _INT64_MAX)
    pos_keys = pos_keys.sort(dim=1).values  # (c, P) ascending, padding last
    # bucket b of a gallery key = number of correct keys below it; rank of the k-th smallest
    # correct key = number of gallery keys in buckets > k.
    torch.searchsorted(pos_keys, keys, out_int32=True, out=work)  # (c, G) in [0, P]
    width = pos_keys.shape[1] + 1
    work.add_(torch.arange(0, rows * width, width, dtype=torch.int32, device=work.device)[:, None])
    hist = torch.bincount(work.view(-1), minlength=rows * width).view(rows, width)
    rank_ascending = num_g - hist.cumsum(1)[:, :-1]  # (c, P) rank of k-th smallest correct key
    # Best first: the (r+1)-th best correct image is the (num_pos - 1 - r)-th smallest key.
    best_first = (num_pos[:, None] - 1 - torch.arange(width - 1, device=work.device)).clamp(min=0)
    return rank_ascending.gather(1, best_first)


# ---------------------------------------------------------------------------------------------
# Encoding a split (sharded over data-parallel workers) and the evaluate CLI (``python -m
# gckd_ray.evaluate``). The metric code above stays free of I/O, model and dataset imports.
# ---------------------------------------------------------------------------------------------

def _gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Inverse of dealing rows ``rank::world``: every rank gets all ``total`` rows in order."""
    rank, world = rank_and_world()
    if world == 1:
        return local
    per_rank = -(-total // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = all_gather_no_grad(padded).chunk(world)  # (per_rank, ...) each, in rank order
    out = local.new_empty((total, *local.shape[1:]))
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, total, world))]
    return out


@torch.no_grad()
def _encode_rows(fn, total: int, batch_size: int) -> torch.Tensor:
    rank, world = rank_and_world()
    rows = torch.arange(rank, total, world)
    # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in
    # each one): a rank out of rows encodes row 0 and drops the result.
    num_chunks = -(-(-(-total // world)) // batch_size)
    chunks = []
    for i in range(num_chunks):
        part = rows[i * batch_size:(i + 1) * batch_size]
        out = fn(part if len(part) else torch.zeros(1, dtype=torch.long))
        chunks.append(out[:len(part)])
    local = torch.cat(chunks).float().cpu() if chunks else torch.empty(0)
    return _gather_rows(local, total)


def encode_images(encoder, images, device: torch.device, domain: int | None = TARGET,
                  batch_size: int = 256) -> torch.Tensor:
    """Embed every image of ``images`` (``len`` and ``fetch(rows) -> (B, 3, H, W) uint8``,
    e.g. an ``ImageSource``): (M, D) float32 on CPU, rows sharded over ranks.

    ``domain``: whose running means centre the embeddings (model/centring.py); the default,
    TARGET, is a no-op for models that never estimated target means (source-only, oracle).
    Evaluation and the search CLI both embed with this function, so they rank alike.
    """
    was_training = encoder.training
    encoder.eval()
    out = _encode_rows(
        lambda rows: encoder.encode_image(normalize(images.fetch(rows).to(device)), domain),
        len(images), batch_size)
    encoder.train(was_training)
    return out


def encode_texts(encoder, captions, device: torch.device, domain: int | None = TARGET,
                 batch_size: int = 256) -> torch.Tensor:
    """Embed tokenised captions (``len`` and ``take(rows) -> (input_ids, attention_mask)``,
    e.g. ``Captions``): (N, D) float32 on CPU, sharded over ranks; ``domain`` as above."""
    was_training = encoder.training
    encoder.eval()
    out = _encode_rows(
        lambda rows: encoder.encode_text(*(t.to(device) for t in captions.take(rows)), domain),
        len(captions), batch_size)
    encoder.train(was_training)
    return out


def encode_split(encoder, split, device: torch.device, domain: int | None = TARGET,
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode a split's gallery images (M, D) and query captions (N, D), sharded over ranks
    (``domain`` as in :func:`encode_images`)."""
    return (encode_images(encoder, split.images, device, domain, batch_size),
            encode_texts(encoder, split.captions, device, domain, batch_size))


def evaluate_split(encoder, split, device: torch.device, domain: int | None = TARGET
                   ) -> dict[str, float]:
    """Text-to-image retrieval on a labelled split: captions query the split's images."""
    images, texts = encode_split(encoder, split, device, domain)
    return retrieval_metrics_from_embeddings(texts, images, split.labels, split.image_labels)


@torch.no_grad()
def rerank_split(encoder, head, split, device: torch.device, images: torch.Tensor,
                 texts: torch.Tensor, top_k: int, weight: float, chunk: int = 64
                 ) -> dict[str, float]:
    """Retrieval metrics after the matching head re-scores each query's top-k images
    (``matching.rerank``). ``images``/``texts`` are the split's embeddings from
    ``encode_split`` (every rank holds all of them). Query blocks of ``chunk`` are dealt
    round-robin to ranks; token states are computed only for the images some query of the block
    has in its top-k; the re-scored entries (at most ``top_k`` per query) are exchanged, so
    every rank ends with the same scores as one process re-ranking everything."""
    was_training = encoder.training, head.training
    encoder.eval(), head.eval()
    sim = texts @ images.t()  # (Q, G) on CPU
    rank, world = rank_and_world()
    blocks = range(0, len(sim), chunk)
    starts = blocks[rank::world]
    # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively in
    # each one): a rank out of blocks re-scores block 0 and drops the result.
    rounds = -(-len(blocks) // world)
    changed = []
    for i in range(rounds):
        start = starts[i] if i < len(starts) else 0
        rows, scores = _rerank_block(encoder, head, split, device, sim[start:start + chunk],
                                     start, top_k, weight)
        if i < len(starts):
            changed.append((start, rows, scores))
    for part in all_gather_objects(changed):
        for start, rows, scores in part:
            block = sim[start:start + len(scores)]
            block[:, rows] = scores
    encoder.train(was_training[0]), head.train(was_training[1])
    return retrieval_metrics(sim, split.labels, split.image_labels)


def _rerank_block(encoder, head, split, device, block: torch.Tensor, start: int, top_k: int,
                  weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of queries: (gallery columns some query has in its top-k, their re-scored
    (len(block), len(columns)) scores on CPU)."""
    from gckd_ray.model.matching import rerank

    rows = block.topk(min(top_k, block.shape[1]), dim=1).indices.unique()  # sorted
    ids, mask = (t.to(device) for t in split.captions.take(
        torch.arange(start, start + len(block))))
    pixels = normalize(split.images.fetch(rows).to(device))
    _, _, image_tokens, text_tokens = encoder.encode_with_tokens(pixels, ids, mask)
    return rows, rerank(head, text_tokens, mask, image_tokens, block[:, rows].to(device),
                        top_k, weight).cpu()


def resolve_device(name: str | None) -> torch.device:
    """The device of ``--device``: ``cpu``, ``cuda`` or ``cuda:N``; None -> ``cuda`` when CUDA
    is available, else ``cpu``.

    Raises:
        InputError: not a device name, or a CUDA device this machine does not have.
    """
    from gckd_ray.errors import InputError

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name}: not a device (cpu, cuda or cuda:N)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InputError(f"--device {name}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, no GPU visible); use --device cpu")
        if device.index is not None and device.index >= count:
            raise InputError(f"--device {name}: this machine has {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1})")
    return device


def add_device_argument(parser) -> None:
    """``--device`` of the evaluate and search commands."""
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")


def load_encoder(checkpoint: str | Path, cfg, tokenizer):
    """The dual encoder of a training checkpoint (weights loaded with weights_only=True)."""
    from gckd_ray.checkpoint_format import load_model_state
    from gckd_ray.model.retriever import build_encoder

    encoder = build_encoder(cfg, tokenizer)
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in load_model_state(checkpoint).items()
             if k.startswith(prefix)}
    encoder.load_state_dict(state)
    return encoder.eval()


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from gckd_ray.config import override_config
    from gckd_ray.data.datasets import load_split
    from gckd_ray.data.tokenizer import load_tokenizer
    from gckd_ray.checkpoint_format import checkpoint_tokenizer_dir, load_checkpoint_config
    from gckd_ray.errors import InputError, one_line

    parser = argparse.ArgumentParser(
        prog="python -m gckd_ray.evaluate",
        description="Text-to-image retrieval metrics of a saved checkpoint on the configured "
                    "target domain (captions query images; a match is the same person id).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory of a run")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    add_device_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides on the checkpoint's config, e.g. "
                             "data.target.name=rstpreid data.target.root=/data/RSTPReid")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        cfg = override_config(load_checkpoint_config(args.checkpoint), args.overrides)
        tokenizer = load_tokenizer(checkpoint_tokenizer_dir(args.checkpoint))
        split = load_split(cfg, cfg.data.target, args.split, tokenizer, verbose=True)
    except InputError as err:
        print(one_line(err), file=sys.stderr)
        return 2
    encoder = load_encoder(args.checkpoint, cfg, tokenizer).to(device)
    metrics = evaluate_split(encoder, split, device)
    print(json.dumps({"split": split.name, **metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
