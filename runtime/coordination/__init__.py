"""Stream ownership across replicas (`tta serve --coordinator etcd://...`): one holder per
stream, fenced checkpoint commits, hand-off and failover. Without a coordinator none of this is
used: one process owns every stream it serves.

etcd.py is the client of etcd's v3 gRPC API (stubs generated from proto/etcd/rpc.proto);
ownership.py holds this replica's lease and stream keys; fenced_store.py writes state files
under new names and commits them only while the stream is held.
"""
