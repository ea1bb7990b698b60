"""twistd plugin: ``twistd stage`` runs a stagetx server (the code lives in ``stagetx.tap``)."""

from twisted.application.service import ServiceMaker

stage = ServiceMaker("stagetx", "stagetx.tap", "A STAGE game server: Lua stages in supervised processes.", "stage")
