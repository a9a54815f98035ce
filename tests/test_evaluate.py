"""Retrieval metrics (gckd_ray.evaluate) against hand-worked cases and a brute-force reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from gckd_ray.errors import InputError
from gckd_ray.evaluate import (main, mutual_nn_agreement, resolve_device, retrieval_metrics,
                               retrieval_metrics_from_embeddings)

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def brute_force(similarity, query_ids, gallery_ids):
    """DESIGN §6 read literally: one Python loop per query, a sort with ties by gallery index."""
    sim = np.asarray(similarity, dtype=np.float32).tolist()
    q_ids, g_ids = list(np.asarray(query_ids)), list(np.asarray(gallery_ids))
    hits = {k: [] for k in (1, 5, 10)}
    aps, inps, without = [], [], 0
    for row, qid in zip(sim, q_ids):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        correct = [rank for rank, j in enumerate(order, start=1) if g_ids[j] == qid]
        if not correct:
            without += 1
            continue
        for k in hits:
            hits[k].append(correct[0] <= k)
        aps.append(sum(n / rank for n, rank in enumerate(correct, start=1)) / len(correct))
        inps.append(len(correct) / correct[-1])
    mean = lambda xs: 100.0 * sum(xs) / len(xs)  # noqa: E731
    out = {f"R{k}": mean(v) for k, v in hits.items()}
    out.update(mAP=mean(aps), mINP=mean(inps), num_queries=len(aps))
    out["num_queries_without_match"] = without
    return out


def assert_same(got, expected, tol=1e-9):
    """Metrics are float64 means of exact rationals (from integer ranks): the default ``tol``
    (on values up to 100) leaves room for float64 summation order (~1e-14) only."""
    assert set(got) == set(METRICS) | {"num_queries", "num_queries_without_match"}
    for key in METRICS:
        assert isinstance(got[key], float), key
        assert got[key] == pytest.approx(expected[key], abs=tol), key
    assert got["num_queries"] == expected["num_queries"]
    assert got["num_queries_without_match"] == expected["num_queries_without_match"]


def test_mutual_nn_agreement_hand_worked():
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.436]])
    images = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # Caption -> nearest image: 0, 1, 0 (0.9 > 0.889). Image -> nearest caption: 0, 2.
    # Mutual: caption 0 with image 0 only, over min(3, 2) possible pairs. float32 math; every
    # nearest neighbour wins by >= 0.01, far beyond rounding, so the counts are exact.
    assert mutual_nn_agreement(texts, images) == pytest.approx(50.0)
    assert mutual_nn_agreement(texts, images, chunk_size=1) == pytest.approx(50.0)
    assert mutual_nn_agreement(texts[:2], images[:1]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="non-empty"):
        mutual_nn_agreement(texts[:0], images)


def test_hand_worked_example():
    # Gallery ids [7, 3, 7, 5, 3]; 1-based ranks after sorting by (-score, gallery index).
    similarity = torch.tensor(
        [
            # q0 (id 7): order by (-score, index): 0(.8) 2(.8) 4(.6) 1(.5) 3(.1); correct 0, 2
            #   -> ranks 1, 2: AP = (1/1 + 2/2)/2 = 1, INP = 2/2 = 1, R1 hit
            [0.8, 0.5, 0.8, 0.1, 0.6],
            # q1 (id 3): order 0(.9) 3(.7) 2(.4) 4(.3) 1(.2); correct 1, 4 -> ranks 5, 4 i.e. 4, 5
            #   AP = (1/4 + 2/5)/2 = 0.325, INP = 2/5 = 0.4, R1 miss, R5 hit
            [0.9, 0.2, 0.4, 0.7, 0.3],
            # q2 (id 5): order 4(.6) 1(.5) 3(.5) 2(.2) 0(0): the tie 1 vs 3 goes to index 1, so
            #   the correct image 3 is at rank 3 (not 2): AP = 1/3, INP = 1/3, R1 miss, R5 hit
            [0.0, 0.5, 0.2, 0.5, 0.6],
            # q3 (id 9): no gallery image with id 9 -> excluded from every mean, counted
            [0.9, 0.9, 0.9, 0.9, 0.9],
        ]
    )
    got = retrieval_metrics(similarity, torch.tensor([7, 3, 5, 9]), torch.tensor([7, 3, 7, 5, 3]))
    expected = {
        "R1": 100 * 1 / 3,
        "R5": 100.0,
        "R10": 100.0,
        "mAP": 100 * (1 + 0.325 + 1 / 3) / 3,  # 55.2777...
        "mINP": 100 * (1 + 0.4 + 1 / 3) / 3,  # 57.7777...
        "num_queries": 3,
        "num_queries_without_match": 1,
    }
    assert_same(got, expected)
    assert_same(got, brute_force(similarity, [7, 3, 5, 9], [7, 3, 7, 5, 3]))


def test_ties_go_to_lower_gallery_index_and_signed_zero_ties():
    # All scores equal: the correct image at index 2 is ranked 3rd (index order).
    got = retrieval_metrics(np.zeros((1, 4), np.float32), np.array([1]), np.array([0, 0, 1, 0]))
    assert got["R1"] == 0.0 and got["R5"] == 100.0 and got["mAP"] == pytest.approx(100 / 3)
    # -0.0 == +0.0: still a tie, so index 0 (score -0.0) comes before index 1 (score +0.0).
    sim = torch.tensor([[-0.0, 0.0]])
    assert retrieval_metrics(sim, [1], [1, 2])["R1"] == 100.0
    assert retrieval_metrics(sim, [2], [1, 2])["R1"] == 0.0


def test_negative_and_infinite_scores_rank_in_value_order():
    sim = torch.tensor([[-1.0, -2.0, float("-inf"), -0.5, float("inf"), 3.0, -1e-40]])
    g_ids = np.arange(7)
    for j in range(7):
        got = retrieval_metrics(sim, np.array([j]), g_ids)
        assert_same(got, brute_force(sim, [j], g_ids))


@pytest.mark.parametrize("num_gallery", [1, 7, 64, 301])
def test_matches_brute_force_with_many_ties(num_gallery):
    gen = torch.Generator().manual_seed(num_gallery)
    num_q = 57
    sim = torch.rand(num_q, num_gallery, generator=gen).mul(2).sub(1).round(decimals=1)
    g_ids = torch.randint(0, max(2, num_gallery // 4), (num_gallery,), generator=gen)
    q_ids = torch.randint(0, max(2, num_gallery // 4) + 2, (num_q,), generator=gen)
    expected = brute_force(sim, q_ids, g_ids)
    assert expected["num_queries"] > 0
    assert_same(retrieval_metrics(sim, q_ids, g_ids, chunk_size=10), expected)


def random_case(seed=0, num_q=40, num_g=90, dim=8):
    """Small-integer embeddings: exact float32 dot products (no rounding), many ties."""
    gen = torch.Generator().manual_seed(seed)
    q_emb = torch.randint(-2, 3, (num_q, dim), generator=gen).float()
    g_emb = torch.randint(-2, 3, (num_g, dim), generator=gen).float()
    q_ids = torch.randint(0, 25, (num_q,), generator=gen)
    g_ids = torch.randint(0, 20, (num_g,), generator=gen)
    return q_emb, g_emb, q_ids, g_ids


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 40, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    q_emb, g_emb, q_ids, g_ids = random_case()
    sim = q_emb @ g_emb.T
    reference = retrieval_metrics(sim, q_ids, g_ids, chunk_size=10**6)
    assert reference["num_queries_without_match"] > 0  # the case exercises exclusion too
    assert retrieval_metrics(sim, q_ids, g_ids, chunk_size=chunk_size) == reference
    got = retrieval_metrics_from_embeddings(q_emb, g_emb, q_ids, g_ids, chunk_size=chunk_size)
    assert got == reference
    assert_same(reference, brute_force(sim, q_ids, g_ids))


def test_from_embeddings_matches_similarity_on_real_valued_embeddings():
    gen = torch.Generator().manual_seed(1)
    q_emb = torch.nn.functional.normalize(torch.randn(50, 32, generator=gen), dim=1)
    g_emb = torch.nn.functional.normalize(torch.randn(120, 32, generator=gen), dim=1)
    q_ids, g_ids = torch.randint(0, 30, (50,), generator=gen), torch.arange(120) % 30
    # Both paths rank in float32 (by design) but block the matmul differently (one 50-row
    # product against 7-row chunks), so a score may differ by float32 rounding: at most
    # 32 * 2**-24 ~ 2e-6 from the exact dot product of these D = 32 unit vectors. Every correct
    # image's exact score is more than 1e-5 from every other score of its query (checked
    # here), so either path ranks every correct image the same: the metrics agree exactly.
    exact = q_emb.double() @ g_emb.double().T  # float64 products of the float32 inputs
    gaps = (exact[:, :, None] - exact[:, None, :]).abs()  # (Q, G, G)
    correct_vs_other = (q_ids[:, None] == g_ids[None, :])[:, :, None] & \
        ~torch.eye(len(g_ids), dtype=torch.bool)
    assert gaps[correct_vs_other].min() > 1e-5
    expected = retrieval_metrics(q_emb @ g_emb.T, q_ids, g_ids)
    got = retrieval_metrics_from_embeddings(q_emb, g_emb, q_ids, g_ids, chunk_size=7)
    assert got == expected
    assert_same(expected, brute_force(exact, q_ids, g_ids))


def test_numpy_input_equals_torch_input():
    q_emb, g_emb, q_ids, g_ids = random_case(seed=3)
    sim = q_emb @ g_emb.T
    reference = retrieval_metrics(sim, q_ids, g_ids)
    assert retrieval_metrics(sim.numpy(), q_ids.numpy(), g_ids.numpy()) == reference
    # float64 scores and int32 ids are accepted (ranked in float32)
    assert retrieval_metrics(sim.double().numpy(), q_ids.int().numpy(), g_ids.numpy()) == reference
    got = retrieval_metrics_from_embeddings(q_emb.numpy(), g_emb.numpy(), q_ids.numpy(), g_ids)
    assert got == reference


def test_input_tensors_are_left_unchanged():
    sim = torch.tensor([[-0.0, -1.5, 2.0], [0.5, 0.5, -3.0]])
    before = sim.clone()
    retrieval_metrics(sim, [0, 1], [0, 1, 1])
    assert torch.equal(sim, before) and torch.equal(sim.signbit(), before.signbit())


def test_shape_mismatch_names_the_shapes():
    sim = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"query_ids.*\(3,\).*\(3, 4\).*\(2,\)"):
        retrieval_metrics(sim, torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"gallery_ids.*\(4,\).*\(5,\)"):
        retrieval_metrics(sim, torch.zeros(3, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        retrieval_metrics(torch.zeros(3), [0, 0, 0], [0])
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(4, 6\)"):
        retrieval_metrics_from_embeddings(torch.zeros(3, 8), torch.zeros(4, 6), [0] * 3, [0] * 4)


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match="integers"):
        retrieval_metrics(torch.zeros(1, 2), torch.zeros(1), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[0.1, float("nan")]]), [0], [0, 1])
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(torch.zeros(1, 2), [0], [0, 1], chunk_size=0)


def test_all_queries_without_match_is_an_error():
    with pytest.raises(ValueError, match="none of the 2 queries has a correct image"):
        retrieval_metrics(torch.rand(2, 3), [5, 6], [1, 2, 3])
    with pytest.raises(ValueError, match="none of the 2 queries"):
        retrieval_metrics(torch.rand(2, 0), [5, 6], np.zeros(0, dtype=np.int64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    q_emb, g_emb, q_ids, g_ids = random_case(seed=5, num_q=300, num_g=500)
    reference = retrieval_metrics(q_emb @ g_emb.T, q_ids, g_ids)
    cuda = torch.device("cuda")
    got = retrieval_metrics((q_emb @ g_emb.T).to(cuda), q_ids.to(cuda), g_ids.to(cuda), 64)
    assert_same(got, reference)
    got = retrieval_metrics_from_embeddings(q_emb.to(cuda), g_emb, q_ids, g_ids, chunk_size=64)
    assert_same(got, reference)


def test_benchmark_smoke(capsys):
    from benchmarks import eval_ranking

    result = eval_ranking.main(["--smoke"])
    assert result["identical_metrics"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")


def test_rerank_with_zero_weight_keeps_the_ranking(synth_cache, tiny_config):
    from gckd_ray.data.datasets import load_split
    from gckd_ray.data.tokenizer import WordTokenizer
    from gckd_ray.evaluate import encode_split, evaluate_split, rerank_split
    from gckd_ray.model.gckd import build_gckd

    cfg = tiny_config("method=gckd")
    tok = WordTokenizer.build(["a"])
    split = load_split(cfg, cfg.data.target, "test", tok)
    model = build_gckd(cfg, tok, num_classes=3)
    device = torch.device("cpu")
    plain = evaluate_split(model.encoder, split, device)
    images, texts = encode_split(model.encoder, split, device)
    assert rerank_split(model.encoder, model.matching, split, device, images, texts,
                        5, 0.0) == plain
    boosted = rerank_split(model.encoder, model.matching, split, device, images, texts,
                           5, 100.0)
    # re-ranking only reorders each query's top 5 among themselves: R5 and R10 cannot move
    assert boosted["R5"] == plain["R5"] and boosted["R10"] == plain["R10"]


def _reranked(cfg_dict: dict, rank: int = 0) -> dict:
    """Re-ranked metrics of a seeded GCKD model on the tiny target test split, query blocks of
    8 (5 blocks: uneven over 2 ranks)."""
    from gckd_ray.config import config_from_dict
    from gckd_ray.data.datasets import load_split
    from gckd_ray.data.tokenizer import WordTokenizer
    from gckd_ray.evaluate import encode_split, rerank_split
    from gckd_ray.model.gckd import build_gckd

    cfg = config_from_dict(cfg_dict)
    tok = WordTokenizer.build(["a"])
    split = load_split(cfg, cfg.data.target, "test", tok)
    torch.manual_seed(0)
    model = build_gckd(cfg, tok, num_classes=3)
    device = torch.device("cpu")
    images, texts = encode_split(model.encoder, split, device)
    return rerank_split(model.encoder, model.matching, split, device, images, texts, 5, 100.0,
                        chunk=8)


def test_rerank_split_over_two_ranks_equals_one_process(synth_cache, tiny_config):
    from helpers import run_gloo_ranks

    cfg = tiny_config("method=gckd").to_dict()
    alone = _reranked(cfg)
    ranks = run_gloo_ranks(functools.partial(_reranked, cfg), 2)
    assert ranks[0] == ranks[1] == alone  # exact: the same float32 scores, exchanged as is


def test_device_defaults_to_cuda_when_available_and_refuses_what_is_not_there(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    with pytest.raises(InputError, match="--device cuda: CUDA is not available on this "
                                         "machine .*; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="--device tpu: not a device"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="--device mps: not a device"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None) == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InputError, match="--device cuda:2: this machine has 2 CUDA device"):
        resolve_device("cuda:2")


def test_evaluate_refuses_an_unavailable_cuda_device_in_one_line(tmp_path, capsys,
                                                                 monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--checkpoint", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("input error: --device cuda: CUDA is not available on this machine")
    assert err.count("\n") == 1
