"""Tools behind interfaces, registered by kind and name (see `data_engine.core.create`)."""
