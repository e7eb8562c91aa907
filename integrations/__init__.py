"""weightd.integrations: engines loading their weights from a weightd daemon, one module per engine.

Each module imports its engine only when called (installing weightd pulls no engine) and speaks to the daemon
only through weightd.client.
"""
