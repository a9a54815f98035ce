"""The GCKD distiller in one process: named losses, ablation switches, EMA, no target ids."""

import pytest
import torch

from gckd_ray.config import load_config
from gckd_ray.data.tokenizer import WordTokenizer
from gckd_ray.model.gckd import TARGET_GROUP_OFFSET, MemoryView, build_gckd

CAPTIONS = ["a man in a red shirt", "a woman in blue jeans", "a man with a black bag",
            "a woman wearing a green coat"]


def _setup(*overrides):
    cfg = load_config(None, ["model.hidden_size=32", "model.embed_dim=16", "model.num_layers=1",
                             "model.num_heads=2", "graph.k=3", *overrides])
    tok = WordTokenizer.build(CAPTIONS)
    torch.manual_seed(0)
    model = build_gckd(cfg, tok, num_classes=4)
    ids, mask, _ = tok.encode(CAPTIONS, cfg.data.text_length)
    images = torch.randn(4, 3, cfg.data.image_height, cfg.data.image_width)
    source = {"images": images, "input_ids": ids, "attention_mask": mask,
              "pids": torch.tensor([0, 1, 2, 3])}
    target = {"images": images.flip(0), "image_rows": torch.tensor([0, 1, 2, 3]),
              "input_ids": ids.flip(0), "attention_mask": mask.flip(0),
              "text_rows": torch.tensor([3, 2, 1, 0])}
    return cfg, model, source, target


