"""Where endpoints come from besides `Endpoints` documents: Consul, Kubernetes, DNS, and the
control service's registry, each a `Provider` (meshlib.discovery.base) feeding the Snapshot.
"""

from meshlib.discovery.base import EndpointSet as EndpointSet
from meshlib.discovery.base import Provider as Provider
from meshlib.discovery.base import Target as Target
