"""The ``curl`` stage type: the adapter (``stage``) and its helpers: request parsing, TLS policy,
response reading, errors."""
