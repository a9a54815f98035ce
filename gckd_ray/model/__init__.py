"""The method as single-process PyTorch: dual encoder, losses, and (later) the GCKD heads.

Nothing here imports Ray, DeepSpeed or ``gckd_ray.distributed``; data parallelism shows up only
as ``torch.distributed`` collectives inside the losses (identity on one process).
"""
