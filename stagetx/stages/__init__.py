"""Stage types: the registry (``registry``), the contract (``base``), one package per built-in type."""
