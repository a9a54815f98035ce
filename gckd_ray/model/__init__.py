"""The method as single-process PyTorch: dual encoder, losses, graph, EMA teacher, GCKD distiller.

Nothing here imports Ray, DeepSpeed or ``gckd_ray.distributed``; data parallelism shows up only
as the collectives of ``model/collectives.py`` (identity on one process), the one module of the
package that calls ``torch.distributed`` collectives.
"""
