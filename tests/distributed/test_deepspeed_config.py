"""The optimizer's parameter groups: pretrained towers at train.lr, added modules scaled."""

import torch

from gckd_ray.config import load_config
from gckd_ray.data.tokenizer import WordTokenizer
from gckd_ray.distributed.deepspeed_config import param_groups
from gckd_ray.model.gckd import build_gckd

CAPTIONS = ["a man in a red shirt", "a woman in blue jeans"]


def _module():
    cfg = load_config(None, ["model.hidden_size=32", "model.embed_dim=16", "model.num_layers=1",
                             "model.num_heads=2"])
    return build_gckd(cfg, WordTokenizer.build(CAPTIONS), num_classes=4)


def test_new_modules_get_the_scaled_rate_and_the_schedule_keeps_the_ratio():
    module = _module()
    clip, new = param_groups(module, lr=1e-3, new_module_scale=5.0)
    clip_ids = {id(p) for p in module.encoder.clip.parameters() if p.requires_grad}
    assert {id(p) for p in clip["params"]} == clip_ids
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(clip["params"]) + len(new["params"]) == len(trainable)
    names = {id(p): n for n, p in module.named_parameters()}
    assert any(names[id(p)].startswith("objective.") for p in new["params"])  # ID classifier
    assert any(names[id(p)].startswith("propagation.") for p in new["params"])
    assert not any(id(p) in clip_ids for p in new["params"])
    optimizer = torch.optim.AdamW([clip, new], lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    for _ in range(3):
        optimizer.step()
        schedule.step()
    low, high = (g["lr"] for g in optimizer.param_groups)
    assert high == 5 * low and low == 1e-3 * 0.5 ** 3  # exact: powers of two times 5e-3


def test_scale_one_is_a_single_group_of_every_trainable_parameter():
    module = _module()
    (group,) = param_groups(module, lr=2e-3, new_module_scale=1.0)
    assert group["lr"] == 2e-3
    assert len(group["params"]) == sum(p.requires_grad for p in module.parameters())
