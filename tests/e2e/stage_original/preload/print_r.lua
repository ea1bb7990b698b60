-- bin/preload/print_r.lua of the original STAGE platform, https://github.com/datumflux/platform at 8d7063b6bb44.
-- Copyright (c) 2018-2019 DATUMFLUX CORP., MIT licence: see LICENSE in tests/e2e/stage_original.
-- Unmodified below this header, except lines starting "-- [stagetx: skipped" (the reason follows).
function print_r(arr, indentLevel)
    if(indentLevel == nil) then
        print(print_r(arr, 0))
        return
    end

	if type(arr) == "table" or type(arr) == "userdata" then
    	local str = ""
    	local indentStr = "#"

    	for i = 0, indentLevel do
    	    indentStr = indentStr.."\t"
   	 	end

		for index,value in pairs(arr) do
			if type(value) == "table" then
				str = str..indentStr..index..": \n"..print_r(value, (indentLevel + 1))
			else 
				str = str..indentStr..index..": "..tostring(value).."\n"
			end
		end
    	return str
	else
		return tostring(arr)
	end
end
