"""Helpers of the ``curl`` stage: request parsing, TLS policy, response reading, errors."""
