-- wrk script: POST /api/v1/heartbeat as many devices, round robin from a "device_id token" file.
-- Usage: wrk ... -s heartbeat.lua URL -- TOKENS_FILE
local tokens = {}
local next_index = 1
local body = '{"agent_version":"bench","telemetry":{"cpu_percent":12.5,"mem_total_bytes":8589934592,' ..
  '"mem_available_bytes":4294967296,"disk_total_bytes":128000000000,"disk_free_bytes":64000000000,' ..
  '"load1":0.5,"load5":0.4,"load15":0.3,"uptime_s":123456},"acks":[]}'

function init(args)
  for line in io.lines(args[1]) do
    local token = line:match("^%S+ (%S+)$")
    if token then tokens[#tokens + 1] = token end
  end
  next_index = math.random(#tokens)
end

function request()
  next_index = next_index % #tokens + 1
  return wrk.format("POST", "/api/v1/heartbeat",
    { ["Authorization"] = "Bearer " .. tokens[next_index], ["Content-Type"] = "application/json" }, body)
end
