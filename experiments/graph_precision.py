"""Offline audit: how often does a GCKD run's step graph join two views of one person?
(reads target labels)

    python -m experiments.graph_precision RUN_DIR [RUN_DIR ...] [--draws 20]
                                          [--json graph_precision.jsonl]

For runs trained with graph propagation. Per checkpoint the run kept (``ray/*/checkpoint_*``,
one per epoch; ``run.keep_checkpoints`` sets how many stay), the memory it saved holds the
teacher's features of the latest steps with their domain, source person id and target row.
Each draw builds a graph as a step does (model/gckd.py ``_propagate``): per (modality, domain)
a batch of ``train.batch_size`` entries and the ``gckd.memory_nodes`` newest ones as context,
``knn_edges`` with ``graph.k`` neighbours on their teacher features. The batch comes from the
memory too (the teacher of a few steps earlier instead of this step's); it is drawn at random
from the entries just older than the context. Every edge into a node is scored, unless it
joins two copies of one image or caption (pushed at different steps): right when both ends
show one person, source ends by their person id, target ends by the annotation's id of
their row, a source-target edge never. Per checkpoint (mean over draws): ``edge_precision``
(all edges), ``target_edge_precision`` (edges into target nodes), ``target_cross_modal_precision``
(image-caption edges between target nodes, what propagation carries across modalities),
``cross_domain_share`` (edges into target nodes from source nodes) and
``target_edge_ceiling`` (the target edge precision a perfect kNN would reach: per target node,
its other nodes of the same person in the drawn graph, at most k, over k).
Ground-truth target ids are read here and only here: training never sees them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from experiments.pseudo_curves import target_person_ids
from gckd_ray.checkpoint_format import load_checkpoint_config, load_memory_state
from gckd_ray.model.centring import SOURCE, TARGET
from gckd_ray.model.graph import knn_edges

MODALITIES = ("image", "text")


def node_identities(memory: dict[str, np.ndarray], modality: str,
                    target_pids: np.ndarray) -> np.ndarray:
    """Person of each memory entry of ``modality`` in a space shared by both domains: source
    person id p -> 2p, target person id q -> 2q + 1 (never equal across domains)."""
    domain = memory[f"{modality}_domain"]
    labels, rows = memory[f"{modality}_labels"], memory[f"{modality}_indices"]
    source = 2 * labels
    target = 2 * target_pids[np.where(domain == TARGET, rows, 0)] + 1
    return np.where(domain == SOURCE, source, target)


def draw_graph(memory: dict[str, np.ndarray], target_pids: dict[str, np.ndarray], batch: int,
               context: int, rng: np.random.Generator):
    """One step-like node set: (features (N, D), person (N,), item (N,), is_target (N,),
    is_text (N,)); ``item`` tells copies of one image or caption (pushed at different steps)."""
    feats, person, item, is_target, is_text = [], [], [], [], []
    for m, modality in enumerate(MODALITIES):
        ids = node_identities(memory, modality, target_pids[modality])
        for domain in (SOURCE, TARGET):
            rows = np.flatnonzero(memory[f"{modality}_domain"] == domain)
            if len(rows) < batch + context:
                raise ValueError(f"{len(rows)} {modality} entries of domain {domain} in the "
                                 f"memory; a step graph needs {batch} + {context}")
            newest, older = rows[-context:], rows[:-context][-10 * batch:]
            chosen = np.concatenate([rng.choice(older, batch, replace=False), newest])
            feats.append(memory[f"{modality}_features"][chosen])
            person.append(ids[chosen])
            item.append(4 * memory[f"{modality}_indices"][chosen] + 2 * domain + m)
            is_target.append(np.full(len(chosen), domain == TARGET))
            is_text.append(np.full(len(chosen), m == 1))
    return (torch.from_numpy(np.concatenate(feats)).float(), np.concatenate(person),
            np.concatenate(item), np.concatenate(is_target), np.concatenate(is_text))


def score_graph(feats: torch.Tensor, person: np.ndarray, item: np.ndarray,
                is_target: np.ndarray, is_text: np.ndarray, k: int) -> dict[str, float]:
    """Edge precision of the kNN graph over ``feats`` (see the module docstring); an edge
    between two copies of one item is not scored (it says nothing about identity)."""
    src, dst = knn_edges(feats, k).numpy()
    keep = item[src] != item[dst]
    src, dst = src[keep], dst[keep]
    right = person[src] == person[dst]
    into_target = is_target[dst]
    # the best k edges of a target node could do: its other items of the same person
    same = ((person[:, None] == person[None, :]) & (item[:, None] != item[None, :])).sum(1)
    ceiling = np.minimum(same[is_target], k) / k
    cross_modal = into_target & is_target[src] & (is_text[src] != is_text[dst])
    return {"edge_precision": float(right.mean()),
            "target_edge_precision": float(right[into_target].mean()),
            "target_cross_modal_precision": (float(right[cross_modal].mean())
                                             if cross_modal.any() else float("nan")),
            "cross_domain_share": float((~is_target[src][into_target]).mean()),
            "target_edge_ceiling": float(ceiling.mean())}


def score_run(run_dir: Path, draws: int, context: int = 0, seed: int = 0) -> list[dict]:
    """One row per checkpoint; ``context``: memory nodes per group (0: the run's
    ``gckd.memory_nodes``; more asks what a graph over more of the memory would join)."""
    checkpoints = sorted((p for p in run_dir.glob("ray/*/checkpoint_*") if p.is_dir()),
                         key=lambda p: p.name)
    if not checkpoints:
        raise FileNotFoundError(f"{run_dir}: no checkpoint under ray/*/")
    image_pids, text_pids = target_person_ids(run_dir)
    pids = {"image": image_pids, "text": text_pids}
    rows = []
    for checkpoint in checkpoints:
        cfg = load_checkpoint_config(checkpoint)
        memory = load_memory_state(checkpoint)
        if memory is None or not cfg.graph.enabled:
            continue  # nothing to audit: no memory saved or no graph trained
        epoch = json.loads((checkpoint / "state.json").read_text())["epoch"]
        rng = np.random.default_rng(seed)
        nodes = context or cfg.gckd.memory_nodes
        scores = [score_graph(*draw_graph(memory, pids, cfg.train.batch_size, nodes, rng),
                              cfg.graph.k)
                  for _ in range(draws)]
        rows.append({"run": str(run_dir), "epoch": epoch, "draws": draws, "context": nodes,
                     **{key: float(np.nanmean([s[key] for s in scores])) for key in scores[0]}})
    if not rows:
        raise ValueError(f"{run_dir}: no checkpoint with a saved memory and graph.enabled=true")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.graph_precision",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run.output_dir of each run")
    parser.add_argument("--draws", type=int, default=20, help="step graphs drawn per checkpoint")
    parser.add_argument("--context", type=int, default=0,
                        help="memory nodes per modality and domain (0: the run's "
                             "gckd.memory_nodes)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [row for run in args.runs for row in score_run(run, args.draws, args.context)]
    for row in rows:
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
