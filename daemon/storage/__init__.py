"""Storage backends behind weightd.daemon.storage.base.ObjectStore."""