def _memory(dim=16, n=12):
    feats = torch.nn.functional.normalize(torch.randn(n, dim), dim=1)
    groups = torch.tensor([0, 1, 2, 3, -1, TARGET_GROUP_OFFSET + 5] * (n // 6))
    return MemoryView(image=feats, image_groups=groups, text=feats.flip(0),
                      text_groups=groups.flip(0), graph_nodes=feats[:8],
                      target_image_pseudo=torch.tensor([5, -1, 5, -1]),
                      target_text_pseudo=torch.tensor([-1, 5, -1, 5]))


def test_losses_by_phase_and_switches():
    cfg, model, source, target = _setup()
    warm = model(source, target, _memory(), adapt=False).losses
    assert set(warm) == {"itc", "id", "loss"}
    full = model(source, target, _memory(), adapt=True)
    assert set(full.losses) == {"itc", "id", "gmp", "cmkd", "itm", "loss"}
    # float32 math: a sum of 5 terms, possibly in another order (~1e-7 relative); isclose's
    # rtol 1e-5
    assert torch.isclose(full.losses["loss"],
                         sum(v for k, v in full.losses.items() if k != "loss"))
    assert set(full.teacher) == {"src_image", "src_text", "tgt_image", "tgt_text"}
    _, no_graph, *_ = _setup("graph.enabled=false")
    assert "gmp" not in no_graph(source, target, _memory(), adapt=True).losses
    _, no_cmkd, *_ = _setup("distill.mode=none")
    assert "cmkd" not in no_cmkd(source, target, None, adapt=True).losses
    _, no_matching, *_ = _setup("matching.enabled=false")
    assert no_matching.matching is None
    assert "itm" not in no_matching(source, target, _memory(), adapt=True).losses


def test_without_target_losses_the_student_encodes_the_source_batch_only():
    """pretrained.yaml's adaptation (every target loss off): the teacher still encodes both
    batches for the domain means; the student encodes the source batch alone, as in warm-up."""
    off = ("distill.mode=none", "graph.enabled=false", "matching.enabled=false")
    cfg, model, source, target = _setup(*off)
    assert not cfg.target_losses_on
    seen, encode_image = [], model.encoder.encode_image

    def spy(images, domain):
        seen.append(domain)
        return encode_image(images, domain)
    model.encoder.encode_image = spy
    out = model(source, target, None, adapt=True)
    assert seen == [0]  # SOURCE only
    assert set(out.losses) == {"itc", "id", "loss"} and out.stats == {}
    assert set(out.teacher) == {"src_image", "src_text", "tgt_image", "tgt_text"}
    assert bool(model.encoder.centring.seen[1].all())  # the target means still move
    for on in ("distill.mode=cmkd", "graph.enabled=true", "matching.enabled=true",
               "loss.weights.i2i=0.5"):
        assert load_config(None, [*off, on]).target_losses_on, on


def test_gradients_reach_student_not_teacher_and_ema_moves_teacher():
    cfg, model, source, target = _setup()
    model(source, target, _memory(), adapt=True).losses["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.propagation.parameters())
    before = [p.clone() for p in model.teacher.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1)
    model.ema_step()
    moved = [(a - b.detach()).abs().max() for a, b in zip(model.teacher.parameters(), before)]
    # float32 math: t <- 0.995 t + 0.005 (t + 0.1) rounds twice at ~ulp(t) / 2 <= 1.2e-7 for
    # |t| <= 2.7 (logit_scale), so each move is 5e-4 to within 2.4e-7, i.e. 5e-4 relative;
    # rel=1e-3 covers that, and a wrong momentum (e.g. 0.99: a 1e-3 move) cannot pass.
    assert cfg.gckd.momentum == 0.995
    assert all(m == pytest.approx(0.1 * (1 - cfg.gckd.momentum), rel=1e-3) for m in moved)


def test_bf16_distiller_keeps_fp32_ema_masters_outside_its_state_dict():
    _, model, *_ = _setup()
    model.to(torch.bfloat16)  # as DeepSpeed's bf16 engine casts its module, teacher included
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.25)
    model.ema_step()
    masters = model.ema_state.state_dict()
    teacher = dict(model.teacher.module.named_parameters())
    assert masters.keys() == teacher.keys()
    assert all(m.dtype == torch.float32 for m in masters.values())
    # bf16: the teacher is its master rounded once, exactly; the masters keep what bf16 drops
    assert all(torch.equal(t, masters[n].to(torch.bfloat16)) for n, t in teacher.items())
    assert any(not torch.equal(masters[n], t.float()) for n, t in teacher.items())
    assert not any(k.startswith("ema_state") for k in model.state_dict())  # saved as extras
    _, fp32, *_ = _setup()
    fp32.ema_step()
    assert fp32.ema_state.state_dict() == {}  # float32 teacher tensors are their own state


def test_target_positives_come_from_memory_pseudo_ids_only():
    cfg, model, source, target = _setup()
    pos_t2i, pos_i2t, stats = model._target_positives(source, target, _memory())
    # Target text rows 3,2,1,0 -> pseudo ids 5,-1,5,-1; target images rows 0..3 -> 5,-1,5,-1.
    tgt_block = pos_t2i[4:, 4:8]
    assert tgt_block.tolist() == [[True, False, True, False], [False] * 4,
                                  [True, False, True, False], [False] * 4]
    assert stats["target_text_with_positive"] == 0.5
    assert not pos_t2i[4:, :4].any()  # a target caption never matches a source image
    assert pos_i2t.shape == (8, 8 + 12) and pos_t2i.shape == (8, 8 + 12)


def test_domain_centring_is_estimated_from_teacher_features_and_reaches_teacher():
    from gckd_ray.model.centring import IMAGE, TARGET

    cfg, model, source, target = _setup()
    out = model(source, target, None, adapt=False)  # warm-up steps estimate the means too
    centring = model.encoder.centring
    assert centring.seen.all()
    with torch.no_grad():
        raw = model.teacher.module.encode_image(target["images"])
    # float32 math: the teacher forward is repeated here (kernels may round it differently,
    # ~1e-7), then a mean of 4 rows, and centring and re-normalising amplify that a few times
    assert torch.allclose(centring.means[TARGET, IMAGE], raw.mean(0), atol=1e-6)
    assert torch.allclose(out.teacher["tgt_image"],
                          torch.nn.functional.normalize(raw - raw.mean(0), dim=1), atol=1e-5)
    model.ema_step()
    assert torch.equal(model.teacher.module.centring.means, centring.means)
    _, off, *_ = _setup("gckd.domain_centring=false")
    off(source, target, None, adapt=True)
    assert not off.encoder.centring.seen.any()


def test_matching_head_trains_on_source_pairs_and_target_pseudo_pairs():
    cfg, model, source, target = _setup()
    out = model(source, target, _memory(), adapt=True)
    # memory pseudo-id 5: target images rows 0, 2 and captions rows 1, 3 -> one group; the
    # batch's target text rows are [3, 2, 1, 0], so captions at batch rows 0 and 2 pair with
    # images at batch rows 0 and 2: 2 x 2 target pairs
    assert out.stats["itm_target_pairs"] == 4
    out.losses["itm"].backward()
    assert all(p.grad is not None for p in model.matching.parameters())
    _, random_negatives, *_ = _setup("matching.hard_negatives=false")
    assert torch.isfinite(random_negatives(source, target, _memory(), adapt=True).losses["itm"])


def test_teacher_reads_its_own_view_and_student_the_strong_one():
    cfg, model, source, target = _setup()
    plain = model(source, target, None, adapt=True)
    # The student's view changes; the teacher's (teacher_images) stays the plain one.
    strong_source = {**source, "images": source["images"] + 0.5,
                     "teacher_images": source["images"]}
    strong_target = {**target, "images": target["images"] - 0.5,
                     "teacher_images": target["images"]}
    _, model_again, *_ = _setup()
    views = model_again(strong_source, strong_target, None, adapt=True)
    for key in plain.teacher:  # float32: the same teacher forward twice; float32 defaults
        torch.testing.assert_close(views.teacher[key], plain.teacher[key])
    assert not torch.isclose(views.losses["loss"], plain.losses["loss"])



@pytest.mark.parametrize("matching", ["true", "false"])
def test_target_text_grad_off_keeps_target_captions_out_of_the_text_towers_gradient(matching):
    """gckd.target_text_grad=false: target captions are inputs (keys, graph nodes) but no
    gradient flows back through their student embeddings, so the token embeddings of words
    only target captions use get none."""
    target_captions = ["zebra stripes"] * 4
    tok = WordTokenizer.build(CAPTIONS + target_captions)

    def target_word_grad(*overrides):
        cfg = load_config(None, ["model.hidden_size=32", "model.embed_dim=16",
                                 "model.num_layers=1", "model.num_heads=2", "graph.k=3",
                                 f"matching.enabled={matching}", *overrides])
        torch.manual_seed(0)
        model = build_gckd(cfg, tok, num_classes=4)
        ids, mask, _ = tok.encode(CAPTIONS, cfg.data.text_length)
        t_ids, t_mask, _ = tok.encode(target_captions, cfg.data.text_length)
        images = torch.randn(4, 3, cfg.data.image_height, cfg.data.image_width)
        source = {"images": images, "input_ids": ids, "attention_mask": mask,
                  "pids": torch.tensor([0, 1, 2, 3])}
        target = {"images": images.flip(0), "image_rows": torch.tensor([0, 1, 2, 3]),
                  "input_ids": t_ids, "attention_mask": t_mask,
                  "text_rows": torch.tensor([3, 2, 1, 0])}
        model(source, target, _memory(), adapt=True).losses["loss"].backward()
        words = t_ids[0, t_mask[0].bool()][1:-1]  # "zebra", "stripes" (no bos/eos)
        assert not torch.isin(words, ids).any()
        return model.encoder.clip.text_model.embeddings.token_embedding.weight.grad[words]

    assert target_word_grad().abs().sum() > 0
    assert target_word_grad("gckd.target_text_grad=false").abs().sum() == 0


def test_i2i_distils_images_against_teacher_images_with_own_view_and_group_positives():
    _, model, source, target = _setup("loss.weights.i2i=0.5")
    out = model(source, target, _memory(), adapt=True)
    assert "i2i" in out.losses and torch.isfinite(out.losses["i2i"])
    assert "i2i" not in _setup()[1](source, target, _memory(), adapt=True).losses
    _, with_mnf, *_ = _setup("distill.mode=mnf_csc", "loss.weights.i2i=0.5")
    assert {"i2i", "csc"} <= set(with_mnf(source, target, _memory(), adapt=True).losses)
    # the groups its positives come from (besides each image's own teacher view)
    with torch.no_grad():
        groups, _ = model._group_keys(source, target, _memory())
    assert groups.tolist()[:4] == [0, 1, 2, 3]  # source ids; target rows 0, 2 share pseudo-id 5
    assert groups[4] == groups[6] == TARGET_GROUP_OFFSET + 5 and groups[5] == groups[7] == -1
    out.losses["i2i"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.encoder.clip.vision_model.parameters())
