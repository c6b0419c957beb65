"""Kubernetes controllers: a side lane that keeps the data layer's stores in step with the cluster.

* :mod:`~igw.controllers.kube`: the API client (in-cluster service account or kubeconfig).
* :mod:`~igw.controllers.reflector`: list + watch of one kind of object into a cache
  (resourceVersion, bookmarks, re-list on 410 Gone, backoff), calling a level-triggered handler.
* :mod:`~igw.controllers.resources`: pure functions from the wire objects to what igw uses.
* :mod:`~igw.controllers.pool`: InferencePool (or the selector flags) + Pods -> EndpointStore.
* :mod:`~igw.controllers.objectives`: InferenceObjective, InferenceModelRewrite and the legacy
  InferenceModel -> ObjectiveStore and RewriteStore.
* :mod:`~igw.controllers.leader`: Lease-based leader election for active-passive replicas.

The controllers only read the cluster (plus the Lease when electing a leader): status belongs
to the gateways. Nothing on the request path imports this package; ``app/kubernetes.py`` wires it.
"""
