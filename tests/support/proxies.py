"""Stand-ins for connected nodes, for driving a strategy stack in this process: a proxy that
only carries its `cid`, one whose calls go to a real Flower client, a client manager holding
n of the first kind, and a client's FitRes."""

from __future__ import annotations

from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy


class LoopbackProxy(ClientProxy):
    """Stands in for a connected node; the strategies under test only read `cid`."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class InProcessProxy(ClientProxy):
    """A node whose calls go straight to a real Flower Client built by the ClientApp's
    build_client (what a SuperNode runs), in this process."""

    def __init__(self, cid: str, client) -> None:
        super().__init__(cid)
        self.client = client

    def fit(self, ins, timeout, group_id):
        return self.client.fit(ins)

    def evaluate(self, ins, timeout, group_id):
        return self.client.evaluate(ins)

    def get_parameters(self, ins, timeout, group_id):
        return self.client.get_parameters(ins)

    def get_properties(self, ins, timeout, group_id):
        return self.client.get_properties(ins)

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def manager(n: int) -> SimpleClientManager:
    """A client manager with n LoopbackProxy nodes, cids "0" .. "n-1"."""
    cm = SimpleClientManager()
    for i in range(n):
        cm.register(LoopbackProxy(str(i)))
    return cm


def fit_res(arrays, num_examples=10) -> FitRes:
    """A client's successful fit result carrying `arrays`."""
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, {})
