-- bin/preload/import.lua of the original STAGE platform, https://github.com/datumflux/platform at 8d7063b6bb44.
-- Copyright (c) 2018-2019 DATUMFLUX CORP., MIT licence: see LICENSE in tests/e2e/stage_original.
-- Unmodified below this header, except lines starting "-- [stagetx: skipped" (the reason follows).
function import(f)
	return stage.require(f, function (r, i)
		if r ~= nil then
			return r
		end

		r = require(i[1])
		if r ~= nil and i[2] ~= nil then
			if type(r) == "table" then
				return r[ i[2] ]
			end
			return nil
		end
		return r
	end)
end
