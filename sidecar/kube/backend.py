"""The Kubernetes backend, built: reflectors (EndpointSlices or Pods, and the DynamoWorkerMetadata CRs)
feed the hub through the pod-UID join, and this pod's CR is its publisher, followed by a watch of that
one CR whatever ``DISCOVERY_WATCH`` says.

Imported only when ``DYN_DISCOVERY_BACKEND`` is kubernetes (``sidecar.app.backends``): it brings in the
official Kubernetes client.
"""

from __future__ import annotations

from sidecar.core.containers import pod_peer_key
from sidecar.core.join import PeerJoin
from sidecar.core.relayed_join import RelayedJoin
from sidecar.kube.access import KubeAccess
from sidecar.kube.api import KubeApi
from sidecar.kube.own_registration import OwnRegistrationWatch
from sidecar.kube.publisher import KubePublisher
from sidecar.kube.reflector import Reflector
from sidecar.kube.settings import KubeSettings
from sidecar.kube.sources import WatchTarget, watch_targets
from sidecar.kube.upstream import SOURCE as UPSTREAM_SOURCE
from sidecar.kube.upstream import UpstreamSource
from sidecar.peers.backend import Backend, RelayBackend, SharedSettings, new_hub
from sidecar.peers.hub import PeerHub
from sidecar.peers.metrics import Metrics


def build(settings: SharedSettings, kube: KubeSettings, metrics: Metrics, transport: object | None = None) -> Backend:
    """Reflectors for every watch target, the hub they feed, the publisher of this pod's CR and its own watch.

    ``transport``: a ``KubeApi`` to use (tests inject one); otherwise one is made from the kubeconfig (in a
    pod: the service account). Connecting waits for the first request: building dials nothing.
    """
    if transport is not None and not isinstance(transport, KubeApi):
        raise TypeError(f"the Kubernetes backend needs a KubeApi, got {type(transport).__name__}")
    api = transport or KubeApi.from_kubeconfig(kube.kubeconfig, settings.request_timeout)
    api.on_request = lambda verb, code: metrics.api_requests.labels(verb, str(code)).inc()
    api.on_bytes = metrics.api_bytes.inc
    identity = settings.identity
    self_uid = pod_peer_key(identity.uid, identity.name, kube.metadata_name)
    upstream = settings.upstream  # following a relay: its peers, joined there, are this hub's one source
    targets = watch_targets(kube) if upstream is None else []
    if upstream is None:
        join: PeerJoin | RelayedJoin = PeerJoin(require_metadata=kube.require_metadata, workers=kube.workers)
        hub = new_hub(settings, [target.name for target in targets], join, self_uid=self_uid)
    else:
        hub = new_hub(settings, [UPSTREAM_SOURCE], RelayedJoin(), self_uid=self_uid)
    publisher = KubePublisher(
        api,
        identity,
        settings.pod_labels,
        settings.initial_metadata,
        kube.field_manager,
        metrics,
        settings.backoff_max,
        register=settings.register,
        metadata_name=kube.metadata_name,
        resync=settings.registration_resync,
        health_listener=hub.set_registration_health,  # a CR waited out, failing writes: DEGRADED on streams
    )
    own = OwnRegistrationWatch(
        api,
        publisher,
        metrics,
        silence_timeout=settings.watch_silence_timeout,
        backoff_max=settings.backoff_max,
        streaming_list=kube.streaming_list,
    )
    publisher.own_watch = own
    sources: list[Reflector] | list[UpstreamSource]
    if upstream is None:
        sources = _reflectors(api, targets, hub, settings, kube, metrics)
        descriptions = [_describe(w.target) for w in [*sources, own]]
    else:
        # Peers come from the relay tier: one stream, no peer watch on the API server.
        sources = [
            UpstreamSource(
                hub.store(UPSTREAM_SOURCE),
                upstream,
                kube.namespaces,
                kube.peer_selector,
                api.bearer_token,
                metrics,
                settings.backoff_max,
            )
        ]
        relay = ", ".join(f"{host}:{port}" for host, port in upstream.targets)
        namespaces = ", ".join(n or "*" for n in kube.namespaces)
        descriptions = [f"peers of {namespaces} from the relay {relay}", _describe(own.target)]
    return Backend(
        name="kubernetes",
        hub=hub,
        publisher=publisher,
        sources=sources,
        descriptions=descriptions,
        close=api.close,
        own_watches=[own],
    )


def _describe(target: WatchTarget) -> str:
    """What one watch watches, for people (the "started" log line)."""
    return f"{target.name} in {target.namespace or 'all namespaces'} ({target.selectors})"


def _reflectors(
    api: KubeApi,
    targets: list[WatchTarget],
    hub: PeerHub,
    settings: SharedSettings,
    kube: KubeSettings,
    metrics: Metrics,
) -> list[Reflector]:
    return [
        Reflector(
            api,
            target,
            hub.store(target.name),
            metrics,
            silence_timeout=settings.watch_silence_timeout,
            backoff_max=settings.backoff_max,
            streaming_list=kube.streaming_list,
        )
        for target in targets
    ]


def build_relay(
    settings: SharedSettings, kube: KubeSettings, metrics: Metrics, access_ttl: float, transport: object | None = None
) -> RelayBackend:
    """A relay's parts: the same reflectors and join as a sidecar's (watching always), and the API server's
    reviews of who may read them. Its service account lists and watches the peer resources in the
    namespaces it serves, and creates token and access reviews."""
    if transport is not None and not isinstance(transport, KubeApi):
        raise TypeError(f"the Kubernetes backend needs a KubeApi, got {type(transport).__name__}")
    api = transport or KubeApi.from_kubeconfig(kube.kubeconfig, settings.request_timeout)
    api.on_request = lambda verb, code: metrics.api_requests.labels(verb, str(code)).inc()
    api.on_bytes = metrics.api_bytes.inc
    targets = watch_targets(kube)
    hub = new_hub(
        settings,
        [target.name for target in targets],
        PeerJoin(require_metadata=kube.require_metadata, workers=kube.workers),
    )
    reflectors = _reflectors(api, targets, hub, settings, kube, metrics)
    return RelayBackend(
        hub=hub,
        sources=reflectors,
        descriptions=[_describe(r.target) for r in reflectors],
        access=KubeAccess(api, kube.namespaces, [t.source.resource for t in targets], access_ttl),
        close=api.close,
    )
