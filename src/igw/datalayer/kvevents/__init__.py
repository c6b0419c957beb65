"""Side lane: the KV-cache events of the model servers, decoded and indexed for precise prefix routing.

* :mod:`~igw.datalayer.kvevents.wire` decodes vLLM's ZMQ messages (``[topic, seq, msgpack batch]``);
* :mod:`~igw.datalayer.kvevents.index` keeps, per block of a prompt prefix, which endpoints hold it;
* :mod:`~igw.datalayer.kvevents.subscriber` receives the messages, keeps each engine's stream in order
  (replaying or clearing on a gap) and applies them to the index;
* :mod:`~igw.datalayer.kvevents.metrics` exposes what they do as ``igw_kv_events_*``.
"""
