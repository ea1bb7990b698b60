"""One child process of a server: entry point (``main``), service tree (``service``), the stages'
host (``host``), links to the other processes (``links``), the control client (``control``) and
the dev-mode script watcher (``watcher``)."""
