"""The built-in stage types, registered as ``IStageType`` plugins like any other package's."""

from stagetx.stages.registry import StageType

lua = StageType("lua", "stagetx.stages.lua.stage")
luajit = StageType("luajit", "stagetx.stages.lua.stage")
index = StageType("index", "stagetx.stages.index.stage")
curl = StageType("curl", "stagetx.stages.curl.stage")
route = StageType("route", "stagetx.stages.route.stage")
ticket = StageType("ticket", "stagetx.stages.ticket.stage")
