"""Several engine instances as one fleet (Llumnix): dispatcher, migration policy, simulation.

- :mod:`kvmem.cluster.policy`: :class:`Load` (virtual usage), :func:`pick_instance`,
  :func:`plan_migrations`;
- :mod:`kvmem.cluster.fleet`: :class:`Cluster`, N engine processes behind the dispatcher,
  live-migrating requests from loaded (or draining) instances to free ones, or (``prefill=P``)
  P prefill and N-P decode instances (:mod:`kvmem.cluster.disagg`, DistServe);
- :mod:`kvmem.cluster.instance`: the instance process and its pipe to the front;
- :mod:`kvmem.cluster.simulate`: the same policies on simulated instances, for benchmarks.
"""

from kvmem.cluster.fleet import Cluster
from kvmem.cluster.policy import Load, pick_instance, plan_migrations

__all__ = ["Cluster", "Load", "pick_instance", "plan_migrations"]
