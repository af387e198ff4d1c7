-- wrk script: POST one prebuilt KServe v2 binary-tensor request (JSON header + raw float32 bytes).
-- The harness writes the body once; BODY_FILE names it and HEADER_LENGTH is the JSON header's byte count.
local f = assert(io.open(assert(os.getenv("BODY_FILE"), "BODY_FILE not set"), "rb"))
local body = f:read("*all")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = assert(os.getenv("HEADER_LENGTH"), "HEADER_LENGTH not set")
wrk.body = body
