"""The ``ticket`` stage type: the pure decision core (``tickets``) and the adapter (``stage``)."""
