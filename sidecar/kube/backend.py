"""The Kubernetes backend, built: reflectors (EndpointSlices or Pods, and the DynamoWorkerMetadata CRs)
feed the hub through the pod-UID join, and this pod's CR is its publisher, followed by a watch of that
one CR whatever ``DISCOVERY_WATCH`` says.

Imported only when ``DYN_DISCOVERY_BACKEND`` is kubernetes (``sidecar.app.backends``): it brings in the
official Kubernetes client.
"""

from __future__ import annotations

from sidecar.core.containers import pod_peer_key
from sidecar.core.join import PeerJoin
from sidecar.kube.api import KubeApi
from sidecar.kube.own_registration import OwnRegistrationWatch
from sidecar.kube.publisher import KubePublisher
from sidecar.kube.reflector import Reflector
from sidecar.kube.settings import KubeSettings
from sidecar.kube.sources import watch_targets
from sidecar.peers.backend import Backend, SharedSettings, new_hub
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
    targets = watch_targets(kube)
    hub = new_hub(
        settings,
        [target.name for target in targets],
        PeerJoin(require_metadata=kube.require_metadata, workers=kube.workers),
        self_uid=pod_peer_key(identity.uid, identity.name, kube.metadata_name),
    )
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
    reflectors = [
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
    return Backend(
        name="kubernetes",
        hub=hub,
        publisher=publisher,
        sources=reflectors,
        descriptions=[
            f"{r.target.name} in {r.target.namespace or 'all namespaces'} ({r.target.selectors})"
            for r in [*reflectors, own]
        ],
        close=api.close,
        own_watches=[own],
    )
