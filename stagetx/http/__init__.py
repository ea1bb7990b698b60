"""HTTP client helpers of the ``curl`` stage: request parsing, TLS policy, response reading, errors."""
