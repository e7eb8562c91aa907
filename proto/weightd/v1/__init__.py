"""weightd.v1: the wire contract (generated from weightd.proto; regenerate with scripts/generate_proto.py)."""
