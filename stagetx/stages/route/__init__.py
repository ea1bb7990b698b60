"""The ``route`` stage type: the pure decision core (``subscriptions``) and the adapter (``stage``)."""
