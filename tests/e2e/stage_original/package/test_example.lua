-- bin/package/test_example.lua of the original STAGE platform, https://github.com/datumflux/platform at 8d7063b6bb44.
-- Copyright (c) 2018-2019 DATUMFLUX CORP., MIT licence: see LICENSE in tests/e2e/stage_original.
-- Unmodified below this header, except lines starting "-- [stagetx: skipped" (the reason follows).
-- [stagetx: skipped, luvit/weblit, not in stagetx] thread.new(function ()
-- [stagetx: skipped, luvit/weblit, not in stagetx] 
-- [stagetx: skipped, luvit/weblit, not in stagetx] ---
-- [stagetx: skipped, luvit/weblit, not in stagetx] --
-- [stagetx: skipped, luvit/weblit, not in stagetx] dofile 'luvit-loader.lua' -- Enable require to find lit packages
-- [stagetx: skipped, luvit/weblit, not in stagetx] local p = require('pretty-print').prettyPrint -- Simulate luvit's global p()
-- [stagetx: skipped, luvit/weblit, not in stagetx] 
-- [stagetx: skipped, luvit/weblit, not in stagetx] -- This returns a table that is the app instance.
-- [stagetx: skipped, luvit/weblit, not in stagetx] -- All it's functions return the same table for chaining calls.
-- [stagetx: skipped, luvit/weblit, not in stagetx] require('weblit-app')
-- [stagetx: skipped, luvit/weblit, not in stagetx] 
-- [stagetx: skipped, luvit/weblit, not in stagetx]   -- Bind to localhost on port 3000 and listen for connections.
-- [stagetx: skipped, luvit/weblit, not in stagetx]   .bind({
-- [stagetx: skipped, luvit/weblit, not in stagetx]     host = "0.0.0.0",
-- [stagetx: skipped, luvit/weblit, not in stagetx]     port = 3000
-- [stagetx: skipped, luvit/weblit, not in stagetx]   })
-- [stagetx: skipped, luvit/weblit, not in stagetx] 
-- [stagetx: skipped, luvit/weblit, not in stagetx]   -- Include a few useful middlewares.  Weblit uses a layered approach.
-- [stagetx: skipped, luvit/weblit, not in stagetx]   .use(require('weblit-logger'))
-- [stagetx: skipped, luvit/weblit, not in stagetx]   .use(require('weblit-auto-headers'))
-- [stagetx: skipped, luvit/weblit, not in stagetx]   .use(require('weblit-etag-page'))
-- [stagetx: skipped, luvit/weblit, not in stagetx] 
-- [stagetx: skipped, luvit/weblit, not in stagetx]   -- This is a custom route handler
-- [stagetx: skipped, luvit/weblit, not in stagetx]   .route({
-- [stagetx: skipped, luvit/weblit, not in stagetx]     method = "GET", -- Filter on HTTP verb
-- [stagetx: skipped, luvit/weblit, not in stagetx]     path = "/greet/:name", -- Filter on url patterns and capture some parameters.
-- [stagetx: skipped, luvit/weblit, not in stagetx]   }, function (req, res)
-- [stagetx: skipped, luvit/weblit, not in stagetx]     p(req) -- Log the entire request table for debugging fun
-- [stagetx: skipped, luvit/weblit, not in stagetx]     res.body = "Hello " .. req.params.name .. "\n"
-- [stagetx: skipped, luvit/weblit, not in stagetx]     res.code = 200
-- [stagetx: skipped, luvit/weblit, not in stagetx]   end)
-- [stagetx: skipped, luvit/weblit, not in stagetx] 
-- [stagetx: skipped, luvit/weblit, not in stagetx]   -- Actually start the server
-- [stagetx: skipped, luvit/weblit, not in stagetx]   .start()
-- [stagetx: skipped, luvit/weblit, not in stagetx] 
-- [stagetx: skipped, luvit/weblit, not in stagetx] -- We also need to explicitly start the libuv event loop.
-- [stagetx: skipped, luvit/weblit, not in stagetx] require('luv').run()
-- [stagetx: skipped, luvit/weblit, not in stagetx] 
-- [stagetx: skipped, luvit/weblit, not in stagetx] end)

--
--
-- [stagetx: skipped, _SANDBOX internals] _SANDBOX[""] = { "*EXAMPLE" }

stage.waitfor("callback", function (a, b, c)
	print("WAITFOR", a, b, c)
end)

EXAMPLE = { 10, 20 }
print("EXAMPLE", EXAMPLE)
for k, v in pairs(EXAMPLE) do
	print("", k, v)
end

