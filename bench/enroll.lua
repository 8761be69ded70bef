-- wrk script: replays one signed enrollment body (the idempotent path: signature check + lookups).
-- Usage: wrk ... -s enroll.lua URL -- DIR   (DIR holds body.json and signature from kernex-bench enroll-body)
local body, signature
function init(args)
  body = io.open(args[1] .. "/body.json"):read("*a")
  signature = io.open(args[1] .. "/signature"):read("*a")
end
function request()
  return wrk.format("POST", "/api/v1/enroll",
    { ["Content-Type"] = "application/json", ["kernex-signature"] = signature }, body)
end
