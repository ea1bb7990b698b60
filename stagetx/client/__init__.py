"""A small client of the default application (etc/stage.json + lua/): one-shot commands, an
interactive prompt and a load mode. Run it as ``python -m stagetx.client``; docs/default-app.md.
"""
