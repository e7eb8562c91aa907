"""Memory backends behind weightd.daemon.memory.base.MemoryBackend."""
