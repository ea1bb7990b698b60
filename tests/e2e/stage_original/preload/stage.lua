-- bin/preload/stage.lua of the original STAGE platform, https://github.com/datumflux/platform at 8d7063b6bb44.
-- Copyright (c) 2018-2019 DATUMFLUX CORP., MIT licence: see LICENSE in tests/e2e/stage_original.
-- Unmodified below this header, except lines starting "-- [stagetx: skipped" (the reason follows).
broker = require('broker')
logger = require('logger')
-- [stagetx: skipped, the odbc library is not in stagetx] odbc = require('odbc')

-- [stagetx: skipped, the bundle library is not in stagetx] bundle = require('bundle')
-- [stagetx: skipped, the bundle library is not in stagetx] for k, v in pairs(bundle) do
-- [stagetx: skipped, the bundle library is not in stagetx] 	stage[k] = v
-- [stagetx: skipped, the bundle library is not in stagetx] end