print("SANDBOX")
-- [stagetx: skipped, _SANDBOX internals] __.TEST = "HELLO"
-- [stagetx: skipped, _SANDBOX internals] for k, v in pairs(_SANDBOX) do
-- [stagetx: skipped, _SANDBOX internals] 	print("", k, v)
-- [stagetx: skipped, _SANDBOX internals] end
stage.signal("callback", 10, 20, { "HELLO" } )

--[[
odbc.new({
	["DRIVER"] = "MySQL ODBC 8.0 ANSI Driver", -- /etc/odbcinst.ini에 정의
    ["SERVER"] = "localhost",
    ["DATABASE"] = "DF_DEVEL",
    ["USER"] = "user",
    ["PASSWORD"] = "password",
    [".executeTimeout"] = 1000,
    [".queryDriver"] = "mysql"
}, function (adp)
	print(adp)
	local rs = adp.execute("SELECT * FROM EXAMPLE")
	rs.columns(function (columns)
		print("COLUMNS", columns)
		for k, v in pairs(columns) do
			print("", k, v)
			for v_k, v_v in pairs(v) do
				print("", "", v_k, v_v)
			end
		end
	end)

	local rows = rs.fetch({"id"}, function (rows)
		print("FETCH", rows)
		return rows
	end)

	print("ROWS", rows(20)) -- id == 20
	print("ROWS", rows({19, 20}, function (r)
		local total = 0
		local success = 0
		for k, v in pairs(r) do
			if v ~= nil then
				success = success + 1
			end
			total = total + 1
		end
		return total == success
	end)) -- id = [19, 20]
	print("ROWS", #rows()) -- id all
	print("ROWS", rs.near(rows, 20)) -- rows id == 20
	for k, v in pairs(rows) do
		print("", k, v)
	end

	if #rows() == 0 then
		rows[0] = {
			["name"] = "TEST",
			["udata"] = {
				"BLOB"
			}
		}
		rs.apply(rows, "EXAMPLE", function (ai_k, log)
			print("COMMIT", ai_k, log)
			for k, v in ipairs(ai_k) do
				print("", k, v)
			end
		end)
	end
end)
]]

local proxy = stage.proxy({}, {
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 	[""] = {
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 		"index:{10,10}",
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 		function (k, i)
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 			print("INDEX", k, i)
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 			return k[1]
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 		end,
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 		["*"] = function (t, edges, k, v)
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 			print("NAME CHANGE", t, edges, k, v)
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 		end,
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 		["#"] = function (t, edges, k, v)
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 			print("INDEX CHANGE", t, edges, k, v)
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 		end
-- [stagetx: skipped, the bundle library's proxy extension, not in stagetx] 	},
	test = { 10, 20, function (t, edges, k, v)
		print("TEST", edges, k, v)
		for k, v in pairs(edges) do
			print("", k, v)
		end
	end}
})

proxy.test = 0
proxy.test = 40
for i = 1, 30, 1 do
	proxy.test = proxy.test + 1
end

proxy.name = "HELLO"
proxy[10] = "STAGE"
proxy[{"HELLO", 20}] = "HAHA"

print("PROXY", proxy)
for k, v in pairs(proxy) do
	print("", k, v)
end

stage.waitfor("ticket:@", function (result_id, result)
	print("TICKET CONTROL", result_id, result)
end)

stage.waitfor("ticket_callback", function (value)
	print("TICKET CALLBACK", value)
end)
stage.waitfor("fail_callback", function (id, value)
	print("FAILED CALLBACK", id, value)
	for k, v in pairs(value) do
		print("", k, v)
	end
end)

stage.signal("ticket:odbc?fail_callback", {
	[""] = "USER DATA",
	ticket_callback = "HELLO"
})

-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] local FILE = { "example.mmap", { "b10 i c10" } }
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] stage.viewof(FILE, 10, function (buffer)
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	print("MMAP", buffer.rows, buffer.row_size)
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	buffer[1] = { {1, 2}, 2, "01234567890123" }
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	buffer[2] = { {3, 4}, 10, "23456789890123" }
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	buffer[10] = { {4, 6}, 20, "12123456789123" }
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	print("RESULT", stage.viewof({ buffer, { "b10 i c10" }}, 16, 1, function (data)
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 		print("SCOPE") print_r(data[1])
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 		data[1] = { {6, 7}, 10, "11156789890123" }
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 		return "HELLO", "SUCCESS"
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	end))
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	print("UPDATE") print_r(buffer[2])
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	buffer.scope(function ()
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 		print("RWLOCK")
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	end)
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	buffer.commit('async')
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	--[[ for k, v in ipairs(buffer) do
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 		print("", k, v)
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 		print_r(v)
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] 	end ]]
-- [stagetx: skipped, stage.viewof is the bundle library's, not in stagetx] end)

logger.out("HELLO LOG4CXX")
