"""Model families, one file each (its checkpoint names, config mapping, conventions and module);
`registry.py` lists them and `loader.py` turns a checkpoint into a running network."""
