"""Client sampling that matches the privacy analysis, from a generator nobody can replay.

Flower's `SimpleClientManager.sample` draws exactly m clients with Python's global `random`
(predictable, seedable by anyone who imports it). Under client-level DP the sampling is part
of the mechanism: amplification by sampling holds only if the cohort is drawn the way the
accountant assumes and an observer cannot predict it. `PrivateCohort` is a view over the run's
client manager that the DP wrappers hand to the inner strategy's `configure_fit`, so Flower's
strategies keep building the instructions while the draw is ours:

- `poisson`: every available client joins independently with probability q, so the cohort
  size varies from round to round and may be 0 (the DP wrapper then releases noise alone);
- `fixed`: exactly m of the available clients, uniformly without replacement.

Both draw from `secrets.SystemRandom` (the OS CSPRNG). There is deliberately no seed: a DP run
is not reproducible in who was sampled, by design.
"""

from __future__ import annotations

import secrets

from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion


class PrivateCohort(ClientManager):
    def __init__(self, inner: ClientManager, *, poisson_rate: float | None) -> None:
        if poisson_rate is not None and not 0 < poisson_rate <= 1:
            raise ValueError(f"poisson_rate={poisson_rate} must be in (0, 1]")
        self.inner = inner
        self.poisson_rate = poisson_rate
        self._rng = secrets.SystemRandom()

    def num_available(self) -> int:
        return self.inner.num_available()

    def register(self, client: ClientProxy) -> bool:
        return self.inner.register(client)

    def unregister(self, client: ClientProxy) -> None:
        self.inner.unregister(client)

    def all(self) -> dict[str, ClientProxy]:
        return self.inner.all()

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        return self.inner.wait_for(num_clients, timeout)

    def sample(
        self,
        num_clients: int,
        min_num_clients: int | None = None,
        criterion: Criterion | None = None,
    ) -> list[ClientProxy]:
        self.inner.wait_for(num_clients if min_num_clients is None else min_num_clients)
        pool = self.inner.all()
        cids = sorted(c for c in pool if criterion is None or criterion.select(pool[c]))
        if self.poisson_rate is not None:
            return [pool[c] for c in cids if self._rng.random() < self.poisson_rate]
        if num_clients > len(cids):
            return []
        return [pool[c] for c in self._rng.sample(cids, num_clients)]
