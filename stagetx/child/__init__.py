"""One child process of a server: entry point (``main``), service tree (``service``), the stages' host
(``host``), links to the other processes (``links``) and the control client (``control``)."""
