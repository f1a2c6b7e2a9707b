"""Heterogeneity-aware client selection for synchronous FedAvg.

A synchronous round lasts as long as its slowest region. A region whose
estimated round time exceeds the deadline sits out rounds: it joins every
`m_r = ceil(t_r / deadline)`-th round, and when it does its weight in the average
is multiplied by `m_r`, so over rounds its data still counts by its size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from .membership import Roster

QUERY_TIMEOUT_S = 120.0


class SelectiveFedAvg(FedAvg):
    """Flower's FedAvg, with slow regions joining only every `m_r`-th round.

    Parameters
    ----------
    round_times : mapping region → seconds
        Estimated round time of each region (the scheduler's plan gives them).
    deadline_s : float
        Rounds should not take longer than this.
    roster : Roster, optional
        The run's node → region map (`Metered` shares it); nodes it cannot name
        are asked with a `query` message before their first round.
    **kwargs :
        Passed to `flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, *, round_times: Mapping[str, float], deadline_s: float, roster: Roster | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
        self.every = {name: max(1, math.ceil(t / deadline_s - 1e-9)) for name, t in round_times.items()}
        self.roster = roster or Roster()

    def joins(self, region: str, server_round: int) -> bool:
        """Whether `region` takes part in `server_round` (1-based)."""
        m = self.every.get(region, 1)
        return (server_round - 1) % m == 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        names = self.roster.names(grid, [m.metadata.dst_node_id for m in messages], config, QUERY_TIMEOUT_S)
        return [m for m in messages if self.joins(names[m.metadata.dst_node_id], server_round)]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            m = self.every.get(self.roster.region_of(reply.metadata.src_node_id), 1)
            if m > 1 and not reply.has_error():
                metrics = next(iter(reply.content.metric_records.values()))
                metrics[self.weighted_by_key] = metrics[self.weighted_by_key] * m
        return super().aggregate_train(server_round, replies)
