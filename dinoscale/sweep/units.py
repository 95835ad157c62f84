"""What Ray Tune runs in the trial stage: a unit is a frozen cell (``dinoscale.sweep.trial``) or one
configuration of a training strategy's cell (``dinoscale.sweep.finetune``), named by ``Cell.units``."""

from __future__ import annotations

from dinoscale.sweep.cell import parse_unit
from dinoscale.sweep.finetune import configuration_trainable
from dinoscale.sweep.trial import SweepContext, cell_trainable


def unit_trainable(config: dict, ctx: SweepContext) -> None:
    """The Ray Tune function trainable of the trial stage: a frozen cell, or one configuration of a training
    cell (``config['unit']``, see ``dinoscale.sweep.cell.unit_id``)."""
    cell_id, k = parse_unit(config["unit"])
    if k is None:
        cell_trainable(ctx.cells[cell_id], ctx)
    else:
        configuration_trainable(ctx.cells[cell_id], k, ctx)
