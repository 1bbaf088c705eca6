"""kvstore.server.cluster: cluster mode's foundation (Redis Cluster slots, etcd).

- :mod:`.slots`: CRC16 hash slots exactly as Redis Cluster, slot ranges.
- :mod:`.etcd`: a small asyncio client for etcd's v3 JSON gateway.
- :mod:`.topology`: the cluster's keys in etcd (members, slot map + epoch).
- :mod:`.controller`: the elected controller (bootstrap, failover, handover,
  resharding requests) and the pure slot-map operations it uses.
- :mod:`.agent`: :class:`NodeAgent`, a node's lease, registration, fencing and
  slot-map following, calling back into the server through :class:`ClusterNode`.

Everything here runs on the server's asyncio loop; nothing blocks it.
"""

from .agent import DEFAULT_TTL, ClusterNode, NodeAgent, new_node_id
from .controller import Controller
from .etcd import (EtcdClient, EtcdError, EtcdResponseError, EtcdTimeoutError,
                   EtcdUnavailableError, LeaseNotFoundError)
from .slots import SLOTS, key_slot
from .topology import (ClusterNameError, ClusterNotFoundError, Member, NodeView, SlotMap,
                       StaleEpochError, Topology, TopologyError)

__all__ = ["SLOTS", "key_slot", "NodeAgent", "ClusterNode", "DEFAULT_TTL", "new_node_id",
           "Controller", "Topology", "SlotMap", "Member", "NodeView",
           "TopologyError", "ClusterNameError", "ClusterNotFoundError", "StaleEpochError",
           "EtcdClient", "EtcdError", "EtcdUnavailableError", "EtcdTimeoutError",
           "EtcdResponseError", "LeaseNotFoundError"]
