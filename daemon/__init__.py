"""weightd.daemon: the node-local weight daemon (storage -> arena -> gRPC leases)."""
